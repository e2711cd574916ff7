"""Tests for the synthetic answers and corpus: determinism, mix, speed, quality tiers."""

from __future__ import annotations

import hashlib
import os
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

import pytest

from flywheel.domains.retail_media.corpus import (
    QUALITIES,
    Quality,
    budgeting_answer,
    corpus,
    corpus_text,
    creative_answer,
)
from flywheel.domains.retail_media.evaluators import evaluate_budgeting, evaluate_creative
from flywheel.domains.retail_media.prompts import budgeting_prompt, creative_prompt

P = TypeVar("P")


def _scores(
    make_prompt: Callable[[random.Random], P],
    answer: Callable[[P, Quality, random.Random], str],
    evaluate: Callable[[P, str], object],
    quality: Quality,
    seed: int,
) -> list[float]:
    rng = random.Random(seed)
    scores = []
    for _ in range(200):
        prompt = make_prompt(rng)
        evaluation = evaluate(prompt, answer(prompt, quality, rng))
        scores.append(evaluation.score)  # type: ignore[attr-defined]
    return scores


def test_answers_are_deterministic_for_a_seed() -> None:
    for quality in QUALITIES:
        for seed in range(30):
            p = budgeting_prompt(random.Random(seed))
            c = creative_prompt(random.Random(seed))
            assert budgeting_answer(p, quality, random.Random(seed)) == budgeting_answer(
                p, quality, random.Random(seed)
            )
            assert creative_answer(c, quality, random.Random(seed)) == creative_answer(
                c, quality, random.Random(seed)
            )


def test_corpus_is_deterministic_and_seed_dependent() -> None:
    assert list(corpus(500, 42)) == list(corpus(500, 42))
    assert list(corpus_text(500, 42)) == list(corpus_text(500, 42))
    assert list(corpus_text(50, 1)) != list(corpus_text(50, 2))
    # A longer run starts with the shorter one: n only says where to stop.
    assert list(corpus(100, 42)) == list(corpus(500, 42))[:100]


def test_corpus_is_the_same_in_every_process() -> None:
    # String hashing is salted per process; nothing drawn may depend on set or hash order.
    code = (
        "import hashlib; from flywheel.domains.retail_media import corpus_text; "
        "print(hashlib.sha256('\\0'.join(corpus_text(2000, 7)).encode()).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": str(hash_seed)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for hash_seed in (1, 2)
    }
    here = hashlib.sha256("\0".join(corpus_text(2000, 7)).encode()).hexdigest()
    assert digests == {here}


def test_corpus_mixes_tasks_and_qualities() -> None:
    examples = list(corpus(3000, 0))
    assert len(examples) == 3000
    tasks = Counter(e.task for e in examples)
    qualities = Counter(e.quality for e in examples)
    assert set(tasks) == {"budgeting", "creative"}
    assert min(tasks.values()) > 1200
    assert set(qualities) == set(QUALITIES)
    assert min(qualities.values()) > 600


def test_corpus_options_restrict_tasks_and_qualities() -> None:
    examples = list(corpus(200, 0, tasks=("creative",), quality_weights=(1, 0, 0)))
    assert {(e.task, e.quality) for e in examples} == {("creative", "good")}


def test_corpus_text_documents_are_prompt_newline_answer() -> None:
    for example, text in zip(corpus(100, 5), corpus_text(100, 5), strict=True):
        assert text == f"{example.prompt}\n{example.answer}"
        assert text.startswith(example.prompt + "\n")


def test_corpus_of_100k_examples_takes_seconds() -> None:
    start = time.perf_counter()
    count = sum(1 for _ in corpus_text(100_000, 0))
    elapsed = time.perf_counter() - start
    assert count == 100_000
    assert elapsed < 15, f"{elapsed:.1f} s"


@pytest.mark.parametrize(
    ("make_prompt", "answer", "evaluate"),
    [
        (budgeting_prompt, budgeting_answer, evaluate_budgeting),
        (creative_prompt, creative_answer, evaluate_creative),
    ],
    ids=["budgeting", "creative"],
)
def test_evaluators_tell_quality_tiers_apart(
    make_prompt: Callable[[random.Random], object],
    answer: Callable[[object, Quality, random.Random], str],
    evaluate: Callable[[object, str], object],
) -> None:
    good = statistics.mean(_scores(make_prompt, answer, evaluate, "good", 1))
    mediocre = statistics.mean(_scores(make_prompt, answer, evaluate, "mediocre", 2))
    bad = statistics.mean(_scores(make_prompt, answer, evaluate, "bad", 3))
    assert good > 0.9
    assert bad < 0.6
    assert good > mediocre > bad


def test_evaluators_score_the_corpus_from_prompt_text_alone() -> None:
    # What the online-RL reward sees: strings only.
    by_tier: dict[tuple[str, str], list[float]] = {}
    for e in corpus(1200, 9):
        evaluate = evaluate_budgeting if e.task == "budgeting" else evaluate_creative
        by_tier.setdefault((e.task, e.quality), []).append(evaluate(e.prompt, e.answer).score)
    for (_, quality), scores in by_tier.items():
        mean = statistics.mean(scores)
        assert mean > 0.9 if quality == "good" else mean < 0.9
        if quality == "bad":
            assert mean < 0.6


def test_good_answers_keep_every_rule() -> None:
    rng = random.Random(4)
    for _ in range(500):
        p = budgeting_prompt(rng)
        evaluation = evaluate_budgeting(p, budgeting_answer(p, "good", rng))
        assert evaluation.score == 1.0, evaluation
        c = creative_prompt(rng)
        copy = creative_answer(c, "good", rng)
        assert len(copy) <= c.max_chars
        assert evaluate_creative(c, copy).score == 1.0, copy
