"""A consumer process with a countable, idempotent effect, for crash and outage tests.

    python -m flywheel.core.testing.effect_consumer --db URL --bus embedded|kafka
        --bus-url URL_OR_BOOTSTRAP --group G --topic T [--effect-delay-s S]

Each record is applied in a transaction of its own: the event is claimed
(:func:`~flywheel.core.events.inbox.claim_events`) and, if new, one row is appended to
``effect_applications``. Offsets are committed per batch, after all its effects. Killing
the process mid-batch therefore leaves effects applied but uncommitted: on restart the batch
comes again, and a correct consumer applies none of it twice (one row per event).
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from flywheel.core.db import create_engine, session_factory
from flywheel.core.events.bus import EventBus, EventRecord
from flywheel.core.events.consumer import run_consumer
from flywheel.core.events.embedded import EmbeddedLogBus
from flywheel.core.events.inbox import claim_events
from flywheel.core.events.kafka import KafkaBus
from flywheel.core.migrations import upgrade

effects_metadata = MetaData()
effect_applications = Table(
    "effect_applications",
    effects_metadata,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    # Not unique on purpose: a duplicate effect must be visible, not rejected.
    Column("event_id", String(36), nullable=False),
)


async def prepare(engine: AsyncEngine) -> None:
    """Create core tables and the effect table."""
    await upgrade(engine, None, [])
    async with engine.begin() as conn:
        await conn.run_sync(effects_metadata.create_all)


async def count_effects(engine: AsyncEngine) -> tuple[int, int]:
    """(effects applied, distinct events applied)."""
    async with engine.connect() as conn:
        total = await conn.scalar(select(func.count()).select_from(effect_applications))
        distinct = await conn.scalar(
            select(func.count(func.distinct(effect_applications.c.event_id)))
        )
    return int(total or 0), int(distinct or 0)


async def consume(
    db_url: str, bus: EventBus, group: str, topic: str, effect_delay_s: float, stop: asyncio.Event
) -> None:
    """Apply every record of ``topic`` once, as ``group``, until ``stop``."""
    engine = create_engine(db_url)
    await prepare(engine)
    sessions = session_factory(engine)

    async def handle(records: list[EventRecord]) -> None:
        for record in records:
            async with sessions() as session, session.begin():
                if await claim_events(session, group, [record.event_id]):
                    await session.execute(
                        effect_applications.insert().values(event_id=record.event_id)
                    )
            if effect_delay_s:
                await asyncio.sleep(effect_delay_s)

    try:
        await run_consumer(bus, group, [topic], handle, stop, max_records=100)
    finally:
        await bus.close()
        await engine.dispose()


def main() -> None:
    """Parse arguments and consume until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--bus", choices=["embedded", "kafka"], required=True)
    parser.add_argument("--bus-url", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--effect-delay-s", type=float, default=0.0)
    args = parser.parse_args()

    async def run() -> None:
        bus: EventBus = (
            KafkaBus(args.bus_url) if args.bus == "kafka" else EmbeddedLogBus(args.bus_url)
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await consume(args.db, bus, args.group, args.topic, args.effect_delay_s, stop)

    asyncio.run(run())


if __name__ == "__main__":
    main()
