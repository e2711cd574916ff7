"""Tests for token counting."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from flywheel.core.errors import InvalidArgument
from flywheel.dataset.tokens import (
    HFTokenCounter,
    RegexTokenCounter,
    TokenCounter,
    load_token_counter,
)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A reward model scores each completion; the policy learns from those scores.",
    "Tokenizers split text into pieces, and rarer words split into more pieces.",
    "Feedback arrives, a dataset is built, a model is trained, and the loop repeats.",
    "Numbers like 3.14 and 2026 and symbols like $, % and # appear too.",
]
TEXTS = [
    "The lazy fox reads the dataset.",
    "Unseen words: zymurgy, quixotic, naïve café, 日本語.",
    "",
    "   spaces   and\nnewlines\t",
]


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    # Counters are cached per spec for the process; each test starts from a clean slate.
    load_token_counter.cache_clear()
    yield
    load_token_counter.cache_clear()


@pytest.fixture
def trained() -> Tokenizer:
    """A tiny byte-level BPE tokenizer that wraps encodings in <s> ... </s>."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SENTENCES, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        special_tokens=[
            ("<s>", tokenizer.token_to_id("<s>")),
            ("</s>", tokenizer.token_to_id("</s>")),
        ],
    )
    return tokenizer


@pytest.fixture
def tokenizer_dir(tmp_path: Path, trained: Tokenizer) -> Path:
    trained.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def expected_count(tokenizer: Tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False).ids)


@pytest.mark.parametrize("form", ["file", "directory"])
def test_counts_match_the_tokenizer(form: str, tokenizer_dir: Path, trained: Tokenizer) -> None:
    spec = str(tokenizer_dir / "tokenizer.json" if form == "file" else tokenizer_dir)
    counter = load_token_counter(spec)
    assert isinstance(counter, HFTokenCounter)
    assert counter.name == spec
    for text in TEXTS:
        assert counter.count(text) == expected_count(trained, text)
    assert counter.count_many(TEXTS) == [counter.count(text) for text in TEXTS]
    assert counter.count_many([]) == []


def test_special_tokens_are_not_counted(tokenizer_dir: Path, trained: Tokenizer) -> None:
    counter = load_token_counter(str(tokenizer_dir))
    text = TEXTS[0]
    assert len(trained.encode(text).ids) == counter.count(text) + 2


def test_truncation_and_padding_in_the_file_do_not_change_counts(
    tmp_path: Path, trained: Tokenizer
) -> None:
    expected = [expected_count(trained, text) for text in TEXTS]
    trained.enable_truncation(max_length=3)
    trained.enable_padding(length=64, pad_id=0, pad_token="<s>")
    trained.save(str(tmp_path / "tokenizer.json"))
    counter = load_token_counter(str(tmp_path))
    assert [counter.count(text) for text in TEXTS] == expected
    assert counter.count_many(TEXTS) == expected


def test_counters_are_loaded_once_per_spec(tokenizer_dir: Path) -> None:
    assert load_token_counter(str(tokenizer_dir)) is load_token_counter(str(tokenizer_dir))


@pytest.mark.parametrize("spec", ["", "builtin:regex"])
def test_regex_counter_is_the_default(spec: str) -> None:
    counter: TokenCounter = load_token_counter(spec)
    assert isinstance(counter, RegexTokenCounter)
    assert counter.name == "builtin:regex"


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("Hello, world! It's 3pm.", 9),  # Hello , world ! It ' s 3pm .
        ("naïve café 日本語", 3),
        ("", 0),
        ("  \n\t ", 0),
        ("a+b=c", 5),
    ],
)
def test_regex_counter_counts_words_and_punctuation(text: str, count: int) -> None:
    counter = RegexTokenCounter()
    assert counter.count(text) == count
    assert counter.count_many([text, text]) == [count, count]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any Hugging Face Hub lookup fail at once, without touching the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable when first imported, which may already have happened.
    try:
        from huggingface_hub import constants
    except ImportError:  # then from_pretrained cannot reach the network either
        return
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.mark.usefixtures("offline")
def test_unknown_model_id_is_an_invalid_spec() -> None:
    with pytest.raises(InvalidArgument) as caught:
        load_token_counter("definitely/not-a-model")
    assert [error.field for error in caught.value.errors] == ["spec.tokenizer"]
    assert "definitely/not-a-model" in caught.value.errors[0].message


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("kind", ["missing file", "empty directory", "malformed file"])
def test_unusable_path_is_an_invalid_spec(kind: str, tmp_path: Path) -> None:
    if kind == "missing file":
        spec = str(tmp_path / "missing" / "tokenizer.json")
    elif kind == "empty directory":
        spec = str(tmp_path)
    else:
        (tmp_path / "tokenizer.json").write_text("{not json")
        spec = str(tmp_path / "tokenizer.json")
    with pytest.raises(InvalidArgument) as caught:
        load_token_counter(spec)
    assert [error.field for error in caught.value.errors] == ["spec.tokenizer"]
    assert "spec.tokenizer" in str(caught.value)
