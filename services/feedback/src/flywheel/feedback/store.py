"""The base of the feedback domain's parts: tenant scoping, cursor paging, outbox events.

Every query filters by the tenant it acts for, so one tenant's ids are simply not found
from another (NotFound, never a hint that they exist).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from google.protobuf.message import Message
from sqlalchemy import Select, and_, or_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from flywheel.core.db import SessionFactory
from flywheel.core.errors import NotFound
from flywheel.core.events.outbox import add_event
from flywheel.core.paging import (
    Page,
    decode_cursor,
    encode_cursor,
    page_size_of,
)
from flywheel.feedback.models import (
    ApiKeyRow,
    FeedbackRow,
    GenerationRow,
    TaskTypeRow,
    TenantRow,
    UserRow,
)

SOURCE_SERVICE = "feedback"
EXPORT_CHUNK_ROWS = 500

Row = TypeVar("Row", GenerationRow, FeedbackRow, UserRow, TenantRow, ApiKeyRow, TaskTypeRow)
T = TypeVar("T")


class Store:
    """What every part of the domain shares: sessions, tenant scoping, paging, events."""

    def __init__(
        self,
        sessions: SessionFactory,
        *,
        on_commit: Callable[[], None] = lambda: None,
    ) -> None:
        self.sessions = sessions
        # Called after a transaction with events committed: wakes the outbox relay.
        self.on_commit = on_commit

    async def tenant(self, session: AsyncSession, tenant_id: str) -> TenantRow:
        """The tenant, or NotFound."""
        row = await session.get(TenantRow, tenant_id)
        if row is None:
            raise NotFound("tenant", tenant_id)
        return row

    async def scoped_get(
        self, session: AsyncSession, model: type[Row], tenant_id: str, ident: str, kind: str
    ) -> Row:
        """The tenant's object ``ident`` of ``model``, or NotFound."""
        row = await session.get(model, ident)
        # Another tenant's object answers exactly like a missing one.
        if row is None or row.tenant_id != tenant_id:
            raise NotFound(kind, ident)
        return row

    def event(self, session: AsyncSession, tenant_id: str, payload: Message) -> None:
        """Stage ``payload`` in the outbox of ``session``'s transaction."""
        add_event(session, tenant_id, payload, source_service=SOURCE_SERVICE)

    async def page(
        self,
        session: AsyncSession,
        statement: Select[tuple[Row]],
        model: type[Row],
        id_column: Any,
        page_size: int,
        cursor: str,
    ) -> Page[Row]:
        """One page of ``statement``, newest first, after ``cursor``."""
        size = page_size_of(page_size)
        if cursor:
            created, ident = decode_cursor(cursor)
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
            rows, encode_cursor(last.created_at, getattr(last, id_column.key)) if last else ""
        )


async def once_despite_races(create: Callable[[], Awaitable[T]]) -> T:
    """Run ``create``; if a concurrent request inserted the same client id first, run it again.

    The second run finds the row the other request committed and returns it, so a retried
    request never fails and never creates a second record.
    """
    try:
        return await create()
    except IntegrityError:
        return await create()


def has_field(message: Message, field: str) -> bool:
    """``HasField`` for a field named at run time (the stubs want a literal)."""
    return bool(message.HasField(field))


def as_utc(value: datetime) -> datetime:
    """``value`` with a timezone (SQLite hands back naive datetimes, which are UTC)."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def time_range(statement: Select[tuple[Row]], column: Any, flt: Any) -> Select[tuple[Row]]:
    """``statement`` limited to ``flt.created`` (start inclusive, end exclusive)."""
    if flt.HasField("created"):
        if flt.created.HasField("start"):
            statement = statement.where(column >= flt.created.start.ToDatetime(UTC))
        if flt.created.HasField("end"):
            statement = statement.where(column < flt.created.end.ToDatetime(UTC))
    return statement


def filtered(
    statement: Select[tuple[Row]], model: Any, flt: Any, fields: tuple[str, ...]
) -> Select[tuple[Row]]:
    """``statement`` narrowed by a filter message: equality on ``fields`` that are set, the
    adapter (name, and version if given) and the creation time range."""
    for name in fields:
        if has_field(flt, name):
            statement = statement.where(getattr(model, name) == getattr(flt, name))
    if flt.HasField("adapter"):
        statement = statement.where(model.adapter_name == flt.adapter.name)
        if flt.adapter.version:
            statement = statement.where(model.adapter_version == flt.adapter.version)
    return time_range(statement, model.created_at, flt)
