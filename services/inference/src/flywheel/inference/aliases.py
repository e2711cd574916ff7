"""Aliases at rest: every change is a new revision, recorded in the alias's history.

Each change locks the alias, checks that the adapters it names are registered for the
tenant and not rejected, bumps the revision and appends the revision to
``alias_revisions``, all in one transaction. Promote and Rollback also stage
``adapter.promoted`` in that transaction (outbox); replicas ignore such events when they
are not newer than the revision they hold.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC
from typing import TypeVar

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from flywheel.contracts.common.v1.common_pb2 import AdapterRef
from flywheel.contracts.inference.v1 import events_pb2 as ie
from flywheel.contracts.inference.v1 import resources_pb2 as ri
from flywheel.core.db import SessionFactory
from flywheel.core.errors import Conflict, FieldError, InvalidArgument, NotFound
from flywheel.core.events.outbox import add_event
from flywheel.core.paging import Page, newest_first_page, utcnow
from flywheel.inference.models import AliasRevisionRow, AliasRow
from flywheel.inference.registry import SOURCE_SERVICE, require_usable
from flywheel.inference.routing import (
    ADAPTER_NAME,
    ADAPTER_VERSION,
    ALIAS_SEGMENT,
    AliasState,
    Arm,
    WeightedRef,
    adapters_of,
    arm_to_proto,
    arms_from_json,
    arms_to_json,
    check_alias_name,
    single_adapter,
    validate_arm,
    validate_arms,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
# Label of the single arm a promotion leaves, unless an arm already served that version.
PROMOTED_LABEL = "promoted"
# Attempts of a change that raced another creator of the same alias (unique violation).
ATTEMPTS = 3
# Revisions are stored as INTEGER; an event claiming more is not ours to apply.
MAX_REVISION = 2**31 - 1


def _nothing() -> None:
    """Default ``on_commit``: nobody to wake."""


def state_of(row: AliasRow) -> AliasState:
    # SQLite hands timestamps back naive; they were written in UTC.
    updated = row.updated_at
    if updated.tzinfo is None:
        updated = updated.replace(tzinfo=UTC)
    return AliasState(
        tenant=row.tenant_id, name=row.name, arms=arms_from_json(row.arms),
        sticky=row.sticky, revision=row.revision, updated_at=updated,
    )  # fmt: skip


def to_proto(state: AliasState) -> ri.Alias:
    """The alias as the API shows it: name qualified as ``<tenant>/<name>``."""
    message = ri.Alias(
        tenant_id=state.tenant, name=state.qualified_name,
        arms=[arm_to_proto(a) for a in state.arms], sticky=state.sticky, revision=state.revision,
    )  # fmt: skip
    if state.updated_at is not None:
        message.updated_at.FromDatetime(state.updated_at)
    return message


def _promoted_arm(previous: Sequence[Arm], ref: WeightedRef) -> Arm:
    """The one arm routing everything to ``ref``; it keeps the label of the arm that
    served exactly that version, so generation logs stay continuous across a promotion."""
    target = WeightedRef(ref.name, ref.version, 1.0)
    for arm in previous:
        if len(arm.adapters) == 1 and arm.adapters[0].key == target.key:
            return Arm(arm.label, 1.0, (target,))
    return Arm(PROMOTED_LABEL, 1.0, (target,))


def _check_ref(ref: WeightedRef | AdapterRef, field: str = "adapter") -> WeightedRef:
    if not (ADAPTER_NAME.match(ref.name) and ADAPTER_VERSION.match(ref.version)):
        raise InvalidArgument(FieldError(field, "must name an adapter version"))
    return WeightedRef(ref.name, ref.version, 1.0)


class AliasStore:
    """A tenant's aliases and their revision history."""

    def __init__(
        self, sessions: SessionFactory, *, on_commit: Callable[[], None] = _nothing
    ) -> None:
        # ``on_commit`` wakes the outbox relay after a transaction that staged an event.
        self.sessions = sessions
        self.on_commit = on_commit

    # --- transaction plumbing ---------------------------------------------------------

    async def _transaction(self, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """``work`` in one transaction, again when a concurrent first write of the same
        alias (or revision) won the race: the retry then sees and locks its row."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                async with self.sessions() as session, session.begin():
                    return await work(session)
            except IntegrityError:
                if attempt == ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    @staticmethod
    async def _locked(
        session: AsyncSession, tenant_id: str, name: str
    ) -> tuple[AliasRow | None, int]:
        """The alias row, locked, and the newest revision the name ever had (0: none)."""
        row = await session.get(AliasRow, (tenant_id, name), with_for_update=True)
        h = AliasRevisionRow
        last = await session.scalar(
            select(func.max(h.revision)).where(h.tenant_id == tenant_id, h.name == name)
        )
        return row, int(last or 0)

    @staticmethod
    def _write(
        session: AsyncSession, row: AliasRow | None, tenant_id: str, name: str,
        arms: Sequence[Arm], sticky: bool, reason: str, revision: int,
    ) -> AliasState:  # fmt: skip
        """Make ``arms`` the alias's revision ``revision`` and record it in the history."""
        now = utcnow()
        stored = arms_to_json(arms)
        if row is None:
            row = AliasRow(tenant_id=tenant_id, name=name, created_at=now)
            session.add(row)
        row.arms, row.sticky, row.revision, row.updated_at = stored, sticky, revision, now
        session.add(AliasRevisionRow(
            tenant_id=tenant_id, name=name, revision=revision, arms=stored, sticky=sticky,
            reason=reason, created_at=now,
        ))  # fmt: skip
        return state_of(row)

    @staticmethod
    def _announce(
        session: AsyncSession, state: AliasState, previous: Sequence[Arm], reason: str,
        *, rollback: bool,
    ) -> None:  # fmt: skip
        """Stage ``adapter.promoted``; ``adapter`` is set when one version gets everything."""
        event = ie.AdapterPromoted(
            tenant_id=state.tenant, alias=state.name,
            previous_arms=[arm_to_proto(a) for a in previous],
            alias_revision=state.revision, reason=reason, rollback=rollback,
        )  # fmt: skip
        target = single_adapter(state.arms)
        if target is not None:
            event.adapter.CopyFrom(AdapterRef(name=target.name, version=target.version))
        add_event(session, state.tenant, event, source_service=SOURCE_SERVICE)

    # --- changes --------------------------------------------------------------------------

    async def set_alias(
        self, tenant_id: str, name: str, target: Arm, *, sticky: bool = False, reason: str = ""
    ) -> AliasState:
        """Point the alias at one target (all its traffic), creating it if needed."""
        check_alias_name(name)
        validate_arm(target)

        async def work(session: AsyncSession) -> AliasState:
            row, last = await self._locked(session, tenant_id, name)
            await require_usable(session, tenant_id, target.adapters)
            return self._write(session, row, tenant_id, name, (target,), sticky, reason, last + 1)

        return await self._transaction(work)

    async def set_split(
        self, tenant_id: str, name: str, arms: Sequence[Arm], *, sticky: bool = False,
        expected_revision: int | None = None, reason: str = "",
    ) -> AliasState:  # fmt: skip
        """Replace the alias's arms (creating it if needed). With ``expected_revision``,
        refuse with `Conflict` when someone changed it since (0: it must not exist)."""
        check_alias_name(name)
        validate_arms(arms)
        arms = tuple(arms)

        async def work(session: AsyncSession) -> AliasState:
            row, last = await self._locked(session, tenant_id, name)
            current = row.revision if row is not None else 0
            if expected_revision is not None and expected_revision != current:
                raise Conflict(
                    f"alias {tenant_id}/{name} is at revision {current}, not {expected_revision}"
                )
            await require_usable(session, tenant_id, adapters_of(arms))
            return self._write(session, row, tenant_id, name, arms, sticky, reason, last + 1)

        return await self._transaction(work)

    async def promote(
        self, tenant_id: str, name: str, ref: WeightedRef | AdapterRef, reason: str = ""
    ) -> AliasState:
        """Send all of an existing alias's traffic to one version; stage adapter.promoted."""
        check_alias_name(name)
        target = _check_ref(ref)

        async def work(session: AsyncSession) -> AliasState:
            row, last = await self._locked(session, tenant_id, name)
            if row is None:
                raise NotFound("alias", f"{tenant_id}/{name}")
            await require_usable(session, tenant_id, [target])
            previous = arms_from_json(row.arms)
            arms = (_promoted_arm(previous, target),)
            state = self._write(session, row, tenant_id, name, arms, row.sticky, reason, last + 1)
            self._announce(session, state, previous, reason, rollback=False)
            return state

        state = await self._transaction(work)
        self.on_commit()
        return state

    async def rollback(self, tenant_id: str, name: str, reason: str = "") -> AliasState:
        """Restore the arms of the revision before the current one, as a new revision
        (revisions only increase: rolling back twice returns to where it started)."""
        check_alias_name(name)

        async def work(session: AsyncSession) -> AliasState:
            row, last = await self._locked(session, tenant_id, name)
            if row is None:
                raise NotFound("alias", f"{tenant_id}/{name}")
            h = AliasRevisionRow
            earlier = (
                await session.scalars(
                    select(h)
                    .where(h.tenant_id == tenant_id, h.name == name, h.revision < row.revision)
                    .order_by(h.revision.desc())
                    .limit(1)
                )
            ).first()
            # No arms: the alias was deleted then; what came before is not this alias's past.
            if earlier is None or not earlier.arms:
                raise Conflict(f"alias {tenant_id}/{name} has no earlier revision to restore")
            arms = arms_from_json(earlier.arms)
            await require_usable(session, tenant_id, adapters_of(arms))
            previous = arms_from_json(row.arms)
            state = self._write(session, row, tenant_id, name, arms, earlier.sticky, reason,
                                last + 1)  # fmt: skip
            self._announce(session, state, previous, reason, rollback=True)
            return state

        state = await self._transaction(work)
        self.on_commit()
        return state

    async def delete(self, tenant_id: str, name: str, reason: str = "") -> None:
        """Remove the alias; its history stays, ending in a revision with no arms."""
        check_alias_name(name)

        async def work(session: AsyncSession) -> None:
            row, last = await self._locked(session, tenant_id, name)
            if row is None:
                raise NotFound("alias", f"{tenant_id}/{name}")
            session.add(AliasRevisionRow(
                tenant_id=tenant_id, name=name, revision=last + 1, arms=[], sticky=False,
                reason=reason, created_at=utcnow(),
            ))  # fmt: skip
            await session.delete(row)

        await self._transaction(work)

    async def apply_promoted_event(self, event: ie.AdapterPromoted) -> bool:
        """Apply ``adapter.promoted`` published by anyone; True if it changed the alias.

        Events not newer than what the alias (or its deletion) is at are ignored, as are
        ones this store cannot act on (no adapter, an unknown or rejected version): an
        event consumer must not block on them, so they are logged, not raised.
        """
        tenant_id = event.tenant_id
        name = event.alias.removeprefix(f"{tenant_id}/")
        usable = (
            ALIAS_SEGMENT.match(tenant_id) and ALIAS_SEGMENT.match(name)
            and event.HasField("adapter") and 0 < event.alias_revision <= MAX_REVISION
        )  # fmt: skip
        if not usable:
            log.warning("ignoring adapter.promoted for %r/%r: not applicable", tenant_id, name)
            return False
        target = WeightedRef(event.adapter.name, event.adapter.version, 1.0)

        async def work(session: AsyncSession) -> bool:
            row, last = await self._locked(session, tenant_id, name)
            if event.alias_revision <= last:
                return False
            try:
                await require_usable(session, tenant_id, [target])
            except (NotFound, Conflict) as error:
                log.warning("ignoring adapter.promoted for %s/%s: %s", tenant_id, name, error)
                return False
            previous = arms_from_json(row.arms) if row is not None else ()
            sticky = row.sticky if row is not None else False
            # Take the publisher's revision, so every replica's numbering agrees with it.
            self._write(session, row, tenant_id, name, (_promoted_arm(previous, target),),
                        sticky, event.reason, int(event.alias_revision))  # fmt: skip
            return True

        return await self._transaction(work)

    # --- reads ----------------------------------------------------------------------------

    async def get(self, tenant_id: str, name: str) -> AliasState:
        """The alias; `NotFound` outside its tenant."""
        async with self.sessions() as session:
            row = await session.get(AliasRow, (tenant_id, name))
        if row is None:
            raise NotFound("alias", f"{tenant_id}/{name}")
        return state_of(row)

    async def list(
        self, tenant_id: str, *, page_size: int = 0, cursor: str = ""
    ) -> Page[AliasState]:
        """The tenant's aliases, newest first."""
        a = AliasRow
        async with self.sessions() as session:
            rows, next_cursor = await newest_first_page(
                session, select(a).where(a.tenant_id == tenant_id), created=a.created_at,
                ident=a.name, position_of=lambda r: (r.created_at, r.name),
                page_size=page_size, cursor=cursor,
            )  # fmt: skip
        return Page([state_of(r) for r in rows], next_cursor)
