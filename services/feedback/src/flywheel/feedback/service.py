"""The feedback domain: tenants, keys, generations and feedback, scoped to one tenant.

Every function takes the tenant it acts for and filters every query by it, so one tenant's
ids are simply not found from another (NotFound, never a hint that they exist). Each write
commits its rows and its outbox event in one transaction.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message
from sqlalchemy import Select, and_, case, func, or_, select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from flywheel.contracts.common.v1.common_pb2 import DimensionScore
from flywheel.contracts.feedback.v1 import events_pb2 as events
from flywheel.contracts.feedback.v1 import resources_pb2 as pb
from flywheel.contracts.feedback.v1.service_pb2 import (
    FeedbackFilter,
    GenerationFilter,
    GenerationInput,
)
from flywheel.core.db import SessionFactory
from flywheel.core.errors import (
    AlreadyExists,
    Conflict,
    DomainError,
    FieldError,
    InvalidArgument,
    NotFound,
)
from flywheel.core.events.outbox import add_event
from flywheel.feedback import mapping
from flywheel.feedback.models import (
    ApiKeyRow,
    FeedbackRevisionRow,
    FeedbackRow,
    GenerationRow,
    TaskTypeRow,
    TenantRow,
    UserRow,
)
from flywheel.feedback.validation import (
    MAX_COMMENT_CHARS,
    MAX_ID_CHARS,
    MAX_OUTPUT_CHARS,
    TASK,
    Checks,
    prompt_hash,
)

SOURCE_SERVICE = "feedback"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
EXPORT_CHUNK_ROWS = 500

Row = TypeVar("Row", GenerationRow, FeedbackRow, UserRow, TenantRow, ApiKeyRow, TaskTypeRow)


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a listing and the cursor of the next (empty at the end)."""

    items: list[T]
    next_cursor: str


def _now() -> datetime:
    return datetime.now(UTC)


def _encode_cursor(created_at: datetime, ident: str) -> str:
    raw = f"{created_at.isoformat()}|{ident}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        stamp, ident = base64.urlsafe_b64decode(padded).decode().split("|", 1)
        created = datetime.fromisoformat(stamp)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(FieldError("page.cursor", "is not a cursor this API issued")) from exc
    return created, ident


def _page_size(size: int) -> int:
    if size > MAX_PAGE_SIZE:
        raise InvalidArgument(FieldError("page.page_size", f"must be at most {MAX_PAGE_SIZE}"))
    return size or DEFAULT_PAGE_SIZE


