"""The build's faster encoders, counters and hashing give exactly what the plain ones give."""

from __future__ import annotations

import hashlib
import random
import string
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from flywheel.dataset.builder import SPLITS, BuildResult, build
from flywheel.dataset.curation import Candidate
from flywheel.dataset.dedup import MinHasher, NormalizedText, normalize
from flywheel.dataset.exports import LineEncoder, canonical_line, openai_preference_row, trl_row
from flywheel.dataset.options import BuildOptions
from flywheel.dataset.quality import _near_duplicate_text
from flywheel.dataset.records import FeedbackFact, GenerationText, PromptValue
from flywheel.dataset.tokens import RegexTokenCounter, load_token_counter

T0 = datetime(2026, 11, 1, tzinfo=UTC)
UNICODE = "é中\u2028\u00a0\u3000ﬁ"


def test_regex_count_many_equals_count_one_at_a_time() -> None:
    rng = random.Random(0)
    counter = RegexTokenCounter()
    alphabet = [chr(i) for i in range(128)] + list(UNICODE)
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(40))) for _ in range(3000)]
    texts += [chr(i) for i in range(128)] + ["", " ", "a_b c-d", "x\x1fy", "ab" * 100_000]
    assert counter.count_many(texts) == [counter.count(text) for text in texts]
    assert counter.count_many([]) == []


def _candidate(rng: random.Random) -> Candidate:
    def text() -> str:
        return rng.choice(["plain", "", 'q"\\\x00\x1f\n', UNICODE, "a b  c"])

    prompt: PromptValue = text()
    if rng.random() < 0.2:
        prompt = (("system", text()), ("user", text()))
    return Candidate(
        task="t",
        prompt=prompt,
        prompt_hash="h",
        completions=(text(), text()),
        generation_ids=("a", "b"),
        event_ids=("e",),
        source="human",
        label=rng.choice([None, True, False]),
        margin=rng.choice([None, 0.0, 0.25, 1 / 3, 1e-9, float("nan")]),
        scores=rng.choice([(), ({"x": 0.5}, {}), ({"b": 1.0, "a": 0.1}, {"a": 0.2})]),
    )


@pytest.mark.parametrize("kind", ["sft", "unpaired", "preference", "reward"])
def test_line_encoder_equals_canonical_line(kind: str) -> None:
    rng = random.Random(1)
    encoder = LineEncoder()
    for _ in range(2000):
        c = _candidate(rng)
        if kind in ("sft", "unpaired"):
            c.completions = c.completions[:1]
        conversational, with_scores = rng.random() < 0.2, rng.random() < 0.5
        row = trl_row(c, kind, conversational=conversational, with_scores=with_scores)
        line = encoder.trl_line(c, kind, conversational=conversational, with_scores=with_scores)
        assert line == canonical_line(row)
        if kind in ("preference", "reward"):
            assert encoder.openai_line(c) == canonical_line(openai_preference_row(c))


def _result() -> BuildResult:
    generations: dict[str, GenerationText] = {}
    facts: list[FeedbackFact] = []
    for p in range(30):
        prompt = f"prompt {p} " + string.ascii_lowercase[p % 26] * (p + 3) + UNICODE[p % 3]
        for o in range(3):
            gid = f"g{p}-{o}"
            generations[gid] = GenerationText(gid, "t", prompt, f"h{p}", f"output {o} of {p}")
            for r in range(o + 1):
                n = len(facts)
                facts.append(
                    FeedbackFact(f"e{n}", f"f{n}", gid, "t", "rating",
                                 "human" if r % 2 else "synthetic:j",
                                 T0 + timedelta(seconds=n), rating=1 + 2 * o)
                )  # fmt: skip
    return build(
        facts, generations, BuildOptions(kind="reward", eval_fraction=0.3), load_token_counter("")
    )


def test_lineage_and_snapshot_id_are_those_of_the_plain_encoding() -> None:
    result = _result()
    assert result.rows("train")
    assert result.rows("eval")
    lineage = "".join(
        canonical_line(
            {
                "split": name,
                "row": number,
                "event_ids": sorted(ch.candidate.event_ids),
                "generation_ids": list(ch.candidate.generation_ids),
                "source": ch.candidate.source,
            }
        )
        for name in SPLITS
        for number, ch in enumerate(result.splits[name].checked)
    )
    assert result.lineage() == lineage.encode()
    digest = hashlib.sha256(b"reward")
    for name in SPLITS:
        digest.update(b"\x1e")
        for line in result.splits[name].lines:
            digest.update(line.encode())
    assert result.snapshot_id == f"sha256:{digest.hexdigest()}"


def test_rows_of_ascii_parts_are_hashed_as_their_joined_text() -> None:
    rng = random.Random(2)
    alphabet = [" ", "\n", "\t", "\x1c", "\x1f", "A", "b", "Z", "1", "_", ".", "é", "\u00a0"]
    rows = [
        tuple("".join(rng.choice(alphabet) for _ in range(rng.randrange(12))) for _ in range(4))
        for _ in range(3000)
    ]
    texts = []
    for parts in rows:
        text = _near_duplicate_text(parts, [normalize(part) for part in parts])
        assert normalize(text) == normalize("\n".join(parts))
        texts.append(text)
    assert any(isinstance(text, NormalizedText) for text in texts)
    hasher = MinHasher(num_perm=16, seed=3)
    expected = hasher.signatures(["\n".join(parts) for parts in rows])
    assert np.array_equal(hasher.signatures(texts, workers=1), expected)
