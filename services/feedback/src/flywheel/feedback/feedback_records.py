"""Feedback: recording (in batches, one commit), editing as revisions, retracting, listing."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Select, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from flywheel.contracts.common.v1.common_pb2 import DimensionScore
from flywheel.contracts.feedback.v1 import events_pb2 as events
from flywheel.contracts.feedback.v1 import resources_pb2 as pb
from flywheel.contracts.feedback.v1.service_pb2 import (
    FeedbackFilter,
)
from flywheel.core.errors import (
    Conflict,
    DomainError,
    FieldError,
    InvalidArgument,
    NotFound,
)
from flywheel.core.paging import Page, utcnow
from flywheel.feedback import mapping
from flywheel.feedback.models import (
    FeedbackRevisionRow,
    FeedbackRow,
    GenerationRow,
)
from flywheel.feedback.store import (
    Store,
    filtered,
    once_despite_races,
)
from flywheel.feedback.validation import (
    MAX_COMMENT_CHARS,
    MAX_ID_CHARS,
    MAX_OUTPUT_CHARS,
    Checks,
)


class FeedbackRecords(Store):
    """Recording, editing, retracting and listing feedback."""

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
            done = await once_despite_races(lambda: self._record_valid(items, kinds))
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
            now = utcnow()
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
                self.event(
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
            row = await self.scoped_get(session, FeedbackRow, tenant_id, feedback_id, "feedback")
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
            generation = await self.scoped_get(
                session, GenerationRow, tenant_id, row.generation_id, "generation"
            )
            other = None
            if kind == "preference":
                other = await self._preference_side_b(
                    session, tenant_id, generation, value.preference.generation_b_id
                )
            previous = mapping.from_json(row.value, pb.FeedbackValue)
            now = utcnow()
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
            self.event(
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
            row = await self.scoped_get(session, FeedbackRow, tenant_id, feedback_id, "feedback")
            if row.retracted_at is not None:
                return row
            row.retracted_at = utcnow()
            row.updated_at = row.retracted_at
            self.event(
                session,
                tenant_id,
                events.FeedbackRetracted(feedback=mapping.feedback_message(row), reason=reason),
            )
        self.on_commit()
        return row

    async def get_feedback(self, tenant_id: str, feedback_id: str) -> FeedbackRow:
        """One feedback of the tenant, at its current revision."""
        async with self.sessions() as session:
            return await self.scoped_get(session, FeedbackRow, tenant_id, feedback_id, "feedback")

    async def list_feedback(
        self, tenant_id: str, flt: FeedbackFilter, page_size: int = 0, cursor: str = ""
    ) -> Page[FeedbackRow]:
        """The tenant's feedback matching ``flt``, newest first."""
        async with self.sessions() as session:
            await self.tenant(session, tenant_id)
            return await self.page(
                session,
                feedback_query(tenant_id, flt),
                FeedbackRow,
                FeedbackRow.feedback_id,
                page_size,
                cursor,
            )


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


def feedback_query(tenant_id: str, flt: FeedbackFilter) -> Select[tuple[FeedbackRow]]:
    """The tenant's feedback that ``flt`` selects (retracted only if it asks)."""
    f = FeedbackRow
    statement = filtered(
        select(f).where(f.tenant_id == tenant_id), f, flt, ("task", "user_id", "generation_id")
    )
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
    return statement
