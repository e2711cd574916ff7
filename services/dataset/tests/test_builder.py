"""Curation, quality checks and splits, on facts built by hand (no database)."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta

import pytest

from flywheel.contracts.dataset.v1 import resources_pb2 as ds
from flywheel.core.errors import InvalidArgument
from flywheel.dataset.builder import BuildResult, build
from flywheel.dataset.options import BuildOptions, resolve
from flywheel.dataset.records import FeedbackFact, GenerationText
from flywheel.dataset.tokens import load_token_counter

T0 = datetime(2026, 11, 1, tzinfo=UTC)
COUNTER = load_token_counter("")


class Facts:
    """A little world of prompts, generations and feedback."""

    def __init__(self) -> None:
        self.generations: dict[str, GenerationText] = {}
        self.facts: list[FeedbackFact] = []

    def gen(self, gid: str, prompt: str, output: str, task: str = "budgeting") -> str:
        self.generations[gid] = GenerationText(gid, task, prompt, f"h-{prompt}", output)
        return gid

    def add(self, gid: str, kind: str, *, source: str = "human", **value: object) -> str:
        n = len(self.facts)
        event = f"ev-{n:04d}"
        self.facts.append(
            FeedbackFact(
                event_id=event,
                feedback_id=f"fb-{n:04d}",
                generation_id=gid,
                task=self.generations[gid].task,
                kind=kind,
                source=source,
                occurred_at=T0 + timedelta(seconds=n),
                **value,  # type: ignore[arg-type]
            )
        )
        return event

    def build(self, **options: object) -> BuildResult:
        opts = dataclasses.replace(BuildOptions(eval_fraction=0.0), **options)  # type: ignore[arg-type]
        return build(self.facts, self.generations, opts, COUNTER)


def rows(result: BuildResult, split: str = "train") -> list[dict[str, object]]:
    return [json.loads(line) for line in result.splits[split].lines]


def test_sft_takes_good_outputs_and_corrections() -> None:
    w = Facts()
    good = w.gen("g1", "Split 10k across search and display.", "70% search, 30% display.")
    bad = w.gen("g2", "Split 5k across social.", "All on TV.")
    meh = w.gen("g3", "Split 8k across video.", "Maybe.")
    w.add(good, "thumbs", thumbs_up=True)
    w.add(bad, "rating", rating=1)
    w.add(meh, "rating", rating=3)
    fix = w.add(bad, "correction", correction="100% social.")
    result = w.build(kind="sft")
    expected = [
        {
            "prompt": "Split 10k across search and display.",
            "completion": "70% search, 30% display.",
        },
        {"prompt": "Split 5k across social.", "completion": "100% social."},
    ]
    canonical = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert sorted(rows(result), key=canonical) == sorted(expected, key=canonical)
    assert fix in result.event_ids()
    assert result.stats()["train_rows"] == 2


def test_preferences_explicit_derived_and_ties() -> None:
    w = Facts()
    a = w.gen("a", "Write a headline.", "Fresh deals every day")
    b = w.gen("b", "Write a headline.", "buy stuff")
    c = w.gen("c", "Write a headline.", "Deals that feel like a gift")
    d = w.gen("d", "Other prompt.", "x one")
    e = w.gen("e", "Other prompt.", "y two")
    w.add(a, "preference", choice="a", generation_b_id=b, strength=0.8)
    w.add(d, "preference", choice="tie", generation_b_id=e)
    w.add(c, "rating", rating=5)
    w.add(b, "rating", rating=1)
    result = w.build(kind="preference")
    pairs = {(r["chosen"], r["rejected"]) for r in rows(result)}
    assert pairs == {
        ("Fresh deals every day", "buy stuff"),
        ("Deals that feel like a gift", "buy stuff"),
    }
    assert result.dropped_by_reason() == {"tie": 1}
    assert set(rows(result)[0]) == {"prompt", "chosen", "rejected"}


def test_explicit_preference_beats_ratings_of_the_same_pair() -> None:
    w = Facts()
    a = w.gen("a", "P", "alpha answer")
    b = w.gen("b", "P", "beta answer")
    w.add(a, "rating", rating=5)
    w.add(b, "rating", rating=1)
    w.add(a, "preference", choice="b", generation_b_id=b)
    [row] = rows(w.build(kind="preference"))
    assert (row["chosen"], row["rejected"]) == ("beta answer", "alpha answer")


@pytest.mark.parametrize(
    ("rule", "expected"),
    [("weighted_majority", "alpha answer"), ("latest", "beta answer"), ("drop", None)],
)
def test_conflicting_preferences_follow_the_rule(rule: str, expected: str | None) -> None:
    w = Facts()
    a = w.gen("a", "P", "alpha answer")
    b = w.gen("b", "P", "beta answer")
    w.add(a, "preference", choice="a", generation_b_id=b)  # human for a
    w.add(a, "preference", choice="a", generation_b_id=b, source="synthetic:critic")
    w.add(a, "preference", choice="b", generation_b_id=b)  # latest: human for b
    result = w.build(kind="preference", conflict_rule=rule)
    if expected is None:
        assert rows(result) == []
        assert result.dropped_by_reason() == {"conflict": 1}
    else:
        assert [r["chosen"] for r in rows(result)] == [expected]


def test_human_outweighs_synthetic_and_human_only_excludes_critics() -> None:
    w = Facts()
    a = w.gen("a", "P", "alpha answer")
    b = w.gen("b", "P", "beta answer")
    w.add(a, "preference", choice="a", generation_b_id=b)
    w.add(a, "preference", choice="b", generation_b_id=b, source="synthetic:c1")
    [row] = rows(w.build(kind="preference"))
    assert row["chosen"] == "alpha answer"
    only = w.build(kind="preference", human_only=True)
    assert rows(only)[0]["chosen"] == "alpha answer"
    assert only.stats()["rows_by_source"] == {"human": 1}
    w2 = Facts()
    a = w2.gen("a", "P", "alpha answer")
    b = w2.gen("b", "P", "beta answer")
    w2.add(a, "preference", choice="b", generation_b_id=b, source="synthetic:c1")
    assert rows(w2.build(kind="preference", human_only=True)) == []


def test_unpaired_labels_and_reward_margins() -> None:
    w = Facts()
    up = w.gen("u", "Q1", "good answer here")
    down = w.gen("d", "Q2", "bad answer here")
    w.add(up, "thumbs", thumbs_up=True, dimension_scores=(("accuracy", 0.9),))
    w.add(down, "thumbs", thumbs_up=False)
    labels = {r["completion"]: r["label"] for r in rows(w.build(kind="unpaired"))}
    assert labels == {"good answer here": True, "bad answer here": False}

    w = Facts()
    a = w.gen("a", "P", "alpha answer")
    b = w.gen("b", "P", "beta answer")
    w.add(a, "rating", rating=5, dimension_scores=(("accuracy", 0.75),))
    w.add(b, "rating", rating=2)
    [row] = rows(w.build(kind="reward"))
    assert row["margin"] == 0.75
    assert row["chosen_scores"] == [{"dimension": "accuracy", "score": 0.75}]
    assert row["rejected_scores"] == []


def test_quality_checks_drop_with_reasons() -> None:
    w = Facts()
    w.add(w.gen("g1", "Same prompt", "Identical output text"), "thumbs", thumbs_up=True)
    w.add(w.gen("g2", "Same  PROMPT", "identical output text"), "thumbs", thumbs_up=True)
    w.add(w.gen("g3", "Long", " ".join(["word"] * 50)), "thumbs", thumbs_up=True)
    w.add(w.gen("g4", "Empty", "   "), "thumbs", thumbs_up=True)
    near = "The quick brown fox jumps over the lazy dog near the river bank today"
    w.add(w.gen("g5", "Fox", near), "thumbs", thumbs_up=True)
    w.add(w.gen("g6", "Fox", near.replace("today", "again")), "thumbs", thumbs_up=True)
    result = w.build(kind="sft", max_completion_tokens=20, near_duplicate_threshold=0.6)
    assert result.dropped_by_reason() == {
        "exact_duplicate": 1,
        "invalid_format": 1,
        "near_duplicate": 1,
        "too_long": 1,
    }
    assert result.rows("train") == 2
    report = json.loads(result.report())
    assert {d["reason"] for d in report["dropped"]} == set(result.dropped_by_reason())


def test_split_is_by_prompt_and_the_id_is_content_addressed() -> None:
    w = Facts()
    for p in range(40):
        for o in range(3):
            w.add(
                w.gen(f"g{p}-{o}", f"prompt number {p}", f"answer {o} to {p}"),
                "thumbs",
                thumbs_up=True,
            )
    result = w.build(kind="sft", eval_fraction=0.25, seed=7)
    train = {r["prompt"] for r in rows(result, "train")}
    evals = {r["prompt"] for r in rows(result, "eval")}
    assert train
    assert evals
    assert not train & evals
    assert result.rows("train") + result.rows("eval") == 120
    again = w.build(kind="sft", eval_fraction=0.25, seed=7)
    assert again.snapshot_id == result.snapshot_id
    w.facts.reverse()  # arrival order does not matter
    assert w.build(kind="sft", eval_fraction=0.25, seed=7).snapshot_id == result.snapshot_id
    assert w.build(kind="sft", eval_fraction=0.25, seed=8).snapshot_id != result.snapshot_id


def test_chat_prompts_make_every_row_conversational() -> None:
    w = Facts()
    w.add(w.gen("g1", "plain prompt", "plain answer"), "thumbs", thumbs_up=True)
    w.generations["g2"] = GenerationText(
        "g2", "budgeting", (("system", "Be brief."), ("user", "Hi")), "h2", "Hello"
    )
    w.add("g2", "thumbs", thumbs_up=True)
    lines = rows(w.build(kind="sft"))
    assert {
        "prompt": [{"role": "user", "content": "plain prompt"}],
        "completion": [{"role": "assistant", "content": "plain answer"}],
    } in lines
    assert {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "completion": [{"role": "assistant", "content": "Hello"}],
    } in lines


def test_spec_resolution_and_bad_options() -> None:
    now = datetime(2026, 11, 27, tzinfo=UTC)
    options = resolve(
        ds.SnapshotSpec(kind=ds.DATASET_KIND_PREFERENCE, min_rating_chosen=5),
        BuildOptions(),
        now=now,
    )
    assert (options.kind, options.min_rating_chosen, options.cutoff) == ("preference", 5, now)
    with pytest.raises(InvalidArgument) as caught:
        resolve(
            ds.SnapshotSpec(
                kind=ds.DatasetKind.ValueType(9), min_rating_chosen=9, eval_fraction=1.5
            ),
            BuildOptions(),
            now=now,
        )
    fields = {e.field for e in caught.value.errors}
    assert {"spec.kind", "spec.min_rating_chosen", "spec.eval_fraction"} <= fields