class FeedbackService:
    """The domain operations; transport layers call exactly one of these per request."""

    def __init__(
        self,
        sessions: SessionFactory,
        *,
        key_pepper: bytes,
        on_commit: Callable[[], None] = lambda: None,
    ) -> None:
        self.sessions = sessions
        self.key_pepper = key_pepper
        # Called after a transaction with events committed: wakes the outbox relay.
        self.on_commit = on_commit

    # -- helpers -------------------------------------------------------------------------

    async def _tenant(self, session: AsyncSession, tenant_id: str) -> TenantRow:
        row = await session.get(TenantRow, tenant_id)
        if row is None:
            raise NotFound("tenant", tenant_id)
        return row

    async def _scoped_get(
        self, session: AsyncSession, model: type[Row], tenant_id: str, ident: str, kind: str
    ) -> Row:
        row = await session.get(model, ident)
        # Another tenant's object answers exactly like a missing one.
        if row is None or row.tenant_id != tenant_id:
            raise NotFound(kind, ident)
        return row

    def _event(self, session: AsyncSession, tenant_id: str, payload: Message) -> None:
        add_event(session, tenant_id, payload, source_service=SOURCE_SERVICE)

    async def _page(
        self,
        session: AsyncSession,
        statement: Select[tuple[Row]],
        model: type[Row],
        id_column: Any,
        page_size: int,
        cursor: str,
    ) -> Page[Row]:
        size = _page_size(page_size)
        if cursor:
            created, ident = _decode_cursor(cursor)
            statement = statement.where(
                or_(
                    model.created_at < created,
                    and_(model.created_at == created, id_column < ident),
                )
            )
        statement = statement.order_by(model.created_at.desc(), id_column.desc()).limit(size + 1)
        rows = list((await session.scalars(statement)).all())
        more = len(rows) > size
        rows = rows[:size]
        last = rows[-1] if more else None
        return Page(
            rows, _encode_cursor(last.created_at, getattr(last, id_column.key)) if last else ""
        )

    # -- tenants, users, keys, task types --------------------------------------------------

    async def create_tenant(self, tenant_id: str, display_name: str) -> TenantRow:
        """Create a tenant (brand) with a slug id."""
        checks = Checks()
        checks.slug(tenant_id, "tenant_id")
        checks.text(display_name or tenant_id, "display_name", max_chars=200)
        checks.done()
        async with self.sessions() as session, session.begin():
            if await session.get(TenantRow, tenant_id) is not None:
                raise AlreadyExists(f"tenant {tenant_id!r} already exists")
            row = TenantRow(
                tenant_id=tenant_id, display_name=display_name or tenant_id, created_at=_now()
            )
            session.add(row)
        return row

    async def get_tenant(self, tenant_id: str) -> TenantRow:
        """One tenant."""
        async with self.sessions() as session:
            return await self._tenant(session, tenant_id)

    async def list_tenants(self, page_size: int = 0, cursor: str = "") -> Page[TenantRow]:
        """Every tenant, newest first (admin only, enforced by the caller)."""
        async with self.sessions() as session:
            return await self._page(
                session, select(TenantRow), TenantRow, TenantRow.tenant_id, page_size, cursor
            )

    async def create_user(self, tenant_id: str, external_id: str, display_name: str) -> UserRow:
        """Register a person of the tenant by the tenant's own id for them."""
        checks = Checks()
        checks.text(external_id, "external_id", max_chars=MAX_ID_CHARS)
        checks.text(display_name, "display_name", max_chars=200, required=False)
        checks.done()
        async with self.sessions() as session, session.begin():
            await self._tenant(session, tenant_id)
            existing = await session.scalar(
                select(UserRow).where(
                    UserRow.tenant_id == tenant_id, UserRow.external_id == external_id
                )
            )
            if existing is not None:
                raise AlreadyExists(f"user with external_id {external_id!r} already exists")
            row = UserRow(
                user_id=str(uuid.uuid4()),
                tenant_id=tenant_id,
                external_id=external_id,
                display_name=display_name,
                created_at=_now(),
            )
            session.add(row)
        return row

    async def list_users(
        self, tenant_id: str, page_size: int = 0, cursor: str = ""
    ) -> Page[UserRow]:
        """The tenant's users, newest first."""
        async with self.sessions() as session:
            await self._tenant(session, tenant_id)
            statement = select(UserRow).where(UserRow.tenant_id == tenant_id)
            return await self._page(session, statement, UserRow, UserRow.user_id, page_size, cursor)

    def _hash_secret(self, secret: str) -> str:
        # Keys are 256-bit random, so a keyed hash (no slow KDF) is enough; the pepper keeps a
        # leaked table useless without the service's configuration.
        return hmac.new(self.key_pepper, secret.encode(), hashlib.sha256).hexdigest()

    async def create_api_key(
        self,
        tenant_id: str,
        role: str,
        name: str,
        user_id: str | None = None,
        expires_at: datetime | None = None,
    ) -> tuple[ApiKeyRow, str]:
        """Create a key; return it and its secret, which is never shown again."""
        checks = Checks()
        checks.require(role in mapping.ROLES, "role", f"must be one of {', '.join(mapping.ROLES)}")
        checks.text(name, "name", max_chars=200)
        if expires_at is not None and expires_at <= _now():
            checks.fail("expires_at", "must be in the future")
        checks.done()
        body = secrets.token_urlsafe(32)
        secret = f"fw_{body}"
        async with self.sessions() as session, session.begin():
            await self._tenant(session, tenant_id)
            if user_id is not None:
                await self._scoped_get(session, UserRow, tenant_id, user_id, "user")
            row = ApiKeyRow(
                key_id=str(uuid.uuid4()),
                tenant_id=tenant_id,
                role=role,
                name=name,
                prefix=secret[:10],
                secret_hash=self._hash_secret(secret),
                user_id=user_id,
                created_at=_now(),
                expires_at=expires_at,
            )
            session.add(row)
        return row, secret

    async def list_api_keys(
        self, tenant_id: str, include_revoked: bool = False, page_size: int = 0, cursor: str = ""
    ) -> Page[ApiKeyRow]:
        """The tenant's keys (metadata only), newest first."""
        async with self.sessions() as session:
            await self._tenant(session, tenant_id)
            statement = select(ApiKeyRow).where(ApiKeyRow.tenant_id == tenant_id)
            if not include_revoked:
                statement = statement.where(ApiKeyRow.revoked_at.is_(None))
            return await self._page(
                session, statement, ApiKeyRow, ApiKeyRow.key_id, page_size, cursor
            )

    async def revoke_api_key(self, tenant_id: str, key_id: str) -> ApiKeyRow:
        """Revoke a key for good (revoking twice keeps the first time)."""
        async with self.sessions() as session, session.begin():
            row = await self._scoped_get(session, ApiKeyRow, tenant_id, key_id, "api key")
            if row.revoked_at is None:
                row.revoked_at = _now()
        return row

    async def authenticate(self, secret: str) -> ApiKeyRow | None:
        """The live key whose secret this is, or None."""
        if not secret.startswith("fw_") or len(secret) > 200:
            return None
        async with self.sessions() as session:
            row = await session.scalar(
                select(ApiKeyRow).where(ApiKeyRow.secret_hash == self._hash_secret(secret))
            )
        if row is None or row.revoked_at is not None:
            return None
        if row.expires_at is not None and _aware(row.expires_at) <= _now():
            return None
        return row

    async def create_task_type(
        self, tenant_id: str, name: str, description: str = "", domain: str = ""
    ) -> TaskTypeRow:
        """Declare a task type for the tenant."""
        checks = Checks()
        checks.slug(name, "name", TASK)
        checks.text(description, "description", max_chars=2000, required=False)
        checks.done()
        async with self.sessions() as session, session.begin():
            await self._tenant(session, tenant_id)
            if await session.get(TaskTypeRow, (tenant_id, name)) is not None:
                raise AlreadyExists(f"task type {name!r} already exists")
            row = TaskTypeRow(
                tenant_id=tenant_id,
                name=name,
                description=description,
                domain=domain,
                created_at=_now(),
            )
            session.add(row)
        return row

    async def list_task_types(
        self, tenant_id: str, page_size: int = 0, cursor: str = ""
    ) -> Page[TaskTypeRow]:
        """The tenant's task types, newest first."""
        async with self.sessions() as session:
            await self._tenant(session, tenant_id)
            statement = select(TaskTypeRow).where(TaskTypeRow.tenant_id == tenant_id)
            return await self._page(
                session, statement, TaskTypeRow, TaskTypeRow.name, page_size, cursor
            )

    # -- generations ------------------------------------------------------------------------

    def _check_generation(self, data: GenerationInput, field: str, checks: Checks) -> None:
        checks.slug(data.task, f"{field}.task", TASK)
        checks.prompt(data.prompt, f"{field}.prompt")
        checks.text(data.output, f"{field}.output", max_chars=MAX_OUTPUT_CHARS, required=False)
        checks.text(data.model, f"{field}.model", max_chars=200)
        if data.HasField("client_generation_id"):
            checks.text(
                data.client_generation_id,
                f"{field}.client_generation_id",
                max_chars=MAX_ID_CHARS,
            )
        if data.HasField("adapter"):
            checks.text(data.adapter.name, f"{field}.adapter.name", max_chars=200)
        if data.latency.ToMilliseconds() < 0:
            checks.fail(f"{field}.latency", "must not be negative")
        checks.metadata(mapping.to_json(data.metadata), f"{field}.metadata")

    async def log_generations(
        self, tenant_id: str, inputs: Sequence[GenerationInput]
    ) -> list[tuple[GenerationRow, bool]]:
        """Log generations; one already logged under its client id is returned, not duplicated.

        All or nothing: one invalid input rejects the batch, naming it by index.
        """
        checks = Checks()
        many = len(inputs) > 1
        for i, data in enumerate(inputs):
            self._check_generation(data, f"generations[{i}]" if many else "generation", checks)
        checks.done()

        async def log() -> list[tuple[GenerationRow, bool]]:
            async with self.sessions() as session, session.begin():
                await self._tenant(session, tenant_id)
                return [await self._log_one(session, tenant_id, data) for data in inputs]

        results = await _once_despite_races(log)
        if any(created for _, created in results):
            self.on_commit()
        return results

    async def _log_one(
        self, session: AsyncSession, tenant_id: str, data: GenerationInput
    ) -> tuple[GenerationRow, bool]:
        client_id = data.client_generation_id if data.HasField("client_generation_id") else None
        if client_id is not None:
            existing = await session.scalar(
                select(GenerationRow).where(
                    GenerationRow.tenant_id == tenant_id,
                    GenerationRow.client_generation_id == client_id,
                )
            )
            if existing is not None:
                return existing, False
        if await session.get(TaskTypeRow, (tenant_id, data.task)) is None:
            # Free-form task types come into being on first use.
            session.add(TaskTypeRow(tenant_id=tenant_id, name=data.task, created_at=_now()))
        created = data.served_at.ToDatetime(UTC) if data.HasField("served_at") else _now()
        row = GenerationRow(
            generation_id=str(uuid.uuid4()),
            tenant_id=tenant_id,
            client_generation_id=client_id,
            task=data.task,
            prompt=mapping.to_json(data.prompt),
            prompt_hash=prompt_hash(data.prompt),
            output=data.output,
            model=data.model,
            base_model=data.base_model,
            adapter_name=data.adapter.name if data.HasField("adapter") else None,
            adapter_version=data.adapter.version if data.HasField("adapter") else None,
            composed_adapters=[mapping.to_json(a) for a in data.composed_adapters],
            alias=data.alias if data.HasField("alias") else None,
            traffic_arm=data.traffic_arm if data.HasField("traffic_arm") else None,
            sampling=mapping.to_json(data.sampling),
            latency_ms=float(data.latency.ToMilliseconds()) if data.HasField("latency") else None,
            prompt_tokens=data.prompt_tokens,
            completion_tokens=data.completion_tokens,
            user_id=data.user_id if data.HasField("user_id") else None,
            extra=mapping.to_json(data.metadata),
            created_at=created,
        )
        session.add(row)
        await session.flush()
        self._event(
            session, tenant_id, events.GenerationLogged(generation=mapping.generation_message(row))
        )
        return row, True

    async def get_generation(self, tenant_id: str, generation_id: str) -> GenerationRow:
        """One generation of the tenant."""
        async with self.sessions() as session:
            return await self._scoped_get(
                session, GenerationRow, tenant_id, generation_id, "generation"
            )

    async def list_generations(
        self, tenant_id: str, flt: GenerationFilter, page_size: int = 0, cursor: str = ""
    ) -> Page[GenerationRow]:
        """The tenant's generations matching ``flt``, newest first."""
        g = GenerationRow
        statement = select(g).where(g.tenant_id == tenant_id)
        for name, column in (
            ("task", g.task),
            ("user_id", g.user_id),
            ("alias", g.alias),
            ("prompt_hash", g.prompt_hash),
            ("client_generation_id", g.client_generation_id),
        ):
            if _has(flt, name):
                statement = statement.where(column == getattr(flt, name))
        if flt.HasField("adapter"):
            statement = statement.where(g.adapter_name == flt.adapter.name)
            if flt.adapter.version:
                statement = statement.where(g.adapter_version == flt.adapter.version)
        statement = _time_range(statement, g.created_at, flt)
        async with self.sessions() as session:
            await self._tenant(session, tenant_id)
            return await self._page(session, statement, g, g.generation_id, page_size, cursor)

    # -- feedback ---------------------------------------------------------------------------

    def _check_value(self, value: pb.FeedbackValue, checks: Checks) -> str:
        kind = value.WhichOneof("kind")
        if kind is None:
            checks.fail("value", "must hold one of thumbs, rating, comment, preference, correction")
            return ""
        if kind == "thumbs":
            checks.require(
                value.thumbs != pb.THUMB_UNSPECIFIED, "value.thumbs", "must be up or down"
            )
        elif kind == "rating":
            checks.require(
                1 <= value.rating.value <= 5,
                "value.rating.value",
                f"must be between 1 and 5 (got {value.rating.value})",
            )
        elif kind == "comment":
            checks.text(value.comment.text, "value.comment.text", max_chars=MAX_COMMENT_CHARS)
        elif kind == "correction":
            checks.text(
                value.correction.output, "value.correction.output", max_chars=MAX_OUTPUT_CHARS
            )
        elif kind == "preference":
            p = value.preference
            checks.require(
                p.choice != pb.PREFERENCE_CHOICE_UNSPECIFIED,
                "value.preference.choice",
                "must be a, b or tie",
            )
            checks.require(
                bool(p.generation_b_id), "value.preference.generation_b_id", "must not be empty"
            )
            if p.HasField("strength"):
                checks.require(
                    0 < p.strength <= 1,
                    "value.preference.strength",
                    "must be greater than 0 and at most 1",
                )
        return kind

    async def _preference_side_b(
        self, session: AsyncSession, tenant_id: str, generation: GenerationRow, b_id: str
    ) -> GenerationRow:
        other = await session.get(GenerationRow, b_id)
        _check_side_b(tenant_id, generation, b_id, other)
        assert other is not None
        return other

    def _check_record(self, item: FeedbackInput) -> str:
        """Validate one input; return its kind."""
        checks = Checks()
        kind = self._check_value(item.value, checks)
        if item.source.kind == pb.SOURCE_KIND_SYNTHETIC:
            checks.require(bool(item.source.critic), "source.critic", "is required for synthetic")
        elif item.source.critic:
            checks.fail("source.critic", "is only allowed for synthetic feedback")
        if item.client_feedback_id is not None:
            checks.text(item.client_feedback_id, "client_feedback_id", max_chars=MAX_ID_CHARS)
        checks.metadata(item.metadata or {}, "metadata")
        checks.done()
        return kind

    async def record_feedback(self, item: FeedbackInput) -> tuple[FeedbackRow, bool]:
        """Record feedback on a generation; a retry with the same client id returns the first."""
        [result] = await self.record_feedback_batch([item])
        if isinstance(result, DomainError):
            raise result
        return result

    async def record_feedback_batch(
        self, items: Sequence[FeedbackInput]
    ) -> list[tuple[FeedbackRow, bool] | DomainError]:
        """Record many feedbacks in one transaction; each item succeeds or fails on its own.

        One commit for the whole batch is what makes ingest fast (group commit): the rows,
        revisions and outbox events of every item are written together, with a handful of
        statements instead of a handful per item.
        """
        results: list[tuple[FeedbackRow, bool] | DomainError | None] = [None] * len(items)
        kinds: dict[int, str] = {}
        for i, item in enumerate(items):
            try:
                kinds[i] = self._check_record(item)
            except DomainError as error:
                results[i] = error
        if kinds:
            done = await _once_despite_races(lambda: self._record_valid(items, kinds))
            results = [done.get(i, r) for i, r in enumerate(results)]
            if any(isinstance(r, tuple) and r[1] for r in results):
                self.on_commit()
        return [r for r in results if r is not None]

    async def _record_valid(
        self, items: Sequence[FeedbackInput], kinds: dict[int, str]
    ) -> dict[int, tuple[FeedbackRow, bool] | DomainError]:
        done: dict[int, tuple[FeedbackRow, bool] | DomainError] = {}
        async with self.sessions() as session, session.begin():
            keys = {
                (items[i].tenant_id, items[i].client_feedback_id)
                for i in kinds
                if items[i].client_feedback_id is not None
            }
            existing: dict[tuple[str, str | None], FeedbackRow] = {}
            if keys:
                found = await session.scalars(
                    select(FeedbackRow).where(
                        tuple_(FeedbackRow.tenant_id, FeedbackRow.client_feedback_id).in_(keys)
                    )
                )
                existing = {(r.tenant_id, r.client_feedback_id): r for r in found}
            wanted = {items[i].generation_id for i in kinds} | {
                items[i].value.preference.generation_b_id
                for i, kind in kinds.items()
                if kind == "preference"
            }
            generations = {
                g.generation_id: g
                for g in await session.scalars(
                    select(GenerationRow).where(GenerationRow.generation_id.in_(wanted))
                )
            }
            now = _now()
            new: list[tuple[FeedbackRow, GenerationRow, GenerationRow | None]] = []
            for i, kind in kinds.items():
                item = items[i]
                key = (item.tenant_id, item.client_feedback_id)
                if item.client_feedback_id is not None and key in existing:
                    done[i] = (existing[key], False)
                    continue
                try:
                    generation, other = _resolve_generations(item, kind, generations)
                except DomainError as error:
                    done[i] = error
                    continue
                row = _new_feedback(item, kind, generation, now)
                if item.client_feedback_id is not None:
                    existing[key] = row  # a later duplicate in this batch gets this row
                new.append((row, generation, other))
                done[i] = (row, True)
            session.add_all([row for row, _, _ in new])
            await session.flush()  # revisions reference the feedback rows
            for row, generation, other in new:
                session.add(
                    FeedbackRevisionRow(
                        feedback_id=row.feedback_id, revision=1, value=row.value, created_at=now
                    )
                )
                self._event(
                    session,
                    row.tenant_id,
                    events.FeedbackRecorded(
                        feedback=mapping.feedback_message(row),
                        generation=mapping.generation_message(generation),
                        generation_b=mapping.generation_message(other) if other else None,
                    ),
                )
        return done

    async def edit_feedback(
        self,
        tenant_id: str,
        feedback_id: str,
        value: pb.FeedbackValue,
        *,
        expected_revision: int | None = None,
        reason: str | None = None,
    ) -> FeedbackRow:
        """Replace a feedback's value with a new revision of the same kind."""
        checks = Checks()
        kind = self._check_value(value, checks)
        checks.done()
        async with self.sessions() as session, session.begin():
            row = await self._scoped_get(session, FeedbackRow, tenant_id, feedback_id, "feedback")
            if row.retracted_at is not None:
                raise Conflict(f"feedback {feedback_id!r} is retracted")
            if expected_revision is not None and expected_revision != row.revision:
                raise Conflict(
                    f"feedback {feedback_id!r} is at revision {row.revision}, "
                    f"not {expected_revision}"
                )
            if kind != row.kind:
                raise InvalidArgument(
                    FieldError("value", f"must stay a {row.kind} (record new feedback instead)")
                )
            generation = await self._scoped_get(
                session, GenerationRow, tenant_id, row.generation_id, "generation"
            )
            other = None
            if kind == "preference":
                other = await self._preference_side_b(
                    session, tenant_id, generation, value.preference.generation_b_id
                )
            previous = mapping.from_json(row.value, pb.FeedbackValue)
            now = _now()
            row.revision += 1
            row.updated_at = now
            _apply_value(row, kind, value)
            session.add(
                FeedbackRevisionRow(
                    feedback_id=row.feedback_id,
                    revision=row.revision,
                    value=row.value,
                    reason=reason,
                    created_at=now,
                )
            )
            self._event(
                session,
                tenant_id,
                events.FeedbackEdited(
                    feedback=mapping.feedback_message(row),
                    previous_value=previous,
                    generation=mapping.generation_message(generation),
                    generation_b=mapping.generation_message(other) if other else None,
                    reason=reason,
                ),
            )
        self.on_commit()
        return row

    async def retract_feedback(
        self, tenant_id: str, feedback_id: str, reason: str | None = None
    ) -> FeedbackRow:
        """Withdraw feedback; retracting twice changes nothing the second time."""
        async with self.sessions() as session, session.begin():
            row = await self._scoped_get(session, FeedbackRow, tenant_id, feedback_id, "feedback")
            if row.retracted_at is not None:
                return row
            row.retracted_at = _now()
            row.updated_at = row.retracted_at
            self._event(
                session,
                tenant_id,
                events.FeedbackRetracted(feedback=mapping.feedback_message(row), reason=reason),
            )
        self.on_commit()
        return row

    async def get_feedback(self, tenant_id: str, feedback_id: str) -> FeedbackRow:
        """One feedback of the tenant, at its current revision."""
        async with self.sessions() as session:
            return await self._scoped_get(session, FeedbackRow, tenant_id, feedback_id, "feedback")

    def _feedback_query(self, tenant_id: str, flt: FeedbackFilter) -> Select[tuple[FeedbackRow]]:
        f = FeedbackRow
        statement = select(f).where(f.tenant_id == tenant_id)
        for name, column in (
            ("task", f.task),
            ("user_id", f.user_id),
            ("generation_id", f.generation_id),
        ):
            if _has(flt, name):
                statement = statement.where(column == getattr(flt, name))
        if flt.HasField("adapter"):
            statement = statement.where(f.adapter_name == flt.adapter.name)
            if flt.adapter.version:
                statement = statement.where(f.adapter_version == flt.adapter.version)
        if flt.kinds:
            statement = statement.where(
                f.kind.in_([mapping.FEEDBACK_KIND_NAMES[k] for k in flt.kinds if k])
            )
        if flt.source_kinds:
            statement = statement.where(
                f.source_kind.in_([mapping.SOURCE_KIND_NAMES[k] for k in flt.source_kinds if k])
            )
        if not flt.include_retracted:
            statement = statement.where(f.retracted_at.is_(None))
        return _time_range(statement, f.created_at, flt)

    async def list_feedback(
        self, tenant_id: str, flt: FeedbackFilter, page_size: int = 0, cursor: str = ""
    ) -> Page[FeedbackRow]:
        """The tenant's feedback matching ``flt``, newest first."""
        async with self.sessions() as session:
            await self._tenant(session, tenant_id)
            return await self._page(
                session,
                self._feedback_query(tenant_id, flt),
                FeedbackRow,
                FeedbackRow.feedback_id,
                page_size,
                cursor,
            )

    async def stats(
        self, tenant_id: str, flt: FeedbackFilter, group_by: Sequence[str]
    ) -> list[dict[str, Any]]:
        """Counts, mean rating, thumbs-down rate and preference win rate per group.

        ``group_by`` holds any of "adapter", "task", "source_kind". The win rate counts, for
        preferences recorded on the group's generations (side A), A wins over A + B wins.
        """
        f = FeedbackRow
        keys: list[Any] = []
        for name in group_by:
            if name == "adapter":
                keys += [f.adapter_name, f.adapter_version]
            elif name == "task":
                keys.append(f.task)
            elif name == "source_kind":
                keys.append(f.source_kind)
        base = self._feedback_query(tenant_id, flt).subquery()
        c = base.c
        columns = [getattr(c, k.key) for k in keys]

        def count_when(condition: Any) -> Any:
            return func.sum(case((condition, 1), else_=0))

        statement = select(
            *columns,
            func.count(func.distinct(c.generation_id)).label("generations"),
            *(count_when(c.kind == kind).label(f"n_{kind}") for kind in mapping.FEEDBACK_KINDS),
            func.avg(c.rating).label("mean_rating"),
            count_when(c.thumbs_up.is_(False)).label("thumbs_down"),
            count_when(c.preference_choice == "a").label("wins"),
            count_when(c.preference_choice == "b").label("losses"),
        ).group_by(*columns)
        async with self.sessions() as session:
            await self._tenant(session, tenant_id)
            result = (await session.execute(statement)).mappings().all()
        buckets = []
        for r in result:
            thumbs = r["n_thumbs"] or 0
            decided = (r["wins"] or 0) + (r["losses"] or 0)
            buckets.append(
                {
                    "task": r.get("task"),
                    "adapter_name": r.get("adapter_name"),
                    "adapter_version": r.get("adapter_version"),
                    "source_kind": r.get("source_kind"),
                    "generations": int(r["generations"]),
                    "count_by_kind": {
                        kind: int(r[f"n_{kind}"] or 0)
                        for kind in mapping.FEEDBACK_KINDS
                        if r[f"n_{kind}"]
                    },
                    "mean_rating": float(r["mean_rating"])
                    if r["mean_rating"] is not None
                    else None,
                    "thumbs_down_rate": (r["thumbs_down"] or 0) / thumbs if thumbs else None,
                    "preference_win_rate": (r["wins"] or 0) / decided if decided else None,
                }
            )
        return buckets

    async def export(
        self, tenant_id: str, flt: FeedbackFilter
    ) -> AsyncIterator[list[tuple[FeedbackRow, GenerationRow]]]:
        """The tenant's feedback with its generation, oldest first, in chunks."""
        async with self.sessions() as session:
            await self._tenant(session, tenant_id)
        after: tuple[datetime, str] | None = None
        while True:
            f = FeedbackRow
            statement = (
                self._feedback_query(tenant_id, flt)
                .add_columns(GenerationRow)
                .join(GenerationRow, GenerationRow.generation_id == f.generation_id)
                .order_by(f.created_at, f.feedback_id)
                .limit(EXPORT_CHUNK_ROWS)
            )
            if after is not None:
                statement = statement.where(
                    or_(
                        f.created_at > after[0],
                        and_(f.created_at == after[0], f.feedback_id > after[1]),
                    )
                )
            async with self.sessions() as session:
                rows = [(fb, gen) for fb, gen in (await session.execute(statement)).all()]
            if not rows:
                return
            yield rows
            last = rows[-1][0]
            after = (last.created_at, last.feedback_id)


