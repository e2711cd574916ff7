"""Tests for exact and near-duplicate detection."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest

from flywheel.dataset import dedup
from flywheel.dataset.dedup import (
    _PIECE,
    _SENTINEL,
    MinHasher,
    NearDuplicateIndex,
    _choose_bands,
    _distinct_hashes,
    _Scratch,
    exact_key,
    jaccard,
    normalize,
)

P = (1 << 61) - 1

# About 60 words each, on unrelated subjects.
RIVER = (
    "The river town woke slowly on market days, when farmers rolled their carts across the "
    "old stone bridge and set out baskets of apples, pears and late summer plums. Children "
    "darted between the stalls while their parents argued cheerfully over prices, and the "
    "baker on the corner sold warm bread until the noon bell rang from the tower above the "
    "busy square."
)
COMPILER = (
    "Modern compilers translate high level source code into efficient machine instructions "
    "through a long pipeline of analyses and transformations. Parsing builds a syntax tree, "
    "semantic checks resolve names and types, and optimisation passes inline functions, "
    "eliminate dead code and allocate registers before the backend finally emits assembly "
    "tailored to the instruction set of the target processor."
)
RIVER_ONE_WORD_CHANGED = RIVER.replace("apples", "cherries")


def shingles(text: str, ngram: int = 5) -> set[str]:
    """The reference shingle set: character n-grams of the normalized text."""
    norm = normalize(text)
    if len(norm) < ngram:
        return {norm} if norm else set()
    return {norm[i : i + ngram] for i in range(len(norm) - ngram + 1)}


def true_jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def reference_signature(hasher: MinHasher, x: list[int]) -> list[int]:
    """The signature by definition, in Python integers."""
    a, b = hasher._a.tolist(), hasher._b.tolist()
    return [min((ai * xi + bi) % P for xi in x) for ai, bi in zip(a, b, strict=True)]


def test_paragraphs_are_the_size_the_tests_assume() -> None:
    assert 55 <= len(RIVER.split()) <= 65
    assert 55 <= len(COMPILER.split()) <= 65
    assert RIVER_ONE_WORD_CHANGED != RIVER


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  Hello\tWORLD \n", "hello world"),
        ("a\u00a0\u2003 b\r\n\r\nc", "a b c"),  # no-break and em spaces, blank lines
        ("\uff21\uff22\uff23 \ufb01le", "abc file"),  # full-width letters, "fi" ligature
        ("Stra\u00dfe", "strasse"),  # casefold, not just lower()
        ("caf\u0065\u0301", "caf\u00e9"),  # combining accent composed by NFKC
        ("", ""),
        (" \t\n ", ""),
    ],
)
def test_normalize(text: str, expected: str) -> None:
    assert normalize(text) == expected


def test_exact_key_ignores_case_spacing_and_presentation() -> None:
    key = exact_key("Hello  World", "Answer")
    assert key == exact_key("hello world", " ANSWER\n")
    assert len(key) == 64
    assert int(key, 16) >= 0


def test_exact_key_keeps_parts_apart() -> None:
    assert exact_key("ab", "c") != exact_key("a", "bc")
    assert exact_key("a", "b") != exact_key("a b")
    # A separator inside a part is whitespace to normalize(), so it cannot forge a boundary.
    assert exact_key("a\x1fb") == exact_key("a b") != exact_key("a", "b")
    assert exact_key("a", "") != exact_key("a")


def test_one_changed_word_is_a_near_duplicate_and_an_unrelated_text_is_not() -> None:
    index = NearDuplicateIndex(threshold=0.7)
    assert index.find_or_add("river", RIVER) is None
    assert index.find_or_add("compiler", COMPILER) is None
    assert index.find_or_add("river-2", RIVER_ONE_WORD_CHANGED) == "river"
    assert index.find_or_add("river-3", RIVER.upper()) == "river"
    assert len(index) == 2  # duplicates are reported, not added


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (RIVER, RIVER_ONE_WORD_CHANGED),
        (RIVER, RIVER[: len(RIVER) // 2] + COMPILER[len(COMPILER) // 2 :]),
        (RIVER, RIVER[: len(RIVER) * 3 // 4] + COMPILER[: len(COMPILER) // 4]),
        (RIVER, COMPILER),
    ],
)
def test_estimated_jaccard_is_close_to_the_true_shingle_jaccard(a: str, b: str) -> None:
    hasher = MinHasher()
    estimate = jaccard(hasher.signature(a), hasher.signature(b))
    assert estimate == pytest.approx(true_jaccard(a, b), abs=0.1)


def test_shingle_hashes_are_distinct_per_distinct_shingle() -> None:
    hasher = MinHasher()
    for text in (RIVER, COMPILER, "abcabcabc", "ab"):
        hashes = hasher.shingle_hashes(text)
        assert hashes.size == len(shingles(text))
        assert np.all(hashes < P)
        assert np.all(np.diff(hashes) > 0)  # sorted and distinct


def test_signature_is_the_exact_minimum_of_the_universal_hashes() -> None:
    hasher = MinHasher()
    rng = random.Random(7)
    for text in (RIVER, COMPILER, "ab", "x" * 3 + RIVER * 3):
        expected = reference_signature(hasher, hasher.shingle_hashes(text).tolist())
        assert hasher.signature(text).tolist() == expected
    # Values the float pre-selection cannot rank (0, P - 1, near ties, a single value) must
    # still come out exact.
    a, b = hasher._a.tolist(), hasher._b.tolist()
    for trial in range(40):
        xs = {rng.randrange(P) for _ in range(rng.choice([0, 1, 3, 300, 1200]))}
        for _ in range(4):
            i = rng.randrange(hasher.num_perm)
            base = rng.choice([0, 1, P - 3, rng.randrange(P), rng.randrange(1 << 40)])
            for target in (base, base + 1):
                xs.add((target - b[i]) * pow(a[i], -1, P) % P)
        x = sorted(xs)
        got = hasher._min_over(np.array(x, np.uint64)).tolist()
        assert got == reference_signature(hasher, x), trial


def test_signatures_are_deterministic() -> None:
    first, second = MinHasher(seed=3), MinHasher(seed=3)
    assert np.array_equal(first.signature(RIVER), second.signature(RIVER))
    assert np.array_equal(first.signature(RIVER), first.signature(RIVER))
    assert not np.array_equal(first.signature(RIVER), MinHasher(seed=4).signature(RIVER))


def test_signatures_do_not_depend_on_the_process_hash_seed() -> None:
    code = (
        "from flywheel.dataset.dedup import MinHasher; "
        "print(MinHasher().signature('a text').tolist())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == str(MinHasher().signature("a text").tolist())


def test_index_answers_are_deterministic() -> None:
    rng = random.Random(11)
    words = RIVER.split() + COMPILER.split()
    texts: list[str] = []
    for _ in range(60):
        if texts and rng.random() < 0.3:
            base = rng.choice(texts).split()
            base[rng.randrange(len(base))] = rng.choice(words)
            texts.append(" ".join(base))
        else:
            texts.append(" ".join(rng.choices(words, k=60)))

    def answers() -> list[str | None]:
        index = NearDuplicateIndex(threshold=0.8)
        return [index.find_or_add(str(i), text) for i, text in enumerate(texts)]

    first = answers()
    assert first == answers()
    assert any(answer is not None for answer in first)


def test_a_bucket_collision_alone_never_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    index = NearDuplicateIndex(threshold=0.7)
    # Every text lands in the same bucket of every band: only verification can tell them apart.
    monkeypatch.setattr(index, "_band_keys", lambda signature: [0] * index.bands)
    assert index.find_or_add("river", RIVER) is None
    assert index.find_or_add("compiler", COMPILER) is None
    assert index.find_or_add("river-2", RIVER_ONE_WORD_CHANGED) == "river"
    assert index.find_or_add("compiler-2", COMPILER.replace("assembly", "bytecode")) == "compiler"


def test_the_most_similar_earlier_text_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    words = RIVER.split()
    # Estimated similarity to RIVER: 0.88 for the first, 0.97 for the second; 0.84 between them.
    start_changed = " ".join([f"x{word}" for word in words[:6]] + words[6:])
    end_changed = " ".join([*words[:-1], f"y{words[-1]}"])
    index = NearDuplicateIndex(threshold=0.86)
    monkeypatch.setattr(index, "_band_keys", lambda signature: [0] * index.bands)
    assert index.find_or_add("start", start_changed) is None
    assert index.find_or_add("end", end_changed) is None
    assert index.find_or_add("river", RIVER) == "end"


def test_empty_and_short_texts() -> None:
    hasher = MinHasher()
    empty = hasher.signature("")
    assert empty.dtype == np.uint64
    assert empty.shape == (128,)
    assert np.all(empty == np.iinfo(np.uint64).max)
    assert np.array_equal(hasher.signature(" \n\t "), empty)
    short = hasher.signature("ab")
    assert short.shape == (128,)
    assert np.all(short < P)
    assert jaccard(short, hasher.signature("AB")) == 1.0
    assert jaccard(short, hasher.signature("ba")) < 0.1

    index = NearDuplicateIndex()
    assert index.find_or_add("empty", "") is None
    assert index.find_or_add("blank", "   ") == "empty"
    assert index.find_or_add("ab", "ab") is None
    assert index.find_or_add("x", "x") is None
    assert index.find_or_add("AB", " AB ") == "ab"


def test_jaccard_rejects_mismatched_signatures() -> None:
    with pytest.raises(ValueError, match="alike"):
        jaccard(np.zeros(4, np.uint64), np.zeros(5, np.uint64))


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.85, 0.9, 0.95])
def test_bands_catch_pairs_just_above_the_threshold(threshold: float) -> None:
    bands, rows = _choose_bands(threshold, 128)
    assert bands * rows <= 128
    above = min(1.0, threshold + 0.05)
    assert 1 - (1 - above**rows) ** bands > 0.9


@pytest.mark.parametrize(
    "make", [lambda: MinHasher(num_perm=0), lambda: NearDuplicateIndex(threshold=0.0)]
)
def test_bad_parameters_are_rejected(make: Callable[[], object]) -> None:
    with pytest.raises(ValueError, match="must be"):
        make()


def varied_texts(seed: int = 5) -> list[str]:
    """Empty, blank, short, odd Unicode, heavily repetitive, and long texts, with lengths
    around the batched path's piece boundaries (256 shingles per piece)."""
    rng = random.Random(seed)
    words = RIVER.split() + COMPILER.split()
    texts = [
        "",
        " \t\n ",
        "a",
        "ab",
        "abcd",
        "abcde",
        "abcdef",
        "  Ab  ",
        "\uff21\uff22\uff23 \ufb01le Stra\u00dfe caf\u0065\u0301",
        "x\ud800y lone surrogate",
        "ab" * 300,
        "a" * 1000,
        "\n".join([RIVER, COMPILER]),
        RIVER * 3,
        RIVER_ONE_WORD_CHANGED,
    ]
    for length in (1, 4, 5, 6, 9, 60, 259, 260, 261, 264, 500, 515, 516, 517, 700, 1500, 4000):
        text = " ".join(rng.choices(words, k=length // 3 + 2))
        texts.append(text[:length])
    texts += [" ".join(rng.choices(words, k=rng.randint(1, 120))) for _ in range(60)]
    rng.shuffle(texts)
    return texts


@pytest.mark.parametrize(
    "hasher",
    [MinHasher(), MinHasher(num_perm=7, ngram=3, seed=5), MinHasher(num_perm=200, ngram=1)],
    ids=["default", "small", "unigram"],
)
def test_batched_signatures_equal_one_at_a_time(hasher: MinHasher) -> None:
    texts = varied_texts()
    batched = hasher.signatures(texts)
    assert batched.dtype == np.uint64
    assert batched.shape == (len(texts), hasher.num_perm)
    for text, row in zip(texts, batched, strict=True):
        assert np.array_equal(row, hasher.signature(text)), repr(text[:40])


def test_batched_signatures_across_chunks_and_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    hasher = MinHasher(seed=9)
    texts = varied_texts(seed=6)
    expected = np.array([hasher.signature(text) for text in texts])
    monkeypatch.setattr(dedup, "_CHUNK_CHARS", 900)  # many chunks, some of one text
    for workers in (1, 3, None):
        assert np.array_equal(hasher.signatures(texts, workers=workers), expected), workers
    assert hasher.signatures([]).shape == (0, hasher.num_perm)
    with pytest.raises(ValueError, match="workers"):
        hasher.signatures(texts, workers=0)


def test_piece_minima_are_exact_even_where_the_estimate_is_unsure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Values the float pre-selection cannot rank (near ties, 0 and P - 1, a single value)
    must still come out exact, through the exact fallback."""
    hasher = MinHasher(num_perm=32)
    rng = random.Random(13)
    a, b = hasher._a.tolist(), hasher._b.tolist()
    pieces: list[list[int]] = []
    for trial in range(24):
        xs = {rng.randrange(P) for _ in range(rng.choice([0, 1, 3, 100, 240]))}
        for _ in range(rng.choice([0, 2, 4])):
            i = rng.randrange(hasher.num_perm)
            base = rng.choice([0, 1, P - 3, rng.randrange(P), rng.randrange(1 << 40)])
            for target in (base, base + 1):
                xs.add((target - b[i]) * pow(a[i], -1, P) % P)
        xs = xs or {trial}
        pieces.append(sorted(xs)[:_PIECE])
    rows = np.full((len(pieces), _PIECE), _SENTINEL, np.uint64)
    for row, xs_of_piece in zip(rows, pieces, strict=True):
        row[: len(xs_of_piece)] = xs_of_piece
    lengths = np.array([len(xs_of_piece) for xs_of_piece in pieces], np.int64)

    unsure_seen = []
    block_minima = hasher._block_minima

    def spy(*args: object) -> object:
        picked, unsure = block_minima(*args)  # type: ignore[arg-type]
        unsure_seen.append(int(unsure.sum()))
        return picked, unsure

    monkeypatch.setattr(hasher, "_block_minima", spy)
    minima = hasher._piece_minima(rows, lengths, _Scratch(hasher.num_perm))
    for got, xs_of_piece in zip(minima, pieces, strict=True):
        assert got.tolist() == reference_signature(hasher, xs_of_piece)
    assert sum(unsure_seen) > 0  # the exact fallback did run


def test_distinct_hashes_per_text() -> None:
    rng = np.random.default_rng(3)
    texts = [
        rng.integers(0, P, 500, dtype=np.uint64),  # distinct
        rng.integers(0, P, 5, dtype=np.uint64).repeat(3),  # repeats
        np.empty(0, np.uint64),
        np.arange(700, dtype=np.uint64) * 1000,  # 700 distinct in one range: overfull
        rng.integers(0, P, 300, dtype=np.uint64).repeat(4),  # repeats, overfull ranges
        rng.choice(rng.integers(0, P, 50, dtype=np.uint64), 900),
        np.array([P - 1, 0, P - 1], np.uint64),
    ]
    values, counts = _distinct_hashes(np.concatenate(texts), np.array([t.size for t in texts]))
    assert counts.tolist() == [np.unique(t).size for t in texts]
    ends = np.cumsum(counts)
    for text, end, count in zip(texts, ends, counts, strict=True):
        assert np.array_equal(np.sort(values[end - count : end]), np.unique(text))


def near_duplicate_corpus(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = RIVER.split() + COMPILER.split() + [f"w{i}" for i in range(300)]
    texts: list[str] = []
    for _ in range(count):
        if texts and rng.random() < 0.3:
            base = rng.choice(texts).split()
            for _ in range(rng.randint(0, 4)):
                base[rng.randrange(len(base))] = rng.choice(words)
            texts.append(" ".join(base))
        else:
            texts.append(" ".join(rng.choices(words, k=rng.randint(3, 90))))
    texts[5:5] = ["", "   ", "ab", "AB "]
    return texts


@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.9])
def test_find_or_add_many_answers_like_one_at_a_time(
    threshold: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = near_duplicate_corpus(400, seed=int(threshold * 10))
    keys = [f"k{i}" for i in range(len(texts))]
    one = NearDuplicateIndex(threshold=threshold, seed=4)
    expected = [one.find_or_add(key, text) for key, text in zip(keys, texts, strict=True)]
    assert sum(answer is not None for answer in expected) > 20

    monkeypatch.setattr(dedup, "_CHUNK_CHARS", 2000)  # duplicates span chunks
    for workers in (1, 2):
        many = NearDuplicateIndex(threshold=threshold, seed=4)
        # Some rows one at a time first: a batch must see what was added before it.
        head = [many.find_or_add(keys[i], texts[i]) for i in range(30)]
        got = head + many.find_or_add_many(keys[30:], texts[30:], workers=workers)
        assert got == expected
        assert many._keys == one._keys
        assert np.array_equal(many._signatures[: len(many)], one._signatures[: len(one)])
        # Both go on alike.
        assert many.find_or_add("again", texts[-1]) == one.find_or_add("again", texts[-1])


def test_find_or_add_many_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 keys for 1 texts"):
        NearDuplicateIndex().find_or_add_many(["a", "b"], ["text"])
    assert NearDuplicateIndex().find_or_add_many([], []) == []


def test_band_keys_many_match_band_keys() -> None:
    index = NearDuplicateIndex(threshold=0.8)
    signatures = index.hasher.signatures(varied_texts())
    assert index._band_keys_many(signatures) == [index._band_keys(row) for row in signatures]
