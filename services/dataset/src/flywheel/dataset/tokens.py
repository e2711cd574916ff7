"""Token counting with the target model's tokenizer.

Length filters and token budgets are only meaningful in the tokens of the model being trained,
so a dataset spec names its tokenizer (``spec.tokenizer``) and every count goes through a
:class:`TokenCounter` loaded from it. The counter's ``name`` is stored in the snapshot, so a
reader knows which tokenizer the recorded counts came from.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np
from tokenizers import Tokenizer

from flywheel.core.errors import FieldError, InvalidArgument

REGEX_COUNTER_NAME = "builtin:regex"
_TOKENIZER_FILE = "tokenizer.json"
_FIELD = "spec.tokenizer"


class TokenCounter(Protocol):
    """Counts the tokens of texts; ``name`` says which tokenizer, for the snapshot."""

    name: str

    def count(self, text: str) -> int:
        """The number of tokens in ``text``, without special tokens."""
        ...

    def count_many(self, texts: Sequence[str]) -> list[int]:
        """``[count(t) for t in texts]``, possibly faster."""
        ...


class HFTokenCounter:
    """Counts with a Hugging Face ``tokenizers`` tokenizer, without special tokens.

    The counter owns ``tokenizer``: it switches off any truncation and padding configured in
    the tokenizer file, which would cap or inflate the counts.
    """

    def __init__(self, tokenizer: Tokenizer, name: str) -> None:
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.tokenizer = tokenizer
        self.name = name

    def count(self, text: str) -> int:
        """The number of tokens ``text`` encodes to, without special tokens."""
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def count_many(self, texts: Sequence[str]) -> list[int]:
        """Token counts of ``texts``, encoded as one batch (in parallel, in Rust)."""
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [len(encoding) for encoding in encodings]


class RegexTokenCounter:
    """The fallback when no tokenizer is configured: words and punctuation marks.

    Counts runs of word characters and single other non-space characters. Only an
    approximation: subword tokenizers usually give more tokens than this (rare words split
    into pieces), and the ratio depends on the language and the model.
    """

    name: str = REGEX_COUNTER_NAME
    _pattern = re.compile(r"\w+|[^\w\s]")

    def count(self, text: str) -> int:
        """The number of words and punctuation marks in ``text``."""
        return len(self._pattern.findall(text))

    def count_many(self, texts: Sequence[str]) -> list[int]:
        """``[count(t) for t in texts]``; ASCII texts counted together in numpy."""
        other = [i for i, text in enumerate(texts) if not text.isascii()]
        ascii_texts = list(texts)
        for i in other:
            ascii_texts[i] = ""
        counts = _count_ascii(ascii_texts)
        for i in other:
            counts[i] = self.count(texts[i])
        return counts


# Per ASCII code point: whether re's \w and \s match it (in str patterns, \w is
# str.isalnum() or "_", \s is str.isspace(), which on ASCII are these tables).
_ASCII_WORD = np.array([chr(i).isalnum() or chr(i) == "_" for i in range(128)])
_ASCII_SPACE = np.array([chr(i).isspace() for i in range(128)])
# Characters per numpy batch: big enough to spread numpy's per-call cost, small enough to
# keep its temporary arrays to a few tens of MiB.
_ASCII_BATCH_CHARS = 1 << 22


def _count_ascii(texts: list[str]) -> list[int]:
    """RegexTokenCounter.count of each of ``texts`` (all ASCII): a token starts at every
    word character not preceded by one, and at every other character that is not
    whitespace. Texts are joined by spaces, which end words and are no tokens, so a text's
    count is that of the tokens starting within it."""
    lengths = np.fromiter(map(len, texts), np.int64, len(texts))
    batch_of = np.cumsum(lengths + 1) // _ASCII_BATCH_CHARS
    cuts = [0, *(np.flatnonzero(np.diff(batch_of)) + 1).tolist(), len(texts)]
    counts: list[int] = []
    for a, b in itertools.pairwise(cuts):
        codes = np.frombuffer(" ".join(texts[a:b]).encode("ascii"), np.uint8)
        word = _ASCII_WORD[codes]
        starts = ~(word | _ASCII_SPACE[codes])
        starts[1:] |= word[1:] & ~word[:-1]
        starts[:1] |= word[:1]
        before = np.concatenate([[0], np.cumsum(starts, dtype=np.int64)])
        begin = np.cumsum(lengths[a:b] + 1) - lengths[a:b] - 1
        counts.extend((before[begin + lengths[a:b]] - before[begin]).tolist())
    return counts


@lru_cache(maxsize=16)
def load_token_counter(spec: str) -> TokenCounter:
    """The token counter ``spec`` names, loaded once per process and then reused.

    ``""`` or ``"builtin:regex"``: :class:`RegexTokenCounter`. A path to a ``tokenizer.json``
    file, or to a directory holding one: that tokenizer. Anything else: a model id on the
    Hugging Face Hub (or in its local cache), whose ``tokenizer.json`` is fetched. The
    counter's name is ``spec`` as given. Raises :class:`InvalidArgument` on ``spec.tokenizer``
    when nothing can be loaded.
    """
    if spec in ("", REGEX_COUNTER_NAME):
        return RegexTokenCounter()
    path = Path(spec)
    try:
        if path.is_dir():
            path = path / _TOKENIZER_FILE
            if not path.is_file():
                raise _invalid(f"directory {spec!r} has no {_TOKENIZER_FILE}")
        is_file = path.is_file()
    except OSError as exc:  # e.g. a name too long for the file system
        raise _invalid(f"cannot use {spec!r} as a path: {exc}") from exc
    if is_file:
        try:
            return HFTokenCounter(Tokenizer.from_file(str(path)), spec)
        except Exception as exc:  # tokenizers raises bare Exception for a malformed file
            raise _invalid(f"cannot read tokenizer file {str(path)!r}: {exc}") from exc
    if _looks_like_path(spec):
        raise _invalid(f"no such tokenizer file or directory: {spec!r}")
    try:
        tokenizer = Tokenizer.from_pretrained(spec)
    except Exception as exc:  # network, authentication, missing repo or file: all alike here
        raise _invalid(
            f"{spec!r} is not a tokenizer.json file, a directory holding one, or a Hugging "
            f"Face model id that could be loaded: {exc}"
        ) from exc
    return HFTokenCounter(tokenizer, spec)


def _looks_like_path(spec: str) -> bool:
    """Whether ``spec`` can only be meant as a path (a Hub id is ``name`` or ``owner/name``)."""
    return spec.startswith(("/", ".", "~")) or spec.endswith(".json") or "\\" in spec


def _invalid(message: str) -> InvalidArgument:
    return InvalidArgument(FieldError(_FIELD, message))
