"""JSON-schema constrained decoding (xgrammar) on a tiny Llama with its own BPE tokenizer."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from flywheel.inference.engine.structured import (
    CompiledGrammar,
    GrammarCache,
    ResponseFormatError,
    SequenceConstraint,
    apply_constraints,
    grammar_for,
)
from flywheel.trainer.bootstrap import bootstrap_model
from flywheel.trainer.testing import TINY

# Every path of this schema ends: an enum, a ranged integer, a boolean, a short string, a
# short array of enums. Compact output of it is under 90 tokens even one byte per token.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "channel": {"enum": ["amazon", "google", "meta"]},
        "share": {"type": "integer", "minimum": 0, "maximum": 100},
        "approved": {"type": "boolean"},
        "note": {"type": "string", "maxLength": 12},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["channel", "share", "approved", "note", "tags"],
    "additionalProperties": False,
}
BUDGET = 120


@dataclass
class Tiny:
    tokenizer: PreTrainedTokenizerBase
    model: Any  # a LlamaForCausalLM
    cache: GrammarCache

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tiny]:
    """The bootstrap's tiny model (400 tokens) and a grammar cache for it (about a second)."""
    path = bootstrap_model(tmp_path_factory.mktemp("models"), TINY, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)  # in eval mode
    # Its matrices are tiny: on a busy machine, waiting for threads costs 30x the work.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Tiny(tokenizer, model, GrammarCache(tokenizer, model.config.vocab_size))
    torch.set_num_threads(threads)


def decode(tiny: Tiny, grammar: CompiledGrammar, generator: torch.Generator | None = None) -> str:
    """Greedy (no generator) or sampled constrained decoding until the grammar is finished."""
    constraint = tiny.cache.constraint(grammar)
    step = torch.tensor([tiny.ids("Split the budget, as JSON:")])
    past = None
    out: list[int] = []
    with torch.no_grad():
        while not constraint.finished:
            assert len(out) < BUDGET, f"no end after {BUDGET} tokens: {tiny.tokenizer.decode(out)}"
            output = tiny.model(step, past_key_values=past, use_cache=True)
            past = output.past_key_values
            logits = output.logits[:, -1, :].float()
            apply_constraints(logits, [constraint])
            if generator is None:
                token = int(logits.argmax())
            else:
                token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
            constraint.accept(token)  # raises if the mask let a wrong token through
            out.append(token)
            step = torch.tensor([[token]])
    # Finished means the EOS, and only it, may come next.
    logits = torch.zeros(1, tiny.vocab_size)
    apply_constraints(logits, [constraint])
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [tiny.tokenizer.eos_token_id]
    return str(tiny.tokenizer.decode(out))  # special tokens are never allowed: nothing to skip


def check_schema(text: str) -> None:
    """``text`` is JSON valid under SCHEMA (checked by hand: no jsonschema dependency)."""
    value = json.loads(text)
    assert isinstance(value, dict)
    assert list(value) == ["channel", "share", "approved", "note", "tags"]  # the schema's order
    assert value["channel"] in ("amazon", "google", "meta")
    assert type(value["share"]) is int
    assert 0 <= value["share"] <= 100
    assert type(value["approved"]) is bool
    assert isinstance(value["note"], str)
    assert len(value["note"]) <= 12
    assert isinstance(value["tags"], list)
    assert len(value["tags"]) <= 2
    assert all(tag in ("a", "b") for tag in value["tags"])
    # Compact, with json.dumps' separators: no runaway whitespace.
    assert text == json.dumps(value, ensure_ascii=False)


def allowed(logits: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits).nonzero().flatten().tolist())