@dataclass(frozen=True, slots=True)
class FeedbackInput:
    """What a caller says about a generation (RecordFeedback's fields)."""

    tenant_id: str
    generation_id: str
    value: pb.FeedbackValue
    source: pb.FeedbackSource = field(default_factory=pb.FeedbackSource)
    user_id: str | None = None
    dimension_scores: Sequence[DimensionScore] = ()
    client_feedback_id: str | None = None
    metadata: dict[str, Any] | None = None


def _check_side_b(
    tenant_id: str, generation: GenerationRow, b_id: str, other: GenerationRow | None
) -> None:
    """A preference's side B: another generation of the same tenant and prompt."""
    if b_id == generation.generation_id:
        raise InvalidArgument(
            FieldError("value.preference.generation_b_id", "must differ from generation_id")
        )
    if other is None or other.tenant_id != tenant_id:
        raise NotFound("generation", b_id)
    if other.prompt_hash != generation.prompt_hash:
        raise InvalidArgument(
            FieldError(
                "value.preference.generation_b_id",
                "must be a generation of the same prompt as generation_id",
            )
        )


def _resolve_generations(
    item: FeedbackInput, kind: str, generations: dict[str, GenerationRow]
) -> tuple[GenerationRow, GenerationRow | None]:
    """The judged generation (and side B of a preference), scoped to the item's tenant."""
    generation = generations.get(item.generation_id)
    if generation is None or generation.tenant_id != item.tenant_id:
        raise NotFound("generation", item.generation_id)
    if kind != "preference":
        return generation, None
    b_id = item.value.preference.generation_b_id
    other = generations.get(b_id)
    _check_side_b(item.tenant_id, generation, b_id, other)
    return generation, other


