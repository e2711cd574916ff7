"""Idempotent consumption: a consumer group's record of the events it has applied.

Claim an event in the same transaction as its effect. A redelivered event (the consumer
died after the effect but before committing its offset, or the relay published twice) finds
its claim already there and is skipped: at-least-once delivery, exactly-once effect.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import DateTime, String, func
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from flywheel.core.db import Base, insert_ignoring_conflicts


class ProcessedEvent(Base):
    """One event applied by one consumer group."""

    __tablename__ = "processed_events"

    consumer_group: Mapped[str] = mapped_column(String(200), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    processed_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )


async def claim_events(session: AsyncSession, group: str, event_ids: Iterable[str]) -> set[str]:
    """Record ``event_ids`` as applied by ``group``; return those not claimed before.

    Call it inside the transaction that applies the effects, and apply each returned id
    once: a batch may hold the same event twice (a relay republished it), and only one of
    those deliveries may take effect.
    """
    rows = [{"consumer_group": group, "event_id": eid} for eid in dict.fromkeys(event_ids)]
    if not rows:
        return set()
    # Rows as parameters, not .values(rows): the statement stays the same, so it is cached.
    statement = insert_ignoring_conflicts(session, ProcessedEvent).returning(
        ProcessedEvent.event_id
    )
    result = await session.execute(statement, rows)
    return set(result.scalars())
