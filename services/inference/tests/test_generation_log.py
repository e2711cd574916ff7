"""The durable generation log, against a real feedback service that comes and goes.

Generations are recorded while the feedback service is down: ids come back at once and
nothing is lost; the relay backs off, and once the service is up it drains the log, after
which every generation is readable under exactly the id served. The log's own database
runs on SQLite and on PostgreSQL; the bookkeeping of backoff is unit-tested on SQLite with
a fake sender.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, select, update

from flywheel.contracts.common.v1.common_pb2 import AdapterRef, Prompt
from flywheel.contracts.feedback.v1 import resources_pb2 as pb
from flywheel.contracts.feedback.v1 import service_pb2 as api
from flywheel.contracts.feedback.v1.service_pb2 import GenerationInput
from flywheel.contracts.feedback.v1.service_pb2_grpc import FeedbackServiceStub
from flywheel.core.db import SessionFactory, create_engine, session_factory
from flywheel.core.ids import generation_id_for
from flywheel.core.migrations import upgrade
from flywheel.core.testing.local_infra import free_port
from flywheel.core.testing.services import serving
from flywheel.feedback.server import build as build_feedback
from flywheel.inference.generation_log import (
    GenerationLog,
    GenerationRelay,
    PendingGenerationRow,
    Rejected,
    feedback_sender,
)
from flywheel.inference.models import MIGRATIONS

# Reconnect soon after the feedback service comes back (gRPC's default waits up to 120 s).
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


@contextlib.asynccontextmanager
async def log_database(url: str, schema: str | None) -> AsyncIterator[SessionFactory]:
    """The inference service's database, migrated as the service does at start."""
    engine = create_engine(url, schema=schema)
    try:
        await upgrade(engine, schema, [MIGRATIONS])
        yield session_factory(engine)
    finally:
        await engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
async def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SessionFactory]:
    url, schema = f"sqlite+aiosqlite:///{tmp_path / 'inference.sqlite3'}", None
    if request.param == "postgres":
        url, schema = request.getfixturevalue("pg_url"), "inference"
    async with log_database(url, schema) as factory:
        yield factory


@pytest.fixture
async def sqlite_sessions(tmp_path: Path) -> AsyncIterator[SessionFactory]:
    async with log_database(f"sqlite+aiosqlite:///{tmp_path / 'inference.sqlite3'}", None) as f:
        yield f


