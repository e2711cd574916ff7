"""The embedded event log: the event bus of the one-machine default, kept in a database.

Records are appended to one table in a single ordered sequence; each consumer group keeps a
committed position per topic. It needs no broker, survives restarts like Kafka does, and
serves one consumer per group (there are no partitions to share out on one machine).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from sqlalchemy import (
    Column,
    DateTime,
    Index,
    LargeBinary,
    MetaData,
    String,
    Table,
    func,
    or_,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from flywheel.core.db import BigId, create_engine
from flywheel.core.events.bus import EventRecord

_metadata = MetaData()

event_log = Table(
    "event_log",
    _metadata,
    Column("position", BigId, primary_key=True, autoincrement=True),
    Column("topic", String(200), nullable=False),
    Column("key", String(200), nullable=False),
    # Unique, so a relay that publishes a row twice (crash before marking it) appends it once.
    Column("event_id", String(36), nullable=False, unique=True),
    Column("event_type", String(100), nullable=False),
    Column("value", LargeBinary, nullable=False),
    Column("appended_at", DateTime(timezone=True), server_default=func.now()),
    Index("ix_event_log_topic_position", "topic", "position"),
)

consumer_offsets = Table(
    "consumer_offsets",
    _metadata,
    Column("consumer_group", String(200), primary_key=True),
    Column("topic", String(200), primary_key=True),
    Column("position", BigId, nullable=False),
)


def _insert_for(engine: AsyncEngine):  # type: ignore[no-untyped-def]
    return postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert


class EmbeddedLogBus:
    """An :class:`~flywheel.core.events.bus.EventBus` over a SQL database (SQLite by default)."""

    def __init__(self, url: str, *, poll_interval_s: float = 0.02) -> None:
        self.url = url
        self.poll_interval_s = poll_interval_s
        self._engine: AsyncEngine | None = None
        self._ready = asyncio.Lock()

    async def engine(self) -> AsyncEngine:
        """The log's engine, creating its tables on first use."""
        async with self._ready:
            if self._engine is None:
                engine = create_engine(self.url)
                async with engine.begin() as conn:
                    await conn.run_sync(_metadata.create_all)
                self._engine = engine
        return self._engine

    async def publish(self, records: Sequence[EventRecord]) -> None:
        """Append ``records`` in one transaction; returns once it has committed."""
        if not records:
            return
        engine = await self.engine()
        rows = [
            {
                "topic": r.topic,
                "key": r.key,
                "event_id": r.event_id,
                "event_type": r.event_type,
                "value": r.value,
            }
            for r in records
        ]
        statement = _insert_for(engine)(event_log).on_conflict_do_nothing(
            index_elements=["event_id"]
        )
        async with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                # Positions come from a sequence, which can commit out of order across
                # writers; a reader past a later position would then skip an earlier one.
                # Appends therefore take turns (SQLite's single writer does this already).
                await conn.execute(text("LOCK TABLE event_log IN EXCLUSIVE MODE"))
            await conn.execute(statement, rows)

    async def subscribe(self, group: str, topics: Sequence[str]) -> EmbeddedSubscription:
        """Read ``topics`` from ``group``'s committed positions onwards."""
        engine = await self.engine()
        async with engine.connect() as conn:
            result = await conn.execute(
                select(consumer_offsets.c.topic, consumer_offsets.c.position).where(
                    consumer_offsets.c.consumer_group == group,
                    consumer_offsets.c.topic.in_(list(topics)),
                )
            )
            committed = {row.topic: row.position for row in result}
        positions = {topic: committed.get(topic, 0) for topic in topics}
        return EmbeddedSubscription(self, engine, group, positions)

    async def close(self) -> None:
        """Dispose of the engine's connections."""
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None


class EmbeddedSubscription:
    """A consumer group's cursor over the embedded log."""

    def __init__(
        self, bus: EmbeddedLogBus, engine: AsyncEngine, group: str, positions: dict[str, int]
    ) -> None:
        self._bus = bus
        self._engine = engine
        self.group = group
        self._consumed = dict(positions)
        self._committed = dict(positions)

    async def poll(self, max_records: int = 500, timeout_s: float = 1.0) -> list[EventRecord]:
        """Next records after what this member has consumed, waiting up to ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            records = await self._fetch(max_records)
            if records or time.monotonic() >= deadline:
                return records
            await asyncio.sleep(
                min(self._bus.poll_interval_s, max(0.0, deadline - time.monotonic()))
            )

    async def _fetch(self, max_records: int) -> list[EventRecord]:
        c = event_log.c
        statement = (
            select(c.position, c.topic, c.key, c.event_id, c.event_type, c.value)
            .where(
                or_(
                    *(
                        (c.topic == topic) & (c.position > position)
                        for topic, position in self._consumed.items()
                    )
                )
            )
            .order_by(c.position)
            .limit(max_records)
        )
        async with self._engine.connect() as conn:
            rows = (await conn.execute(statement)).all()
        records = [
            EventRecord(
                topic=row.topic,
                key=row.key,
                value=row.value,
                event_id=row.event_id,
                event_type=row.event_type,
                offset=row.position,
            )
            for row in rows
        ]
        for record in records:
            self._consumed[record.topic] = record.offset
        return records

    async def commit(self) -> None:
        """Store the consumed positions as the group's committed ones."""
        changed = {
            topic: position
            for topic, position in self._consumed.items()
            if self._committed.get(topic) != position
        }
        if not changed:
            return
        upsert = _insert_for(self._engine)(consumer_offsets)
        statement = upsert.on_conflict_do_update(
            index_elements=["consumer_group", "topic"],
            set_={"position": upsert.excluded.position},
        )
        async with self._engine.begin() as conn:
            await conn.execute(
                statement,
                [
                    {"consumer_group": self.group, "topic": topic, "position": position}
                    for topic, position in changed.items()
                ],
            )
        self._committed.update(changed)

    async def close(self) -> None:
        """Forget uncommitted progress; a new subscription resumes from the committed one."""
        self._consumed = dict(self._committed)
