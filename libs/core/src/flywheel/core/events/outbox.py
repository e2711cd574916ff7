"""The transactional outbox: events are written in the same transaction as the state change.

Nothing is published from inside a request. :func:`add_event` stages an event row in the
caller's session; when that transaction commits, state and event are durable together, and
the relay (:mod:`flywheel.core.events.relay`) publishes the row later. A broker outage
delays events, it never loses them.
"""

from __future__ import annotations

from datetime import datetime

from google.protobuf.message import Message
from sqlalchemy import DateTime, Index, LargeBinary, String, func, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from flywheel.contracts.events.v1.envelope_pb2 import Envelope
from flywheel.core.db import Base, BigId
from flywheel.core.events.envelope import event_options, wrap


class OutboxEvent(Base):
    """An event waiting to be published (``published_at`` null) or kept for a while after."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # The sentinel lets SQLAlchemy send many staged rows as one INSERT on SQLite too.
    event_id: Mapped[str] = mapped_column(String(36), unique=True, insert_sentinel=True)
    topic: Mapped[str] = mapped_column(String(200))
    key: Mapped[str] = mapped_column(String(200))
    event_type: Mapped[str] = mapped_column(String(100))
    value: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        # The relay's scan: unpublished rows in id order. Partial on PostgreSQL and SQLite
        # alike, so the index stays as small as the backlog.
        Index(
            "ix_outbox_pending",
            "id",
            postgresql_where=text("published_at IS NULL"),
            sqlite_where=text("published_at IS NULL"),
        ),
    )


def add_event(
    session: AsyncSession,
    tenant: str,
    payload: Message,
    *,
    source_service: str,
    trace_id: str = "",
) -> Envelope:
    """Stage ``payload`` as an event in ``session``'s transaction; return its envelope.

    Type and topic come from the payload message's ``event`` option.
    """
    envelope = wrap(tenant, payload, source_service=source_service, trace_id=trace_id)
    _type, topic = event_options(payload)
    session.add(
        OutboxEvent(
            event_id=envelope.event_id,
            topic=topic,
            key=tenant,
            event_type=envelope.type,
            value=envelope.SerializeToString(),
        )
    )
    return envelope
