"""Events written through the outbox while Kafka is down arrive once it is back: all, once."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from sqlalchemy import func, select

from flywheel.contracts.feedback.v1.events_pb2 import FeedbackRecorded
from flywheel.contracts.feedback.v1.resources_pb2 import Feedback
from flywheel.core.db import create_engine, session_factory
from flywheel.core.events import relay as relay_module
from flywheel.core.events.kafka import KafkaBus
from flywheel.core.events.outbox import OutboxEvent, add_event
from flywheel.core.events.relay import OutboxRelay
from flywheel.core.migrations import upgrade
from flywheel.core.testing.effect_consumer import consume, count_effects, prepare
from flywheel.core.testing.local_infra import LocalKafka

pytestmark = pytest.mark.integration

N_EVENTS = 300


async def test_outbox_survives_a_broker_outage_exactly_once(
    kafka_broker: LocalKafka, pg_url: str
) -> None:
    bootstrap = kafka_broker.bootstrap
    kafka_broker.stop()

    service = create_engine(pg_url, schema="feedback")
    await upgrade(service, "feedback", [])
    sessions = session_factory(service)
    bus = KafkaBus(bootstrap, publish_timeout_s=2.0)
    relay = OutboxRelay(sessions, bus, batch_size=100, max_backoff_s=1.0)
    stop_relay = asyncio.Event()
    failures_before = relay_module.PUBLISH_FAILURES._value.get()
    relay_task = asyncio.create_task(relay.run(stop_relay))

    # The service keeps accepting writes while the broker is down.
    for start in range(0, N_EVENTS, 10):
        async with sessions() as session, session.begin():
            for i in range(start, start + 10):
                add_event(
                    session,
                    f"tenant-{i % 4}",
                    FeedbackRecorded(feedback=Feedback(feedback_id=str(i))),
                    source_service="feedback",
                )
        relay.wake()
    await asyncio.sleep(3.0)
    assert relay_module.PUBLISH_FAILURES._value.get() > failures_before
    async with sessions() as session:
        pending = await session.scalar(
            select(func.count()).where(OutboxEvent.published_at.is_(None))
        )
    assert pending == N_EVENTS, "nothing may be marked published while the broker is down"

    kafka_broker.start()  # same port, same data

    consumer_db = create_engine(pg_url)  # public schema: the consumer's own tables
    await prepare(consumer_db)
    stop_consumer = asyncio.Event()
    consumer_task = asyncio.create_task(
        consume(
            pg_url,
            KafkaBus(bootstrap),
            f"outage-{uuid.uuid4().hex[:8]}",
            "flywheel.feedback.v1",
            0.0,
            stop_consumer,
        )
    )
    deadline = time.monotonic() + 120
    while (await count_effects(consumer_db))[1] < N_EVENTS and time.monotonic() < deadline:  # noqa: ASYNC110  (the effect is in another database)
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)  # any redelivery would land now
    stop_consumer.set()
    stop_relay.set()
    await asyncio.gather(consumer_task, relay_task)

    assert await count_effects(consumer_db) == (N_EVENTS, N_EVENTS)
    async with sessions() as session:
        pending = await session.scalar(
            select(func.count()).where(OutboxEvent.published_at.is_(None))
        )
    assert pending == 0
    await bus.close()
    await consumer_db.dispose()
    await service.dispose()
