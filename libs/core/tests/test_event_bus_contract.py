"""One contract for every event bus: the embedded log and Kafka must behave the same."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from flywheel.core.events.bus import EventBus, EventRecord, Subscription
from flywheel.core.events.embedded import EmbeddedLogBus
from flywheel.core.events.kafka import KafkaBus, ensure_topics
from flywheel.core.testing.local_infra import LocalKafka


@pytest.fixture(params=["embedded", "kafka"])
async def bus(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[EventBus]:
    if request.param == "embedded":
        bus: EventBus = EmbeddedLogBus(f"sqlite+aiosqlite:///{tmp_path / 'events.sqlite3'}")
    else:
        kafka: LocalKafka = request.getfixturevalue("kafka")
        bus = KafkaBus(kafka.bootstrap)
    yield bus
    await bus.close()


@pytest.fixture
def topic(request: pytest.FixtureRequest) -> str:
    """A topic no other test uses; created up front on Kafka (one partition: total order)."""
    name = f"test.{uuid.uuid4().hex[:12]}"
    if "kafka" in request.node.callspec.id:
        kafka: LocalKafka = request.getfixturevalue("kafka")
        ensure_topics(kafka.bootstrap, [name], partitions=1)
    return name


def _records(topic: str, n: int, key: str = "acme") -> list[EventRecord]:
    return [
        EventRecord(
            topic=topic,
            key=key,
            value=f"payload-{i}".encode(),
            event_id=str(uuid.uuid4()),
            event_type="test.happened",
        )
        for i in range(n)
    ]


async def _collect(sub: Subscription, n: int, timeout_s: float = 30.0) -> list[EventRecord]:
    got: list[EventRecord] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        got.extend(await sub.poll(max_records=n - len(got), timeout_s=0.5))
    return got


async def test_published_records_arrive_in_order_with_their_fields(
    bus: EventBus, topic: str
) -> None:
    sent = _records(topic, 25)
    await bus.publish(sent)
    sub = await bus.subscribe(f"g-{uuid.uuid4().hex}", [topic])
    got = await _collect(sub, 25)
    await sub.close()
    assert [(r.event_id, r.value, r.key, r.event_type, r.topic) for r in got] == [
        (r.event_id, r.value, r.key, r.event_type, r.topic) for r in sent
    ]
    assert [r.offset for r in got] == sorted(r.offset for r in got)


async def test_a_new_member_resumes_after_the_committed_position(bus: EventBus, topic: str) -> None:
    group = f"g-{uuid.uuid4().hex}"
    sent = _records(topic, 10)
    await bus.publish(sent)
    first = await bus.subscribe(group, [topic])
    got = await _collect(first, 10)
    assert len(got) == 10
    await first.commit()
    await first.close()

    await bus.publish(_records(topic, 3))
    second = await bus.subscribe(group, [topic])
    rest = await _collect(second, 3)
    # Nothing committed is delivered again; a short extra wait finds nothing more.
    rest += await second.poll(timeout_s=1.0)
    await second.close()
    assert len(rest) == 3
    assert not {r.event_id for r in rest} & {r.event_id for r in sent}


async def test_uncommitted_records_are_delivered_again(bus: EventBus, topic: str) -> None:
    group = f"g-{uuid.uuid4().hex}"
    sent = _records(topic, 8)
    await bus.publish(sent)
    first = await bus.subscribe(group, [topic])
    assert len(await _collect(first, 8)) == 8
    await first.close()  # no commit: as if the consumer died mid-batch

    second = await bus.subscribe(group, [topic])
    again = await _collect(second, 8)
    await second.close()
    assert [r.event_id for r in again] == [r.event_id for r in sent]


async def test_groups_are_independent(bus: EventBus, topic: str) -> None:
    sent = _records(topic, 5)
    await bus.publish(sent)
    for _ in range(2):
        sub = await bus.subscribe(f"g-{uuid.uuid4().hex}", [topic])
        got = await _collect(sub, 5)
        await sub.commit()
        await sub.close()
        assert [r.event_id for r in got] == [r.event_id for r in sent]


async def test_one_subscription_reads_several_topics(bus: EventBus, topic: str) -> None:
    other = f"{topic}.other"
    if isinstance(bus, KafkaBus):
        ensure_topics(bus.bootstrap_servers, [other], partitions=1)
    await bus.publish(_records(topic, 3) + _records(other, 4))
    sub = await bus.subscribe(f"g-{uuid.uuid4().hex}", [topic, other])
    got = await _collect(sub, 7)
    await sub.close()
    assert sorted(r.topic for r in got) == [topic] * 3 + [other] * 4


async def test_publishing_nothing_is_a_no_op(bus: EventBus, topic: str) -> None:
    await bus.publish([])
    sub = await bus.subscribe(f"g-{uuid.uuid4().hex}", [topic])
    assert await sub.poll(timeout_s=0.3) == []
    await sub.close()
