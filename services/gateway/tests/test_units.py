"""Parts of the gateway that need no service: buckets, field names, the idempotency store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from flywheel.core.db import create_engine, session_factory
from flywheel.core.migrations import upgrade
from flywheel.gateway.idempotency import (
    Fingerprint,
    IdempotencyRecord,
    IdempotencyStore,
    Outcome,
)
from flywheel.gateway.problems import renamer
from flywheel.gateway.ratelimit import TokenBuckets, retry_after
from flywheel.gateway.routes.feedback.mapping import filter_fields, value_fields
from flywheel.gateway.routes.generations.mapping import batch_fields, generation_fields
from flywheel.gateway.routes.training.mapping import adapter_fields, log_fields, submit_fields
from flywheel.gateway.state import MIGRATIONS_DIR


def test_token_bucket_refills_at_rate_up_to_burst() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate=2.0, burst=3, clock=lambda: now[0])
    assert [buckets.take("k") for _ in range(3)] == [None, None, None]
    wait = buckets.take("k")
    assert wait is not None
    assert abs(wait - 0.5) < 1e-9
    assert retry_after(wait) == "1"
    assert buckets.take("other") is None
    now[0] += 0.5
    assert buckets.take("k") is None
    now[0] += 100.0
    assert [buckets.take("k") for _ in range(4)][-1] is not None  # never above burst
    assert TokenBuckets(rate=0, burst=1).take("k") is None  # 0 turns limits off


def test_token_buckets_stay_bounded() -> None:
    buckets = TokenBuckets(rate=1.0, burst=1, max_keys=2)
    for key in "abc":
        buckets.take(key)
    assert len(buckets._buckets) == 2


def test_protobuf_paths_become_rest_fields() -> None:
    assert generation_fields("generation.prompt.text") == "prompt"
    assert generation_fields("generation.prompt.messages[2].role") == "prompt.2.role"
    assert generation_fields("generation.latency") == "latency_ms"
    assert generation_fields("generation.adapter.name") == "adapter.name"
    assert batch_fields("generations[3].prompt.messages") == "generations.3.prompt"
    assert batch_fields("generation.task") == "generations.0.task"
    assert value_fields("rating")("value.rating.value") == "rating"
    assert value_fields("rating")("value") == "rating"
    assert value_fields("comment")("value.comment.text") == "comment"
    assert value_fields("preference")("value.preference.choice") == "preference.choice"
    assert value_fields("thumbs")("source.critic") == "source"
    assert value_fields("thumbs")("dimension_scores[1].score") == "dimension_scores.1.score"
    assert filter_fields("filter.created.start") == "created_after"
    assert filter_fields("filter.kinds[0]") == "kind.0"
    assert filter_fields("page.cursor") == "cursor"
    assert renamer({"a": ""})("a.b") == "b"
    assert submit_fields("spec.lora.r") == "lora.r"
    assert submit_fields("spec.dataset_snapshot_id") == "snapshot_id"
    assert submit_fields("spec.resources.gpus") == "resources.gpus"
    assert submit_fields("spec.reward_functions[2]") == "reward_functions.2"
    assert adapter_fields("adapter.name") == "name"
    assert log_fields("tail_lines") == "tail"


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[IdempotencyStore]:
    """An idempotency store on a migrated gateway database of each backend."""
    if request.param == "postgres":
        url, schema = request.getfixturevalue("pg_url"), "gateway"
    else:
        url, schema = f"sqlite+aiosqlite:///{tmp_path / 'gw.sqlite3'}", None
    engine = create_engine(url, schema=schema)
    await upgrade(engine, schema, [MIGRATIONS_DIR])
    try:
        yield IdempotencyStore(session_factory(engine), ttl_s=3600, lock_timeout_s=60)
    finally:
        await engine.dispose()


async def test_idempotency_store_lets_one_of_many_racers_claim(store: IdempotencyStore) -> None:
    fp = Fingerprint("POST", "/v1/generations", "0" * 64)
    for round_ in range(20):
        claims = await asyncio.gather(*(store.claim("key", f"k{round_}", fp) for _ in range(8)))
        outcomes = sorted(c.outcome.value for c in claims)
        assert outcomes == ["claimed"] + ["in_flight"] * 7


async def test_idempotency_store_takes_over_stale_and_expired_keys(
    store: IdempotencyStore,
) -> None:
    sessions = store.sessions
    fp = Fingerprint("POST", "/v1/feedback", "0" * 64)
    first = await store.claim("key", "k1", fp)
    assert first.outcome is Outcome.CLAIMED
    assert (await store.claim("key", "k1", fp)).outcome is Outcome.IN_FLIGHT
    other = Fingerprint("POST", "/v1/feedback", "1" * 64)
    assert (await store.claim("key", "k1", other)).outcome is Outcome.MISMATCH

    # The first request's process died: after the lock timeout a retry may run.
    async with sessions() as session, session.begin():
        await session.execute(
            update(IdempotencyRecord).values(created_at=datetime.now(UTC) - timedelta(seconds=61))
        )
    second = await store.claim("key", "k1", fp)
    assert second.outcome is Outcome.CLAIMED
    # The dead holder cannot overwrite the new one's response.
    await store.complete(first, 201, {}, b"stale")
    await store.complete(second, 201, {"content-type": "application/json"}, b"{}")
    replay = await store.claim("key", "k1", fp)
    assert (replay.outcome, replay.status_code, replay.body) == (Outcome.REPLAY, 201, b"{}")
    assert replay.headers == {"content-type": "application/json"}

    async with sessions() as session, session.begin():
        await session.execute(
            update(IdempotencyRecord).values(expires_at=datetime.now(UTC) - timedelta(1))
        )
    assert (await store.claim("key", "k1", other)).outcome is Outcome.CLAIMED
    async with sessions() as session, session.begin():
        await session.execute(
            update(IdempotencyRecord).values(expires_at=datetime.now(UTC) - timedelta(1))
        )
    assert await store.prune() == 1