def test_greedy_decoding_follows_the_schema_and_ends(tiny: Tiny) -> None:
    check_schema(decode(tiny, tiny.cache.json_schema(SCHEMA)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_decoding_follows_the_schema_and_ends(tiny: Tiny, seed: int) -> None:
    text = decode(tiny, tiny.cache.json_schema(SCHEMA), torch.Generator().manual_seed(seed))
    check_schema(text)


def test_json_object_mode_allows_objects_only(tiny: Tiny) -> None:
    grammar = grammar_for(tiny.cache, {"type": "json_object"})
    assert grammar is not None
    constraint = tiny.cache.constraint(grammar)
    for token in tiny.ids('{"a": [1, {"b": null}], "c": "x"}'):
        assert not constraint.finished
        constraint.accept(token)
    assert constraint.finished

    # Arrays and scalars are JSON, not objects. (No decoding here: a random model's object
    # needn't end, its strings and nesting are unbounded.)
    for start in ("[", '"', "1", "n", " "):
        with pytest.raises(RuntimeError, match="rejected"):
            tiny.cache.constraint(grammar).accept(tiny.ids(start)[0])


def test_apply_constraints_masks_constrained_rows_only(tiny: Tiny) -> None:
    schema = tiny.cache.constraint(tiny.cache.json_schema(SCHEMA))
    boolean = tiny.cache.constraint(tiny.cache.json_schema({"type": "boolean"}))
    logits = torch.randn(3, tiny.vocab_size, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    apply_constraints(logits, [schema, None, boolean])

    assert torch.equal(logits[1], before[1])  # the None row is untouched
    for row, starts in ((0, "{"), (2, "tf")):  # an object; true or false
        kept = allowed(logits[row])
        assert {tiny.ids(c)[0] for c in starts} <= kept
        assert all(tiny.tokenizer.decode([t])[0] in starts for t in kept)
        assert torch.equal(logits[row, list(kept)], before[row, list(kept)])  # others kept as is
        assert (logits[row][~torch.isfinite(logits[row])] == -torch.inf).all()

    untouched = before.clone()
    apply_constraints(untouched, [None, None, None])
    assert torch.equal(untouched, before)


def test_padded_model_vocabulary_is_masked(tiny: Tiny) -> None:
    # A model whose lm_head is wider than the tokenizer (Phi-3 pads to a multiple of 32).
    cache = GrammarCache(tiny.tokenizer, tiny.vocab_size + 37)
    constraint = cache.constraint(cache.json_object())
    logits = torch.zeros(1, tiny.vocab_size + 37)
    apply_constraints(logits, [constraint])
    assert allowed(logits[0]) == {tiny.ids("{")[0]}

    with pytest.raises(ValueError, match="logits have 400 tokens"):
        apply_constraints(torch.zeros(1, tiny.vocab_size), [constraint])


def test_strings_allow_neither_special_tokens_nor_raw_control_characters(tiny: Tiny) -> None:
    # xgrammar matches tokens by text: "<|user|>" would be fine inside a JSON string, and its
    # maxLength strings accept a raw tab, which json.loads rejects.
    constraint = tiny.cache.constraint(tiny.cache.json_schema({"type": "string", "maxLength": 9}))
    constraint.accept(tiny.ids('"')[0])
    logits = torch.zeros(1, tiny.vocab_size)
    apply_constraints(logits, [constraint])
    kept = allowed(logits[0])
    assert tiny.ids("a")[0] in kept
    special = {i for i, t in tiny.tokenizer.added_tokens_decoder.items() if t.special}
    assert len(special) >= 6
    assert not special & kept
    controls = {tiny.ids(c)[0] for c in "\t\n\x01"}
    assert not controls & kept


def test_finished_waits_until_nothing_but_eos_can_follow(tiny: Tiny) -> None:
    grammar = tiny.cache.json_schema({"type": "integer", "minimum": 0, "maximum": 100})
    constraint = tiny.cache.constraint(grammar)
    eos = tiny.tokenizer.eos_token_id
    with pytest.raises(RuntimeError, match="does not allow"):
        constraint.accept(eos)  # nothing generated yet
    constraint.accept(tiny.ids("1")[0])
    assert not constraint.finished  # "1" is complete, but "10" and "100" are possible
    constraint.accept(tiny.ids("0")[0])
    constraint.accept(tiny.ids("0")[0])
    assert constraint.finished  # "100" is the maximum
    constraint.accept(eos)
    assert constraint.finished
    logits = torch.zeros(1, tiny.vocab_size)
    apply_constraints(logits, [constraint])  # still maskable: EOS only
    assert allowed(logits[0]) == {eos}
    with pytest.raises(RuntimeError, match="has finished"):
        constraint.accept(tiny.ids("0")[0])


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        ({"type": 5}, "Type should be a string"),
        ({"type": "foo"}, 'Unsupported type "foo"'),
        ({"$ref": "#/$defs/missing"}, "missing"),
        ({"type": "string", "pattern": "("}, "parenthesis"),
        ({"type": "integer", "minimum": "x"}, "number"),
        ({"enum": [float("nan")]}, "not JSON"),
    ],
)
def test_invalid_schemas_are_response_format_errors(
    tiny: Tiny, schema: dict[str, Any], reason: str
) -> None:
    with pytest.raises(ResponseFormatError, match=reason) as raised:
        tiny.cache.json_schema(schema)
    assert ".cc:" not in str(raised.value)  # no C++ source location for API users


def test_cache_keys_ignore_key_order_but_not_property_order(tiny: Tiny) -> None:
    def reorder(value: Any) -> Any:
        """``value`` with the keys of its objects reversed, property names excepted."""
        if not isinstance(value, dict):
            return value
        return {
            k: {n: reorder(s) for n, s in v.items()} if k == "properties" else reorder(v)
            for k, v in reversed(value.items())
        }

    shuffled = reorder(SCHEMA)
    assert list(shuffled) != list(SCHEMA)
    assert shuffled == SCHEMA
    assert tiny.cache.json_schema(shuffled) is tiny.cache.json_schema(SCHEMA)

    # Properties are output in the schema's order: a different order is a different grammar.
    flipped = {**SCHEMA, "properties": dict(reversed(SCHEMA["properties"].items()))}
    grammar = tiny.cache.json_schema(flipped)
    assert grammar is not tiny.cache.json_schema(SCHEMA)
    flipped_start = tiny.ids('{"tags": [], "note": "", "approved": true, "share": 7, ')
    constraint = tiny.cache.constraint(grammar)
    for token in flipped_start:
        constraint.accept(token)
    constraint = tiny.cache.constraint(tiny.cache.json_schema(SCHEMA))
    constraint.accept(tiny.ids("{")[0])
    constraint.accept(tiny.ids('"')[0])
    with pytest.raises(RuntimeError, match="rejected"):
        constraint.accept(tiny.ids("t")[0])  # "channel" comes first there


def test_cache_drops_the_least_recently_used_and_is_thread_safe(tiny: Tiny) -> None:
    cache = GrammarCache(tiny.tokenizer, tiny.vocab_size, max_cached=2)
    one, two = cache.json_schema({"const": 1}), cache.json_schema({"const": 2})
    assert cache.json_schema({"const": 1}) is one  # now the most recent
    cache.json_schema({"const": 3})
    assert cache.json_schema({"const": 1}) is one
    assert cache.json_schema({"const": 2}) is not two  # dropped, compiled again

    results: list[CompiledGrammar] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.json_schema(SCHEMA))) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8
    assert all(grammar is results[0] for grammar in results)