@pytest.fixture
def feedback_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Where the feedback service will listen once a test starts it (nothing listens yet)."""
    monkeypatch.setenv("FLYWHEEL_DATA_DIR", str(tmp_path / "feedback"))
    monkeypatch.setenv("FLYWHEEL_METRICS_PORT", "0")
    port = free_port()
    monkeypatch.setenv("FLYWHEEL_GRPC_PORT", str(port))
    return f"127.0.0.1:{port}"


def served(i: int, **extra: object) -> GenerationInput:
    """A completion as the inference service would log it."""
    return GenerationInput(
        task="budgeting",
        prompt=Prompt(text=f"Split budget {i} across retailers."),
        output=f"Answer {i}: 60% to search.",
        model="acme/budgeting",
        base_model="tiny-base",
        **extra,  # type: ignore[arg-type]
    )


async def pending(sessions: SessionFactory) -> list[PendingGenerationRow]:
    async with sessions() as session:
        rows = await session.scalars(select(PendingGenerationRow).order_by(PendingGenerationRow.id))
        return list(rows)


async def make_due(sessions: SessionFactory) -> None:
    """Skip the backoff: every row due now."""
    async with sessions() as session, session.begin():
        await session.execute(
            update(PendingGenerationRow).values(
                next_attempt_at=datetime.now(UTC) - timedelta(seconds=1)
            )
        )


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def wait_until_empty(sessions: SessionFactory, timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        async with sessions() as session:
            left = await session.scalar(select(func.count()).select_from(PendingGenerationRow))
        if left == 0:
            return
        assert asyncio.get_running_loop().time() < deadline, f"{left} generations never sent"
        await asyncio.sleep(0.05)


async def test_generations_logged_while_feedback_is_down_arrive_under_their_ids(
    sessions: SessionFactory, feedback_target: str
) -> None:
    log = GenerationLog(sessions)
    acme = [
        served(
            i,
            adapter=AdapterRef(name="acme-budget", version="v3"),
            alias="acme/budgeting",
            traffic_arm="canary" if i % 2 else "stable",
        )
        for i in range(15)
    ]
    acme[0].client_generation_id = "caller-chose-this"
    globex = [served(100 + i) for i in range(10)]
    before = datetime.now(UTC)
    ids = await log.record([("acme", g) for g in acme[:5]])
    ids += await log.record([("acme", g) for g in acme[5:]] + [("globex", g) for g in globex])
    expected = [("acme", g) for g in acme] + [("globex", g) for g in globex]
    assert len(ids) == len(set(ids)) == 25
    assert ids[0] == generation_id_for("acme", "caller-chose-this")
    assert not acme[1].HasField("client_generation_id")  # the caller's message is untouched
    rows = await pending(sessions)
    assert [generation_id_for(r.tenant_id, r.client_generation_id) for r in rows] == ids

    async with grpc.aio.insecure_channel(feedback_target, options=CHANNEL_OPTIONS) as channel:
        send = feedback_sender(channel, timeout_s=2.0)
        # Passes by hand first, with a backoff long enough to see the bookkeeping.
        relay = GenerationRelay(sessions, send, batch_size=10, gauge_interval_s=0.0)
        # Down: nothing is sent, nothing is lost, the failed batch backs off.
        failures = metric("flywheel_generation_log_send_failures_total")
        assert await relay.drain_once() == 0
        assert metric("flywheel_generation_log_send_failures_total") > failures
        assert metric("flywheel_generation_log_pending") == 25
        rows = await pending(sessions)
        tried, untried = rows[:10], rows[10:]  # the oldest batch, all acme
        assert {r.attempts for r in tried} == {1}
        assert all("UNAVAILABLE" in (r.last_error or "") for r in tried)
        assert {r.attempts for r in untried} == {0}
        assert await relay.drain_once() == 0  # the next pass takes the rows not backing off
        assert [r.attempts for r in await pending(sessions)] == [1] * 20 + [0] * 5

        # Then the relay as the service runs it, retrying quickly.
        await make_due(sessions)
        relay = GenerationRelay(
            sessions, send, batch_size=10, poll_s=0.05, base_backoff_s=0.05, max_backoff_s=0.2
        )
        stop = asyncio.Event()
        task = asyncio.create_task(relay.run(stop))
        try:
            await asyncio.sleep(1.0)
            rows = await pending(sessions)
            assert len(rows) == 25
            assert max(r.attempts for r in rows) >= 2
            sent = metric("flywheel_generation_log_sent_total")

            async with (
                serving(build_feedback()),
                # The test's own channel: the relay's one is still backing off its reconnects.
                grpc.aio.insecure_channel(feedback_target) as own,
            ):
                stub = FeedbackServiceStub(own)
                for tenant in ("acme", "globex"):
                    await stub.CreateTenant(api.CreateTenantRequest(tenant_id=tenant))
                await wait_until_empty(sessions)
                assert metric("flywheel_generation_log_sent_total") - sent == 25

                for gid, (tenant, data) in zip(ids, expected, strict=True):
                    got = (
                        await stub.GetGeneration(
                            api.GetGenerationRequest(tenant_id=tenant, generation_id=gid)
                        )
                    ).generation
                    assert (got.output, got.task, got.model, got.base_model) == (
                        data.output, data.task, data.model, data.base_model,
                    )  # fmt: skip
                    assert got.prompt == data.prompt
                    assert got.HasField("adapter") == data.HasField("adapter")
                    assert (got.adapter, got.alias, got.traffic_arm) == (
                        data.adapter, data.alias, data.traffic_arm,
                    )  # fmt: skip
                    # Dated when served, not when the log reached the feedback service.
                    assert before <= got.created_at.ToDatetime(UTC) <= before + timedelta(seconds=5)
                for tenant, count in (("acme", 15), ("globex", 10)):
                    listed = await stub.ListGenerations(
                        api.ListGenerationsRequest(tenant_id=tenant)
                    )
                    assert len(listed.generations) == count

                # A rater's feedback on a served id lands on that generation.
                recorded = await stub.RecordFeedback(
                    api.RecordFeedbackRequest(
                        tenant_id="acme",
                        generation_id=ids[3],
                        value=pb.FeedbackValue(thumbs=pb.THUMB_UP),
                    )
                )
                assert recorded.feedback.generation_id == ids[3]
                assert recorded.feedback.adapter == AdapterRef(name="acme-budget", version="v3")
        finally:
            stop.set()
            await task


async def test_resending_after_a_crash_between_send_and_delete_does_not_duplicate(
    sessions: SessionFactory, feedback_target: str
) -> None:
    log = GenerationLog(sessions)
    ids = await log.record([("acme", served(i)) for i in range(3)])
    async with (
        serving(build_feedback()),
        grpc.aio.insecure_channel(feedback_target) as channel,
    ):
        stub = FeedbackServiceStub(channel)
        await stub.CreateTenant(api.CreateTenantRequest(tenant_id="acme"))
        send = feedback_sender(stub)
        crashed: list[int] = []

        async def send_then_crash(tenant: str, generations: list[GenerationInput]) -> None:
            await send(tenant, generations)
            if not crashed:
                # The feedback service committed; the relay dies before deleting the rows.
                crashed.append(len(generations))
                raise RuntimeError("crashed before delete")

        relay = GenerationRelay(sessions, send_then_crash)
        assert await relay.drain_once() == 0
        assert crashed == [3]
        assert len(await pending(sessions)) == 3
        await make_due(sessions)
        assert await relay.drain_once() == 3
        assert await pending(sessions) == []

        # And a plain double send of the same inputs.
        again = [served(200 + i, client_generation_id=str(uuid.uuid4())) for i in range(2)]
        await send("acme", again)
        await send("acme", again)
        listed = await stub.ListGenerations(api.ListGenerationsRequest(tenant_id="acme"))
        logged = sorted(g.generation_id for g in listed.generations)
        both = ids + [generation_id_for("acme", g.client_generation_id) for g in again]
        assert logged == sorted(both)


class FakeFeedback:
    """A sender that fails while ``down`` and records what it was sent."""

    def __init__(self) -> None:
        self.down = False
        self.refuse: list[int] | None = None
        self.calls: list[tuple[str, list[str]]] = []

    async def __call__(self, tenant: str, generations: list[GenerationInput]) -> None:
        self.calls.append((tenant, [g.output for g in generations]))
        if self.down:
            raise ConnectionError("feedback service down")
        if self.refuse is not None:
            raise Rejected(self.refuse, "generations[1].task: required")


async def test_backoff_bookkeeping(sqlite_sessions: SessionFactory) -> None:
    sessions = sqlite_sessions
    feedback = FakeFeedback()
    relay = GenerationRelay(sessions, feedback, batch_size=4, base_backoff_s=1.0, max_backoff_s=3.0)
    log = GenerationLog(sessions, on_commit=relay.wake)
    await log.record([("acme", served(i)) for i in range(3)] + [("globex", served(9))])
    assert relay._wakeup.is_set()

    # Each failure counts an attempt and pushes the batch back, exponentially up to the cap,
    # with jitter in [ceiling / 2, ceiling].
    feedback.down = True
    for attempt, ceiling in ((1, 1.0), (2, 2.0), (3, 3.0), (4, 3.0)):
        start = datetime.now(UTC)
        assert await relay.drain_once() == 0
        rows = await pending(sessions)
        assert len(rows) == 4
        for row in rows:
            assert row.attempts == attempt
            assert row.last_error == "ConnectionError('feedback service down')"
            wait = (row.next_attempt_at.replace(tzinfo=UTC) - start).total_seconds()
            assert ceiling / 2 - 0.1 <= wait <= ceiling + 0.1
        calls = len(feedback.calls)
        assert await relay.drain_once() == 0  # not due yet: not even tried
        assert len(feedback.calls) == calls
        await make_due(sessions)

    # Back up: one call per tenant, oldest first; rows go only once sent.
    feedback.down = False
    feedback.calls.clear()
    assert await relay.drain_once() == 4
    assert sorted(feedback.calls) == [
        (
            "acme",
            ["Answer 0: 60% to search.", "Answer 1: 60% to search.", "Answer 2: 60% to search."],
        ),
        ("globex", ["Answer 9: 60% to search."]),
    ]
    assert await pending(sessions) == []
    assert await relay.drain_once() == 0


async def test_refused_generations_back_off_alone(sqlite_sessions: SessionFactory) -> None:
    sessions = sqlite_sessions
    feedback = FakeFeedback()
    relay = GenerationRelay(sessions, feedback)
    await GenerationLog(sessions).record([("acme", served(i)) for i in range(3)])
    feedback.refuse = [1]
    assert await relay.drain_once() == 0
    rows = await pending(sessions)
    assert [r.attempts for r in rows] == [0, 1, 0]
    assert "generations[1].task" in (rows[1].last_error or "")
    # The rest of the tenant's log is not held up by the refused one.
    feedback.refuse = None
    assert await relay.drain_once() == 2
    assert [r.attempts for r in await pending(sessions)] == [1]


async def test_record_is_idempotent_per_client_id_and_stamps_serving_time(
    sqlite_sessions: SessionFactory,
) -> None:
    log = GenerationLog(sqlite_sessions)
    first = await log.record([("acme", served(1, client_generation_id="req-1"))])
    again = await log.record([("acme", served(2, client_generation_id="req-1"))])
    assert first == again == [generation_id_for("acme", "req-1")]
    assert await log.record([]) == []
    (row,) = await pending(sqlite_sessions)
    stored = GenerationInput.FromString(row.generation)
    assert stored.output == "Answer 1: 60% to search."  # the first one is kept
    assert stored.HasField("served_at")


async def test_relay_backs_off_as_a_whole_while_the_feedback_service_is_down(
    sqlite_sessions: SessionFactory,
) -> None:
    feedback = FakeFeedback()
    feedback.down = True
    relay = GenerationRelay(
        sqlite_sessions, feedback, batch_size=1, poll_s=0.01, base_backoff_s=0.2, max_backoff_s=0.4
    )
    log = GenerationLog(sqlite_sessions, on_commit=relay.wake)
    await log.record([("acme", served(i)) for i in range(50)])
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    for i in range(10):  # serving goes on; its wake-ups do not cut the backoff short
        await log.record([("acme", served(100 + i))])
        await asyncio.sleep(0.1)
    stop.set()
    await task
    # About one try per backoff interval (0.1-0.4 s over ~1 s), not one per poll or row.
    assert 2 <= len(feedback.calls) <= 8
    assert len(await pending(sqlite_sessions)) == 60
