"""The dataset service SIGKILLed mid-stream, then restarted, builds the same snapshot.

Thousands of feedback events (recorded, edited, retracted, on prompts with several outputs)
go to Kafka first; the dataset service (a real process on PostgreSQL) consumes them and is
killed while it does, then restarted. The preference snapshot it builds afterwards must
have the same sha256 as one built from an uninterrupted run of the same code over the same
events (here: in-process, on SQLite).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from flywheel.contracts.common.v1.common_pb2 import Prompt
from flywheel.contracts.dataset.v1 import resources_pb2 as ds
from flywheel.contracts.dataset.v1 import service_pb2 as dsapi
from flywheel.contracts.dataset.v1.service_pb2_grpc import DatasetServiceStub
from flywheel.contracts.feedback.v1 import events_pb2 as fe
from flywheel.contracts.feedback.v1 import resources_pb2 as fb
from flywheel.core.artifacts import LocalArtifactStore
from flywheel.core.db import create_engine, session_factory
from flywheel.core.events.bus import EventRecord
from flywheel.core.events.envelope import event_options, wrap
from flywheel.core.events.kafka import KafkaBus
from flywheel.core.migrations import upgrade
from flywheel.core.testing.local_infra import LocalKafka, free_port
from flywheel.dataset.options import BuildOptions
from flywheel.dataset.policy import PolicyDefaults
from flywheel.dataset.server import MIGRATIONS
from flywheel.dataset.service import DatasetService

pytestmark = pytest.mark.integration

# Its own tenant: other tests read the same topics of the shared broker.
TENANT = "crash-test"

T0 = datetime(2026, 11, 1, tzinfo=UTC)
CUTOFF = T0 + timedelta(days=30)


def feedback_events(n_prompts: int, seed: int = 5) -> list[EventRecord]:
    """Recorded, edited and retracted feedback on ``n_prompts`` prompts of 3 outputs each."""
    rng = random.Random(seed)
    records: list[EventRecord] = []
    clock = T0

    def emit(payload: fe.FeedbackRecorded | fe.FeedbackEdited | fe.FeedbackRetracted) -> None:
        nonlocal clock
        clock += timedelta(milliseconds=10)
        envelope = wrap(TENANT, payload, source_service="test", occurred_at=clock)
        event_type, topic = event_options(payload)
        records.append(
            EventRecord(topic, TENANT, envelope.SerializeToString(), envelope.event_id, event_type)
        )

    for p in range(n_prompts):
        generations = []
        for o in range(3):
            g = fb.Generation(
                generation_id=f"gen-{p}-{o}",
                tenant_id=TENANT,
                task="budgeting",
                prompt=Prompt(text=f"Split budget number {p} across retailers."),
                prompt_hash=f"hash-{p}",
                output=f"Answer {o} for prompt {p}: {rng.randint(0, 10**6)}% on search.",
            )
            g.created_at.FromDatetime(T0)
            generations.append(g)
        for o, g in enumerate(generations):
            rating = fb.Feedback(
                feedback_id=f"fb-{p}-{o}",
                tenant_id=TENANT,
                generation_id=g.generation_id,
                task="budgeting",
                revision=1,
                value=fb.FeedbackValue(rating=fb.Rating(value=rng.randint(1, 5))),
                source=fb.FeedbackSource(kind=fb.SOURCE_KIND_HUMAN),
            )
            emit(fe.FeedbackRecorded(feedback=rating, generation=g))
            if rng.random() < 0.2:  # an edit: the new value replaces the old
                edited = fb.Feedback()
                edited.CopyFrom(rating)
                edited.revision = 2
                edited.value.rating.value = rng.randint(1, 5)
                emit(fe.FeedbackEdited(feedback=edited, generation=g))
            elif rng.random() < 0.1:  # a retraction: the feedback no longer counts
                retracted = fb.Feedback()
                retracted.CopyFrom(rating)
                retracted.retracted_at.FromDatetime(clock)
                emit(fe.FeedbackRetracted(feedback=retracted))
        preference = fb.Feedback(
            feedback_id=f"pref-{p}",
            tenant_id=TENANT,
            generation_id=generations[0].generation_id,
            task="budgeting",
            revision=1,
            value=fb.FeedbackValue(
                preference=fb.Preference(
                    generation_b_id=generations[1].generation_id,
                    choice=rng.choice([fb.PREFERENCE_CHOICE_A, fb.PREFERENCE_CHOICE_B]),
                )
            ),
            source=fb.FeedbackSource(kind=fb.SOURCE_KIND_SYNTHETIC, critic="judge"),
        )
        emit(
            fe.FeedbackRecorded(
                feedback=preference, generation=generations[0], generation_b=generations[1]
            )
        )
    return records


def spec() -> ds.SnapshotSpec:
    s = ds.SnapshotSpec(kind=ds.DATASET_KIND_PREFERENCE, task="budgeting", seed=3)
    s.cutoff.FromDatetime(CUTOFF)
    return s


async def uninterrupted_snapshot_id(records: list[EventRecord], tmp_path: Path) -> str:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'reference.sqlite3'}")
    await upgrade(engine, None, [MIGRATIONS])
    service = DatasetService(
        session_factory(engine),
        LocalArtifactStore(tmp_path / "reference-artifacts"),
        build_defaults=BuildOptions(),
        policy_defaults=PolicyDefaults(enabled=False),
    )
    await service.apply(records)
    snapshot, created = await service.build_snapshot(TENANT, spec())
    await engine.dispose()
    assert created
    return snapshot.snapshot_id


async def applied(url: str) -> int:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return int(
                (
                    await conn.execute(text("SELECT count(*) FROM dataset.feedback_versions"))
                ).scalar_one()
            )
    except Exception:  # the schema does not exist before the first migration
        return 0
    finally:
        await engine.dispose()


def test_sigkill_mid_stream_then_restart_builds_the_identical_snapshot(
    tmp_path: Path, pg_url: str, kafka: LocalKafka
) -> None:
    records = feedback_events(n_prompts=700)
    total = len(records)
    asyncio.run(_publish(kafka.bootstrap, records))

    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")},
        "FLYWHEEL_DATABASE_URL": pg_url,
        "FLYWHEEL_EVENT_BUS": "kafka",
        "FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap,
        "FLYWHEEL_DATA_DIR": str(tmp_path / "data"),
        "FLYWHEEL_GRPC_PORT": str(port),
        "FLYWHEEL_METRICS_PORT": "0",
        "FLYWHEEL_POLICY_ENABLED": "false",
    }

    def start() -> subprocess.Popen[bytes]:
        log = (tmp_path / "dataset.log").open("ab")
        return subprocess.Popen(
            [sys.executable, "-m", "flywheel.dataset"], env=env, stdout=log, stderr=log
        )

    service = start()
    try:
        deadline = time.monotonic() + 120
        while (done := asyncio.run(applied(pg_url))) < total // 5:
            assert time.monotonic() < deadline, "the dataset service did not start consuming"
            assert service.poll() is None, (tmp_path / "dataset.log").read_text()
            time.sleep(0.05)
        service.send_signal(signal.SIGKILL)
        service.wait()
        killed_at = asyncio.run(applied(pg_url))
        assert killed_at < total, "killed too late to test anything: use more events"

        service = start()
        deadline = time.monotonic() + 180
        while asyncio.run(applied(pg_url)) < total:  # every event is one version
            assert time.monotonic() < deadline, f"stuck at {asyncio.run(applied(pg_url))}/{total}"
            assert service.poll() is None, (tmp_path / "dataset.log").read_text()
            time.sleep(0.2)
        assert asyncio.run(applied(pg_url)) == total  # each event applied once
        snapshot_id = asyncio.run(_build(f"127.0.0.1:{port}"))
    finally:
        service.terminate()
        service.wait(timeout=30)

    assert 0 < done <= killed_at < total
    assert snapshot_id == asyncio.run(uninterrupted_snapshot_id(records, tmp_path))


async def _publish(bootstrap: str, records: list[EventRecord]) -> None:
    bus = KafkaBus(bootstrap)
    try:
        for start in range(0, len(records), 500):
            await bus.publish(records[start : start + 500])
    finally:
        await bus.close()


async def _build(target: str) -> str:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = DatasetServiceStub(channel)
        for _ in range(100):
            try:
                reply = await stub.BuildSnapshot(
                    dsapi.BuildSnapshotRequest(tenant_id=TENANT, spec=spec()), timeout=60
                )
                return str(reply.snapshot.snapshot_id)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                await asyncio.sleep(0.2)
    raise AssertionError("the dataset service did not answer")