def _new_feedback(
    item: FeedbackInput, kind: str, generation: GenerationRow, now: datetime
) -> FeedbackRow:
    row = FeedbackRow(
        feedback_id=str(uuid.uuid4()),
        tenant_id=item.tenant_id,
        generation_id=item.generation_id,
        source_kind=mapping.SOURCE_KIND_NAMES.get(item.source.kind, "human"),
        critic=item.source.critic,
        user_id=item.user_id,
        dimension_scores=[mapping.to_json(d) for d in item.dimension_scores],
        client_feedback_id=item.client_feedback_id,
        revision=1,
        extra=item.metadata or {},
        task=generation.task,
        adapter_name=generation.adapter_name,
        adapter_version=generation.adapter_version,
        created_at=now,
        updated_at=now,
    )
    _apply_value(row, kind, item.value)
    return row


async def _once_despite_races(create: Callable[[], Awaitable[T]]) -> T:
    """Run ``create``; if a concurrent request inserted the same client id first, run it again.

    The second run finds the row the other request committed and returns it, so a retried
    request never fails and never creates a second record.
    """
    try:
        return await create()
    except IntegrityError:
        return await create()


def _has(message: Message, field: str) -> bool:
    """``HasField`` for a field named at run time (the stubs want a literal)."""
    return bool(message.HasField(field))


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _apply_value(row: FeedbackRow, kind: str, value: pb.FeedbackValue) -> None:
    """Store the value and its query copies (thumbs, rating, preference) on the row."""
    row.kind = kind
    row.value = mapping.to_json(value)
    row.thumbs_up = (value.thumbs == pb.THUMB_UP) if kind == "thumbs" else None
    row.rating = value.rating.value if kind == "rating" else None
    if kind == "preference":
        row.preference_choice = mapping.CHOICE_NAMES[value.preference.choice]
        row.generation_b_id = value.preference.generation_b_id
    else:
        row.preference_choice = None
        row.generation_b_id = None


def _time_range(statement: Select[tuple[Row]], column: Any, flt: Any) -> Select[tuple[Row]]:
    if flt.HasField("created"):
        if flt.created.HasField("start"):
            statement = statement.where(column >= flt.created.start.ToDatetime(UTC))
        if flt.created.HasField("end"):
            statement = statement.where(column < flt.created.end.ToDatetime(UTC))
    return statement
