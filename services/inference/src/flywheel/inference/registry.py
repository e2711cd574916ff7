"""The adapter registry: which adapter versions the fleet knows and whether they may serve.

A (tenant, name, version) is immutable: registering it again with the same content is a
no-op, with other content a `Conflict`. Marking a version REJECTED stages
``adapter.rejected`` in the same transaction (outbox), so the event says exactly what the
table says.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

from google.protobuf import json_format
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from flywheel.contracts.common.v1.common_pb2 import AdapterRef
from flywheel.contracts.inference.v1 import events_pb2 as ie
from flywheel.contracts.inference.v1 import resources_pb2 as ri
from flywheel.contracts.trainer.v1 import resources_pb2 as tr
from flywheel.core.db import SessionFactory
from flywheel.core.errors import Conflict, FieldError, InvalidArgument, NotFound
from flywheel.core.events.outbox import add_event
from flywheel.core.paging import Page, newest_first_page, utcnow
from flywheel.inference.models import RegisteredAdapterRow
from flywheel.inference.routing import (
    ADAPTER_NAME,
    ADAPTER_VERSION,
    MAX_COMPONENTS,
    WeightedRef,
    ref_to_proto,
)

SOURCE_SERVICE = "inference"
REJECTED = ri.ADAPTER_STATUS_REJECTED
MAX_REJECT_CODE_CHARS = 63


def _nothing() -> None:
    """Default ``on_commit``: nobody to wake."""


def content_digest(manifest: tr.AdapterManifest) -> str:
    """What makes a version's weights what they are: the artifact's and every file's sha256.

    Metrics, URIs and timestamps are left out, so a replay of the same adapter (from
    another store, say) registers as the same version.
    """
    files = sorted((f.path, f.sha256, f.size_bytes) for f in manifest.files)
    canonical = json.dumps({"artifact": manifest.artifact.sha256, "files": files})
    return hashlib.sha256(canonical.encode()).hexdigest()


def manifest_of(row: RegisteredAdapterRow) -> tr.AdapterManifest:
    return json_format.ParseDict(row.manifest, tr.AdapterManifest())


def components_of(row: RegisteredAdapterRow) -> tuple[WeightedRef, ...]:
    return tuple(
        WeightedRef(str(c["name"]), str(c["version"]), float(c["weight"]))
        for c in row.components or ()
    )


def _components_json(components: Iterable[WeightedRef]) -> list[dict[str, Any]]:
    return [{"name": c.name, "version": c.version, "weight": c.weight} for c in components]


def to_proto(
    row: RegisteredAdapterRow, *, loaded_replicas: int = 0, total_replicas: int = 0
) -> ri.RegisteredAdapter:
    """The registry entry as the API shows it; replica counts come from the fleet."""
    message = ri.RegisteredAdapter(
        manifest=manifest_of(row),
        status=row.status,  # type: ignore[arg-type]
        reject_reason=row.reject_reason,
        loaded_replicas=loaded_replicas,
        total_replicas=total_replicas,
        components=[ref_to_proto(c) for c in components_of(row)],
    )
    message.registered_at.FromDatetime(row.registered_at)
    if row.last_used_at is not None:
        message.last_used_at.FromDatetime(row.last_used_at)
    return message


def _check_manifest(
    tenant_id: str, manifest: tr.AdapterManifest, components: Sequence[WeightedRef]
) -> None:
    errors: list[FieldError] = []
    if not ADAPTER_NAME.match(manifest.adapter.name):
        errors.append(FieldError("manifest.adapter.name", "letters, digits, '.', '_', '-' only"))
    if not ADAPTER_VERSION.match(manifest.adapter.version):
        errors.append(FieldError("manifest.adapter.version", "1-40 letters, digits, '.', '_', '-'"))
    if manifest.tenant_id and manifest.tenant_id != tenant_id:
        errors.append(FieldError("manifest.tenant_id", "is another tenant's"))
    if len(components) > MAX_COMPONENTS:
        errors.append(FieldError("components", f"at most {MAX_COMPONENTS}"))
    for i, c in enumerate(components):
        if not (ADAPTER_NAME.match(c.name) and ADAPTER_VERSION.match(c.version)):
            errors.append(FieldError(f"components[{i}].adapter", "is not an adapter version"))
        if not (math.isfinite(c.weight) and c.weight > 0):
            errors.append(FieldError(f"components[{i}].weight", "must be positive and finite"))
    if errors:
        raise InvalidArgument(errors)


async def require_usable(
    session: AsyncSession, tenant_id: str, refs: Iterable[WeightedRef | AdapterRef]
) -> None:
    """Raise unless every ref is registered for ``tenant_id`` and not rejected.

    Run inside the transaction that starts routing to them, so the check and the change
    see the same registry.
    """
    for ref in refs:
        row = await session.get(RegisteredAdapterRow, (tenant_id, ref.name, ref.version))
        if row is None:
            raise NotFound("adapter", f"{ref.name}@{ref.version}")
        if row.status == REJECTED:
            raise Conflict(
                f"adapter {ref.name}@{ref.version} was rejected ({row.reject_code}: "
                f"{row.reject_reason}) and cannot be routed to"
            )


class AdapterRegistry:
    """Registered adapter versions, within one tenant (and across them for replicas)."""

    def __init__(
        self, sessions: SessionFactory, *, on_commit: Callable[[], None] = _nothing
    ) -> None:
        # ``on_commit`` wakes the outbox relay after a transaction that staged an event.
        self.sessions = sessions
        self.on_commit = on_commit

    async def register(
        self,
        tenant_id: str,
        manifest: tr.AdapterManifest,
        components: Sequence[WeightedRef] = (),
    ) -> tuple[ri.RegisteredAdapter, bool]:
        """Register a version as REGISTERED; the entry and whether it is new.

        The same (name, version) again with the same content returns the existing entry,
        whatever its status; with other content it is a `Conflict` (versions are immutable).
        """
        _check_manifest(tenant_id, manifest, components)
        stored = tr.AdapterManifest()
        stored.CopyFrom(manifest)
        stored.tenant_id = tenant_id
        ref = stored.adapter
        row = RegisteredAdapterRow(
            tenant_id=tenant_id, name=ref.name, version=ref.version,
            manifest=json_format.MessageToDict(stored, preserving_proto_field_name=True),
            status=ri.ADAPTER_STATUS_REGISTERED, reject_code="", reject_reason="",
            components=_components_json(components), registered_at=utcnow(), last_used_at=None,
        )  # fmt: skip
        existing = await self._get_row(tenant_id, ref.name, ref.version)
        if existing is None:
            try:
                async with self.sessions() as session, session.begin():
                    session.add(row)
            except IntegrityError:
                # A concurrent register of the same version won: compare with its content.
                existing = await self._get_row(tenant_id, ref.name, ref.version)
                if existing is None:
                    raise
            else:
                return to_proto(row), True
        same_weights = content_digest(manifest_of(existing)) == content_digest(stored)
        if not same_weights or components_of(existing) != tuple(components):
            raise Conflict(
                f"adapter {ref.name}@{ref.version} is already registered with other content; "
                "versions are immutable, publish a new version"
            )
        return to_proto(existing), False

    async def _get_row(
        self, tenant_id: str, name: str, version: str
    ) -> RegisteredAdapterRow | None:
        async with self.sessions() as session:
            row: RegisteredAdapterRow | None = await session.get(
                RegisteredAdapterRow, (tenant_id, name, version)
            )
            return row

    async def get(self, tenant_id: str, name: str, version: str) -> ri.RegisteredAdapter:
        """One version's entry; `NotFound` outside its tenant."""
        row = await self._get_row(tenant_id, name, version)
        if row is None:
            raise NotFound("adapter", f"{name}@{version}")
        return to_proto(row)

    async def list(
        self,
        tenant_id: str,
        *,
        statuses: Sequence[int] = (),
        page_size: int = 0,
        cursor: str = "",
    ) -> Page[ri.RegisteredAdapter]:
        """The tenant's versions, newest first, optionally only those in ``statuses``."""
        a = RegisteredAdapterRow
        statement = select(a).where(a.tenant_id == tenant_id)
        if statuses:
            statement = statement.where(a.status.in_(list(statuses)))
        async with self.sessions() as session:
            rows, next_cursor = await newest_first_page(
                session, statement, created=a.registered_at, ident=a.name + "@" + a.version,
                position_of=lambda r: (r.registered_at, f"{r.name}@{r.version}"),
                page_size=page_size, cursor=cursor,
            )  # fmt: skip
        return Page([to_proto(r) for r in rows], next_cursor)

    async def set_status(
        self,
        tenant_id: str,
        name: str,
        version: str,
        status: int,
        *,
        reject_code: str = "",
        reject_reason: str = "",
    ) -> ri.RegisteredAdapter:
        """Move a version to ``status``. Rejecting it stages ``adapter.rejected`` with the
        change; a rejected version stays rejected (it is never served)."""
        if status not in ri.AdapterStatus.values() or status == ri.ADAPTER_STATUS_UNSPECIFIED:
            raise InvalidArgument(FieldError("status", "is not an adapter status"))
        if status == REJECTED and not reject_code:
            raise InvalidArgument(FieldError("reject_code", "is required to reject"))
        if len(reject_code) > MAX_REJECT_CODE_CHARS:
            raise InvalidArgument(
                FieldError("reject_code", f"must be at most {MAX_REJECT_CODE_CHARS} chars")
            )
        async with self.sessions() as session, session.begin():
            row = await session.get(
                RegisteredAdapterRow, (tenant_id, name, version), with_for_update=True
            )
            if row is None:
                raise NotFound("adapter", f"{name}@{version}")
            if row.status == REJECTED:
                if status != REJECTED:
                    raise Conflict(f"adapter {name}@{version} was rejected; it is never served")
                # Rejected again (a redelivered event, a retry): announced once already.
                return to_proto(row)
            row.status = status
            row.reject_code = reject_code if status == REJECTED else ""
            row.reject_reason = reject_reason if status == REJECTED else ""
            if status == REJECTED:
                event = ie.AdapterRejected(
                    tenant_id=tenant_id, adapter=AdapterRef(name=name, version=version),
                    reason_code=reject_code, reason=reject_reason,
                )  # fmt: skip
                add_event(session, tenant_id, event, source_service=SOURCE_SERVICE)
            message = to_proto(row)
        if status == REJECTED:
            self.on_commit()
        return message

    async def reject_unregistrable(
        self, tenant_id: str, adapter: AdapterRef, reason_code: str, reason: str
    ) -> None:
        """Announce ``adapter.rejected`` for a published adapter that cannot even be
        registered (an unsafe name): there is no row to mark, but its publisher must learn."""
        async with self.sessions() as session, session.begin():
            event = ie.AdapterRejected(
                tenant_id=tenant_id, adapter=adapter, reason_code=reason_code, reason=reason
            )
            add_event(session, tenant_id, event, source_service=SOURCE_SERVICE)
        self.on_commit()

    async def mark_used(
        self, tenant_id: str, name: str, version: str, *, at: datetime | None = None
    ) -> None:
        """Record that the version just served a request (for eviction and listings)."""
        a = RegisteredAdapterRow
        statement = (
            update(a)
            .where(a.tenant_id == tenant_id, a.name == name, a.version == version)
            .values(last_used_at=at or utcnow())
        )
        async with self.sessions() as session, session.begin():
            result = await session.execute(statement)
        if not result.rowcount:  # type: ignore[attr-defined]
            raise NotFound("adapter", f"{name}@{version}")

    async def routable(self, tenant_id: str | None = None) -> builtins.list[ri.RegisteredAdapter]:
        """Every ROUTABLE version (of one tenant, or all): what a replica loads on start."""
        a = RegisteredAdapterRow
        statement = select(a).where(a.status == ri.ADAPTER_STATUS_ROUTABLE)
        if tenant_id is not None:
            statement = statement.where(a.tenant_id == tenant_id)
        statement = statement.order_by(a.tenant_id, a.name, a.version)
        async with self.sessions() as session:
            rows = (await session.scalars(statement)).all()
        return [to_proto(r) for r in rows]
