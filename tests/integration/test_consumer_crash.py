"""SIGKILL a consumer mid-batch and restart it: no event is lost, none takes effect twice."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from flywheel.contracts.feedback.v1.events_pb2 import FeedbackRecorded
from flywheel.contracts.feedback.v1.resources_pb2 import Feedback
from flywheel.core.db import create_engine
from flywheel.core.events.bus import EventBus, EventRecord
from flywheel.core.events.embedded import EmbeddedLogBus
from flywheel.core.events.envelope import wrap
from flywheel.core.events.kafka import KafkaBus, ensure_topics
from flywheel.core.testing.effect_consumer import count_effects, prepare
from flywheel.core.testing.local_infra import LocalKafka

pytestmark = pytest.mark.integration

N_EVENTS = 1500


def _spawn(db: str, bus: str, bus_url: str, group: str, topic: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable, "-m", "flywheel.core.testing.effect_consumer",
            "--db", db, "--bus", bus, "--bus-url", bus_url,
            "--group", group, "--topic", topic,
            # Slow enough that a kill lands inside a batch of 100.
            "--effect-delay-s", "0.002",
        ],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


async def _wait_for(engine_url: str, predicate: str, target: int, timeout_s: float) -> int:
    engine = create_engine(engine_url)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            total, distinct = await count_effects(engine)
            value = distinct if predicate == "distinct" else total
            if value >= target or time.monotonic() > deadline:
                return value
            await asyncio.sleep(0.05)
    finally:
        await engine.dispose()


@pytest.mark.parametrize("bus_kind", ["embedded", "kafka"])
async def test_sigkill_mid_batch_loses_nothing_and_duplicates_nothing(
    bus_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    topic = f"test.crash.{uuid.uuid4().hex[:8]}"
    if bus_kind == "kafka":
        kafka: LocalKafka = request.getfixturevalue("kafka")
        bus_url = kafka.bootstrap
        ensure_topics(bus_url, [topic], partitions=3)
        bus: EventBus = KafkaBus(bus_url)
        db: str = request.getfixturevalue("pg_url")
    else:
        bus_url = f"sqlite+aiosqlite:///{tmp_path / 'events.sqlite3'}"
        bus = EmbeddedLogBus(bus_url)
        db = f"sqlite+aiosqlite:///{tmp_path / 'consumer.sqlite3'}"
    engine = create_engine(db)
    await prepare(engine)
    await engine.dispose()

    records = []
    for i in range(N_EVENTS):
        envelope = wrap(
            f"tenant-{i % 5}",
            FeedbackRecorded(feedback=Feedback(feedback_id=str(i))),
            source_service="test",
        )
        records.append(
            EventRecord(topic, envelope.tenant, envelope.SerializeToString(),
                        envelope.event_id, envelope.type)
        )  # fmt: skip
    await bus.publish(records)
    await bus.close()

    group = f"crash-{uuid.uuid4().hex[:8]}"
    consumer = _spawn(db, bus_kind, bus_url, group, topic)
    try:
        applied_before_kill = await _wait_for(db, "total", N_EVENTS // 3, timeout_s=120)
        consumer.send_signal(signal.SIGKILL)
        consumer.wait(timeout=10)
    finally:
        if consumer.poll() is None:
            consumer.kill()
    assert N_EVENTS // 3 <= applied_before_kill < N_EVENTS, "kill must land mid-stream"

    consumer = _spawn(db, bus_kind, bus_url, group, topic)
    try:
        assert await _wait_for(db, "distinct", N_EVENTS, timeout_s=120) == N_EVENTS
        # Let a redelivered batch, if any, finish before counting duplicates.
        await asyncio.sleep(1.0)
    finally:
        consumer.send_signal(signal.SIGTERM)
        assert consumer.wait(timeout=30) == 0
    engine = create_engine(db)
    total, distinct = await count_effects(engine)
    await engine.dispose()
    assert (total, distinct) == (N_EVENTS, N_EVENTS)
