"""Pair builds whose votes PostgreSQL sums up give the very snapshot the Python path gives.

A randomized feedback history (edits, retractions, ties, conflicting A/B preferences, human
and critic sources, corrections, dimension scores, missing generations, chat prompts, equal
timestamps, other tenants and tasks, versions after the cutoff) is written to a real
PostgreSQL; each build is made twice, from ``ledger.load_facts`` (every fact, summed in
Python) and from ``ledger.load_pair_input`` (summed in SQL), and everything a snapshot
stores must be equal byte for byte.
"""

from __future__ import annotations

import dataclasses
import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from flywheel.core.db import create_engine, session_factory
from flywheel.core.migrations import upgrade
from flywheel.dataset import ledger
from flywheel.dataset.builder import BuildResult, build
from flywheel.dataset.options import BuildOptions
from flywheel.dataset.server import MIGRATIONS
from flywheel.dataset.tokens import load_token_counter

T0 = datetime(2026, 3, 1, tzinfo=UTC)
CUTOFF = T0 + timedelta(seconds=40)
TENANT = "acme"
SOURCES = ["human", "human", "human", "synthetic:judge", "synthetic:critic-b"]
# Event ids whose code-point order differs from most locales' (case, digits, punctuation).
ID_CHARS = "aAbBzZ09_-."

GENERATION_COLUMNS = [
    "generation_id", "tenant_id", "task", "prompt", "prompt_hash", "output", "created_at",
]  # fmt: skip
VERSION_COLUMNS = [
    "event_id", "feedback_id", "tenant_id", "task", "generation_id", "revision", "kind",
    "thumbs_up", "rating", "choice", "strength", "generation_b_id", "correction", "source",
    "dimension_scores", "retracted", "occurred_at",
]  # fmt: skip


def _event_id(rng: random.Random, taken: set[str]) -> str:
    while True:
        candidate = "".join(rng.choice(ID_CHARS) for _ in range(6))
        if candidate not in taken:
            taken.add(candidate)
            return candidate


def _prompt(rng: random.Random, p: int) -> str:
    if rng.random() < 0.15:
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"q{p}"}]
        return json.dumps({"messages": {"messages": messages}})
    return json.dumps({"text": f"Prompt {p}: plan the week's budget for campaign {p % 7}"})


def _generations(rng: random.Random, prompts: int) -> list[tuple[Any, ...]]:
    rows = []
    for p in range(prompts):
        task = "ads" if p % 5 else "support"
        prompt = _prompt(rng, p)
        for o in range(4):
            # Some outputs repeat (exact duplicates) or nearly repeat (near duplicates).
            output = f"Answer {o} to prompt {p % 40}: spend more on search and less on display"
            if rng.random() < 0.2:
                output += "!"
            rows.append((f"g{p}-{o}", TENANT, task, prompt, f"h{p}", output, T0))
    rows.append(("other-0", "globex", "ads", json.dumps({"text": "x"}), "hx", "y", T0))
    return rows


def _value(rng: random.Random, p: int, prompts: int) -> dict[str, Any]:
    """One feedback's value columns, on a generation of prompt ``p``."""
    a, b = rng.sample(range(4), 2)
    roll = rng.random()
    if roll < 0.35:
        return {"kind": "preference", "generation_id": f"g{p}-{a}",
                "generation_b_id": f"g{p}-{b}", "choice": rng.choice(["a", "b", "a", "tie"]),
                "strength": rng.choice([None, None, 0.5, 1.0, 0.3, 0.0])}  # fmt: skip
    if roll < 0.42:
        output = rng.choice(["a better answer", f"Answer {a} to prompt {p % 40}: same"])
        return {"kind": "correction", "generation_id": f"g{p}-{a}", "correction": output}
    if roll < 0.5:
        return {"kind": "thumbs", "generation_id": f"g{p}-{a}", "thumbs_up": rng.random() < 0.5}
    if roll < 0.53:
        return {"kind": "comment", "generation_id": f"g{p}-{a}"}
    if roll < 0.57:  # on a generation the service never stored
        missing = f"g{prompts + 1}-0"
        return rng.choice([
            {"kind": "rating", "generation_id": missing, "rating": 5},
            {"kind": "correction", "generation_id": missing, "correction": "fixed"},
            {"kind": "preference", "generation_id": f"g{p}-{a}", "generation_b_id": missing,
             "choice": "a", "strength": None},
        ])  # fmt: skip
    return {"kind": "rating", "generation_id": f"g{p}-{a}",
            "rating": min(5, max(1, round(rng.gauss(1.0 + a, 1.2))))}  # fmt: skip


