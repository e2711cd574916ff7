"""The outbox commits with the state change; the relay publishes committed rows in order."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from flywheel.contracts.feedback.v1.events_pb2 import FeedbackRecorded, GenerationLogged
from flywheel.contracts.feedback.v1.resources_pb2 import Feedback
from flywheel.core.db import session_factory
from flywheel.core.events.bus import EventRecord, Subscription
from flywheel.core.events.envelope import parse, unpack, wrap
from flywheel.core.events.outbox import OutboxEvent, add_event
from flywheel.core.events.relay import OutboxRelay


class RecordingBus:
    """A bus that keeps what it is given and can be told to fail, like a broker outage."""

    def __init__(self) -> None:
        self.published: list[EventRecord] = []
        self.down = False

    async def publish(self, records: Sequence[EventRecord]) -> None:
        if self.down:
            raise ConnectionError("broker unavailable")
        self.published.extend(records)

    async def subscribe(self, group: str, topics: Sequence[str]) -> Subscription:
        raise NotImplementedError("the relay never subscribes")

    async def close(self) -> None:
        pass


def _feedback(i: int) -> FeedbackRecorded:
    return FeedbackRecorded(feedback=Feedback(feedback_id=f"fb-{i}"))


async def _pending(engine: AsyncEngine) -> int:
    async with session_factory(engine)() as session:
        count = await session.scalar(
            select(func.count()).select_from(OutboxEvent).where(OutboxEvent.published_at.is_(None))
        )
    return int(count or 0)


async def test_a_rolled_back_transaction_leaves_no_event(engine: AsyncEngine) -> None:
    sessions = session_factory(engine)

    async def failing_change() -> None:
        async with sessions() as session, session.begin():
            add_event(session, "acme", _feedback(1), source_service="test")
            raise RuntimeError("the state change failed")

    with pytest.raises(RuntimeError):
        await failing_change()
    bus = RecordingBus()
    assert await OutboxRelay(sessions, bus).drain() == 0
    assert bus.published == []


async def test_relay_publishes_in_commit_order_once(engine: AsyncEngine) -> None:
    sessions = session_factory(engine)
    staged = []
    for batch in range(3):
        async with sessions() as session, session.begin():
            for i in range(4):
                staged.append(
                    add_event(session, f"t{i % 2}", _feedback(batch * 4 + i), source_service="t")
                )
    bus = RecordingBus()
    relay = OutboxRelay(sessions, bus, batch_size=5)
    assert await relay.drain() == 12
    assert await relay.drain() == 0  # marked published: never sent twice by the relay
    assert [r.event_id for r in bus.published] == [e.event_id for e in staged]
    first = bus.published[0]
    assert (first.topic, first.event_type, first.key) == (
        "flywheel.feedback.v1",
        "feedback.recorded",
        "t0",
    )
    envelope = parse(first.value)
    assert unpack(envelope, FeedbackRecorded).feedback.feedback_id == "fb-0"
    assert envelope.source_service == "t"


async def test_events_go_to_the_topic_their_message_declares(engine: AsyncEngine) -> None:
    sessions = session_factory(engine)
    async with sessions() as session, session.begin():
        add_event(session, "acme", GenerationLogged(), source_service="feedback")
    bus = RecordingBus()
    await OutboxRelay(sessions, bus).drain()
    assert [(r.topic, r.event_type) for r in bus.published] == [
        ("flywheel.generations.v1", "generation.logged")
    ]


async def test_rows_wait_while_the_bus_is_down_then_go(engine: AsyncEngine) -> None:
    sessions = session_factory(engine)
    async with sessions() as session, session.begin():
        for i in range(7):
            add_event(session, "acme", _feedback(i), source_service="t")
    bus = RecordingBus()
    bus.down = True
    relay = OutboxRelay(sessions, bus, idle_interval_s=0.01, max_backoff_s=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    await asyncio.sleep(0.3)
    assert await _pending(engine) == 7  # failed rounds lose nothing
    bus.down = False
    for _ in range(200):
        if await _pending(engine) == 0:
            break
        await asyncio.sleep(0.02)
    stop.set()
    await task
    assert len(bus.published) == 7
    assert len({r.event_id for r in bus.published}) == 7


async def test_purge_keeps_unpublished_rows(engine: AsyncEngine) -> None:
    sessions = session_factory(engine)
    async with sessions() as session, session.begin():
        for i in range(3):
            add_event(session, "acme", _feedback(i), source_service="t")
    relay = OutboxRelay(sessions, RecordingBus(), batch_size=2, retention_s=0)
    await relay.publish_pending()  # two published, one still pending
    await asyncio.sleep(0.01)
    assert await relay.purge_published() == 2
    assert await _pending(engine) == 1


def test_only_event_messages_can_be_staged() -> None:
    with pytest.raises(TypeError, match="not an event message"):
        wrap("acme", Feedback(), source_service="t")
