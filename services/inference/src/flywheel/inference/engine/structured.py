"""JSON-schema constrained decoding with xgrammar (the library vLLM uses).

A :class:`GrammarCache` per loaded model compiles the ``response_format`` of requests into
xgrammar grammars; each constrained sequence gets a :class:`SequenceConstraint` (a matcher fed
the sampled tokens), and :func:`apply_constraints` masks a batch's logits so that only tokens
the grammars allow can be sampled.

Output is compact one-line JSON (``{"a": 1, "b": [true, false]}``, ``json.dumps``' default
separators). xgrammar's default allows any whitespace between elements, which lets a small
model emit newlines forever without breaking the grammar; compact output makes every path of
a bounded schema (enums, ranged integers, short strings) end within a fixed number of tokens.

Limits of xgrammar 0.2.8 worth knowing: a string with ``maxLength``/``minLength`` cannot hold
escapes (no ``"``, ``\\`` or ``\\n`` in it), and masking inside one is slow on big vocabularies
(about 9 ms a token at 27k tokens, against microseconds elsewhere).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import xgrammar as xgr
from transformers import PreTrainedTokenizerBase
from xgrammar import CompiledGrammar

__all__ = [
    "CompiledGrammar",
    "GrammarCache",
    "ResponseFormatError",
    "SequenceConstraint",
    "apply_constraints",
    "grammar_for",
]

# xgrammar's C++ errors read "[15:47:34] /project/cpp/json_schema_converter.cc:4944: reason";
# API users need the reason only.
_CPP_LOCATION = re.compile(r"^\[[\d:.]+\]\s+\S+:\d+:\s*")
_RESPONSE_FORMAT_KEYS = {
    "text": {"type"},
    "json_object": {"type"},
    "json_schema": {"type", "json_schema"},
}
_JSON_SCHEMA_KEYS = {"name", "description", "schema", "strict"}


class ResponseFormatError(ValueError):
    """A ``response_format`` or JSON schema that is malformed or unsupported (an HTTP 400)."""


def _tokenizer_info(
    tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos: int
) -> xgr.TokenizerInfo:
    """xgrammar's view of the vocabulary, with the tokens JSON output never needs removed.

    xgrammar matches a token by its text, so special tokens (``<|user|>``, BOS, padding) would
    be allowed inside JSON strings, and the text the grammar saw would differ from the decoded
    answer. Tokens with a raw control byte are removed too: compact JSON never contains one
    (strings escape them), but xgrammar's length-limited strings (``maxLength``) accept raw
    tabs and ``\\x01``, which ``json.loads`` rejects. xgrammar treats empty tokens as
    special (never allowed); the EOS stays usable as the stop token.
    """
    # from_huggingface detects the vocabulary's encoding (byte-level, byte-fallback, raw) and
    # decodes every token; the new info below reuses both.
    detected = xgr.TokenizerInfo.from_huggingface(
        tokenizer, vocab_size=vocab_size, stop_token_ids=[eos]
    )
    decoded = detected.decoded_vocab
    special = set(tokenizer.all_special_ids)
    special |= {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    encoded = [""] * vocab_size
    for token, index in tokenizer.get_vocab().items():
        if index < vocab_size and index not in special and min(decoded[index], default=32) >= 32:
            encoded[index] = token
    return xgr.TokenizerInfo(
        encoded,
        detected.vocab_type,
        vocab_size=vocab_size,
        stop_token_ids=[eos],
        add_prefix_space=detected.add_prefix_space,
    )


def _canonical(value: Any) -> Any:
    """``value`` with the keys of every object sorted, except the names under ``properties``:
    their order is the order the output lists them in (as OpenAI's structured outputs do)."""
    if isinstance(value, list):
        return [_canonical(item) for item in value]
    if not isinstance(value, dict):
        return value
    canonical = {}
    for key in sorted(value):
        item = value[key]
        if key == "properties" and isinstance(item, dict):
            canonical[key] = {name: _canonical(schema) for name, schema in item.items()}
        else:
            canonical[key] = _canonical(item)
    return canonical


def _reason(error: Exception) -> str:
    """The message of an xgrammar error without its C++ source location."""
    return _CPP_LOCATION.sub("", str(error).strip()) or type(error).__name__


class SequenceConstraint:
    """The grammar state of one sequence: feed it every sampled token, in order.

    Not thread-safe: one sequence is decoded by one thread.
    """

    def __init__(self, matcher: xgr.GrammarMatcher, vocab_size: int, stop_ids: Sequence[int]):
        self._matcher = matcher
        self.vocab_size = vocab_size
        self._stop_ids = frozenset(stop_ids)
        self._finished: bool | None = None  # computed lazily, once per grammar state

    def accept(self, token_id: int) -> None:
        """Advance by ``token_id``; raises RuntimeError if the grammar does not allow it."""
        if not self._matcher.accept_token(token_id):
            state = "has finished" if self._matcher.is_terminated() else "does not allow it"
            raise RuntimeError(f"token {token_id} rejected: the grammar {state}")
        self._finished = None

    @property
    def finished(self) -> bool:
        """Whether the output is complete: only the stop token (EOS) may follow, or came.

        A complete output may still be extendable (``1`` of an integer up to 100); that is
        not finished, the model chooses between EOS and more digits.
        """
        if self._finished is None:
            self._finished = self._matcher.is_terminated() or (
                self._matcher.is_completed() and self._allowed() <= self._stop_ids
            )
        return self._finished

    def _allowed(self) -> set[int]:
        """The tokens the grammar allows next (a full mask: used once the output is complete)."""
        bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        self._fill(bitmask, 0)
        logits = torch.zeros(1, self.vocab_size)
        xgr.apply_token_bitmask_inplace(logits, bitmask)
        return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())

    def _fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the next-token mask into ``bitmask[row]``."""
        if self._matcher.is_terminated():
            # xgrammar refuses to mask after the stop token; allowing only it again is safe.
            bitmask[row] = 0
            for token in self._stop_ids:
                bitmask[row, token // 32] |= _bit(token % 32)
        else:
            self._matcher.fill_next_token_bitmask(bitmask, row)


def _bit(position: int) -> int:
    """Bit ``position`` of an int32 bitmask word, as a signed value (bit 31 is negative)."""
    return -(1 << 31) if position == 31 else 1 << position


class GrammarCache:
    """One per (tokenizer, model vocab size): compiles grammars, caches them by canonical JSON of
    the schema (least recently used ones are dropped beyond ``max_cached``).

    Thread-safe: request handlers compile while the decoding thread creates constraints.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, *, max_cached: int = 64
    ) -> None:
        eos = tokenizer.eos_token_id
        if not isinstance(eos, int) or not 0 <= eos < vocab_size:
            raise ValueError(f"the tokenizer's EOS ({eos!r}) is not a token of the model")
        if max_cached < 1:
            raise ValueError("max_cached must be at least 1")
        # The model's vocab size (config.vocab_size, the logits' width) may exceed
        # len(tokenizer): xgrammar masks the extra ids, given the full size.
        self.vocab_size = vocab_size
        self.stop_token_ids = (eos,)
        self._max_cached = max_cached
        # Our cache is bounded; xgrammar's own is not by default, so it is off.
        self._compiler = xgr.GrammarCompiler(
            _tokenizer_info(tokenizer, vocab_size, eos), cache_enabled=False
        )
        self._lock = threading.Lock()
        self._grammars: OrderedDict[str, CompiledGrammar] = OrderedDict()

    def json_schema(self, schema: dict[str, Any]) -> CompiledGrammar:
        """The grammar of JSON values valid under ``schema``; ResponseFormatError if it's bad."""
        if not isinstance(schema, dict):
            raise ResponseFormatError("the JSON schema must be an object")
        try:
            key = json.dumps(_canonical(schema), separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ResponseFormatError(f"the JSON schema is not JSON: {error}") from error
        with self._lock:
            grammar = self._grammars.get(key)
            if grammar is not None:
                self._grammars.move_to_end(key)
                return grammar
        # Compiled outside the lock: a slow schema must not hold up cached ones. The key itself
        # is compiled, so a grammar never depends on which of the equal schemas came first.
        try:
            # strict_mode (xgrammar's default): no properties or items the schema doesn't name.
            compiled = self._compiler.compile_json_schema(key, any_whitespace=False)
        except (RuntimeError, ValueError, TypeError) as error:
            raise ResponseFormatError(f"unsupported JSON schema: {_reason(error)}") from error
        with self._lock:
            # Another thread may have compiled the same schema meanwhile: one grammar wins.
            grammar = self._grammars.setdefault(key, compiled)
            self._grammars.move_to_end(key)
            while len(self._grammars) > self._max_cached:
                self._grammars.popitem(last=False)
        return grammar

    def json_object(self) -> CompiledGrammar:
        """The grammar of any JSON object (OpenAI's ``json_object`` mode: not arrays)."""
        return self.json_schema({"type": "object"})

    def constraint(self, grammar: CompiledGrammar) -> SequenceConstraint:
        """A fresh constraint (matcher at the start of ``grammar``) for one sequence."""
        # The grammar ends with this cache's stop token (the EOS), from its tokenizer info.
        return SequenceConstraint(xgr.GrammarMatcher(grammar), self.vocab_size, self.stop_token_ids)


def apply_constraints(
    logits: torch.Tensor, constraints: Sequence[SequenceConstraint | None]
) -> None:
    """In place on a [batch, vocab] float tensor: rows with a constraint get disallowed tokens
    set to -inf; None rows untouched. One bitmask for the batch."""
    rows = [row for row, constraint in enumerate(constraints) if constraint is not None]
    if not rows:
        return
    if logits.dim() != 2 or logits.shape[0] != len(constraints):
        raise ValueError(
            f"logits {tuple(logits.shape)} are not [batch, vocab] with one row per constraint "
            f"({len(constraints)})"
        )
    vocab_size = logits.shape[1]
    bitmask = xgr.allocate_token_bitmask(len(constraints), vocab_size)
    for row, constraint in enumerate(constraints):
        if constraint is None:
            continue
        if constraint.vocab_size != vocab_size:
            raise ValueError(
                f"logits have {vocab_size} tokens, the grammar's model {constraint.vocab_size}"
            )
        constraint._fill(bitmask, row)
    xgr.apply_token_bitmask_inplace(
        logits, bitmask.to(logits.device), vocab_size=vocab_size, indices=rows
    )


def grammar_for(
    cache: GrammarCache, response_format: dict[str, Any] | None
) -> CompiledGrammar | None:
    """The grammar an OpenAI ``response_format`` asks for; None for free text.

    Supported: ``{"type": "text"}``, ``{"type": "json_object"}`` and ``{"type": "json_schema",
    "json_schema": {"name": ..., "schema": {...}, "strict": ..., "description": ...}}``. The
    schema is always enforced, whatever ``strict`` says (as in vLLM).
    """
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ResponseFormatError("response_format must be an object")
    kind = response_format.get("type")
    if not isinstance(kind, str) or kind not in _RESPONSE_FORMAT_KEYS:
        raise ResponseFormatError(
            "response_format.type must be one of 'text', 'json_object', 'json_schema', "
            f"not {kind!r}"
        )
    if kind == "json_schema" and not isinstance(response_format.get("json_schema"), dict):
        # Checked first: a "schema" beside "type" is the usual mistake, and this says the fix.
        raise ResponseFormatError(
            'response_format.json_schema must be an object: {"name": ..., "schema": {...}}'
        )
    _no_unknown_keys("response_format", response_format, _RESPONSE_FORMAT_KEYS[kind])
    if kind == "text":
        return None
    if kind == "json_object":
        return cache.json_object()
    spec = response_format["json_schema"]
    _no_unknown_keys("response_format.json_schema", spec, _JSON_SCHEMA_KEYS)
    if not isinstance(spec.get("name"), str):
        raise ResponseFormatError("response_format.json_schema.name must be a string")
    if not isinstance(spec.get("description", ""), str):
        raise ResponseFormatError("response_format.json_schema.description must be a string")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise ResponseFormatError("response_format.json_schema.strict must be a boolean")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise ResponseFormatError("response_format.json_schema.schema must be a JSON Schema object")
    return cache.json_schema(schema)


def _no_unknown_keys(where: str, value: dict[str, Any], known: set[str]) -> None:
    """ResponseFormatError naming the keys of ``value`` that ``where`` does not have."""
    unknown = sorted(set(value) - known)
    if unknown:
        raise ResponseFormatError(f"{where} has unknown keys: {', '.join(unknown)}")