def _versions(rng: random.Random, prompts: int, feedbacks: int) -> list[tuple[Any, ...]]:
    taken: set[str] = set()
    rows = []
    for f in range(feedbacks):
        p = rng.randrange(prompts)
        value = _value(rng, p, prompts)
        scores = "[]"
        if rng.random() < 0.15:
            scores = json.dumps([["helpful", rng.choice([0.1, 0.7, 0.25])], ["safe", 1.0]])
        base = {
            "feedback_id": f"f{f}", "tenant_id": TENANT, "task": "ads" if p % 5 else "support",
            "thumbs_up": None, "rating": None, "choice": None, "strength": None,
            "generation_b_id": None, "correction": None, "source": rng.choice(SOURCES),
            "dimension_scores": scores, "retracted": False, **value,
        }  # fmt: skip
        # Whole seconds in a minute: equal timestamps are common, event ids break the ties.
        at = T0 + timedelta(seconds=rng.randrange(60))
        for revision in range(1, rng.choice([1, 1, 1, 2, 3]) + 1):
            version = dict(base, revision=revision, occurred_at=at)
            version["event_id"] = _event_id(rng, taken)
            if revision > 1:
                roll = rng.random()
                if roll < 0.3:
                    version["retracted"] = True
                elif version["kind"] == "rating":
                    version["rating"] = rng.randint(1, 5)
                elif version["kind"] == "preference":
                    version["choice"] = rng.choice(["a", "b", "tie"])
            rows.append(tuple(version[c] for c in VERSION_COLUMNS))
            at += timedelta(seconds=rng.choice([0, 1, 5]))
    # Another tenant's feedback never counts.
    rows.append(("zz-other", "fo", "globex", "ads", "other-0", 1, "rating", None, 5, None, None,
                 None, None, "human", "[]", False, T0))  # fmt: skip
    return rows


async def _populate(url: str, seed: int) -> None:
    engine = create_engine(url, schema="dataset")
    await upgrade(engine, "dataset", [MIGRATIONS])
    await engine.dispose()
    rng = random.Random(seed)
    conn = await asyncpg.connect(url.replace("+asyncpg", ""))
    try:
        await conn.copy_records_to_table(
            "source_generations", schema_name="dataset", records=_generations(rng, 60),
            columns=GENERATION_COLUMNS,
        )  # fmt: skip
        await conn.copy_records_to_table(
            "feedback_versions", schema_name="dataset", records=_versions(rng, 60, 1500),
            columns=VERSION_COLUMNS,
        )  # fmt: skip
    finally:
        await conn.close()


def _snapshot(result: BuildResult) -> dict[str, Any]:
    """Everything a saved snapshot is made of."""
    return {
        "id": result.snapshot_id,
        "files": result.files(),
        "lineage": result.lineage(),
        "report": result.report(),
        "stats": result.stats(),
        "events": sorted(result.event_ids()),
    }


OPTIONS = [
    BuildOptions(kind="preference"),
    BuildOptions(kind="reward", task="ads"),
    BuildOptions(kind="preference", cutoff=CUTOFF, near_duplicate_threshold=0.6),
    BuildOptions(kind="reward", human_only=True, conflict_rule="drop"),
    BuildOptions(
        kind="preference", conflict_rule="latest", human_weight=0.25, synthetic_weight=2.0
    ),
    BuildOptions(kind="reward", conflict_rule="weighted_majority", synthetic_weight=1.0),
    BuildOptions(
        kind="preference", min_rating_chosen=3, max_rating_rejected=2, min_rating_margin=0
    ),
    BuildOptions(kind="reward", synthetic_weight=0.0, eval_fraction=0.5, seed=3),
]


@pytest.mark.parametrize("seed", [1, 2])
async def test_sql_summed_votes_build_the_same_snapshots(pg_url: str, seed: int) -> None:
    await _populate(pg_url, seed)
    engine = create_engine(pg_url, schema="dataset")
    sessions = session_factory(engine)
    counter = load_token_counter("")
    reasons: set[str] = set()
    try:
        for options in OPTIONS:
            facts, generations = await ledger.load_facts(sessions, TENANT, options)
            expected = build(facts, generations, options, counter)
            summed = await ledger.load_pair_input(sessions, TENANT, options)
            assert summed is not None, options
            got = build(summed.facts, summed.generations, options, counter, summed.votes)
            assert _snapshot(got) == _snapshot(expected), options
            assert expected.rows("train"), options
            reasons.update(expected.dropped_by_reason())
    finally:
        await engine.dispose()
    # The data exercises every way curation and the checks drop rows.
    assert reasons >= {"tie", "conflict", "missing_generation", "exact_duplicate", "near_duplicate"}


async def test_votes_that_floats_cannot_sum_exactly_stay_in_python(pg_url: str) -> None:
    await _populate(pg_url, 3)
    engine = create_engine(pg_url, schema="dataset")
    sessions = session_factory(engine)
    try:
        inexact = BuildOptions(kind="preference", synthetic_weight=0.3)
        assert await ledger.load_pair_input(sessions, TENANT, inexact) is None
        sft = dataclasses.replace(BuildOptions(), kind="sft")
        assert await ledger.load_pair_input(sessions, TENANT, sft) is None
    finally:
        await engine.dispose()