def test_grammar_for_reads_openai_response_formats(tiny: Tiny) -> None:
    assert grammar_for(tiny.cache, None) is None
    assert grammar_for(tiny.cache, {"type": "text"}) is None
    assert grammar_for(tiny.cache, {"type": "json_object"}) is tiny.cache.json_object()
    spec = {"name": "split", "schema": SCHEMA, "strict": True, "description": "A budget split"}
    grammar = grammar_for(tiny.cache, {"type": "json_schema", "json_schema": spec})
    assert grammar is tiny.cache.json_schema(SCHEMA)


@pytest.mark.parametrize(
    ("response_format", "message"),
    [
        ("json", "must be an object"),
        ({"type": "xml"}, "type must be one of"),
        ({}, "type must be one of"),
        ({"type": "json_schema"}, "json_schema must be an object"),
        ({"type": "json_schema", "schema": SCHEMA}, "json_schema must be an object"),
        ({"type": "json_object", "schema": SCHEMA}, "unknown keys: schema"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema must be a JSON Schema"),
        ({"type": "json_schema", "json_schema": {"schema": SCHEMA}}, "name must be a string"),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": True}},
            "schema must be a JSON Schema",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}},
            "strict must be a boolean",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "json_schema": SCHEMA}},
            "unknown keys: json_schema",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}},
            "unsupported JSON schema: Type should be a string",
        ),
    ],
)
def test_grammar_for_rejects_malformed_response_formats(
    tiny: Tiny, response_format: Any, message: str
) -> None:
    with pytest.raises(ResponseFormatError, match=message):
        grammar_for(tiny.cache, response_format)


def test_constraint_is_independent_per_sequence(tiny: Tiny) -> None:
    grammar = tiny.cache.json_schema({"type": "boolean"})
    first: SequenceConstraint = tiny.cache.constraint(grammar)
    for token in tiny.ids("true"):
        first.accept(token)
    second = tiny.cache.constraint(grammar)
    assert first.finished
    assert not second.finished
    for token in tiny.ids("false"):
        second.accept(token)
    assert second.finished
