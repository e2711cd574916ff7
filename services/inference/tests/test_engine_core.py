"""The CPU engine's core against PEFT: same greedy tokens, whatever shares the batch.

Each adapter's output through the slot tables must equal PEFT's own forward pass of that
adapter, for prefill (per-row gather) and decode (masked slot columns) alike, alone or in
a batch mixing adapters of different ranks and target modules, and when there are more
adapters than slots (evicted, refilled).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from flywheel.inference.engine.core import ChoiceEvent, EngineCore, EngineRequest
from flywheel.inference.engine.loading import load_base, read_adapter
from flywheel.inference.engine.sampling import SamplingParams
from flywheel.inference.testing import random_lora_adapter

PROMPTS = ("Split a $10,000 budget", "Write a headline for running shoes", "hi")
TOKENS = 12


@pytest.fixture(scope="module")
def adapters(base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engine-core-adapters")
    return {
        "r8-all": random_lora_adapter(base_model, root / "a", rank=8, seed=1),
        "r4-attn": random_lora_adapter(
            base_model, root / "b", rank=4, seed=2, target_modules=("q_proj", "v_proj")
        ),
        "r16-mlp": random_lora_adapter(
            base_model,
            root / "c",
            rank=16,
            alpha=8,
            seed=3,
            target_modules=("gate_proj", "up_proj", "down_proj"),
        ),
    }


@pytest.fixture(scope="module")
def expected(base_model: Path, adapters: dict[str, Path]) -> dict[tuple[str | None, str], str]:
    """PEFT's greedy continuation of each prompt, per adapter (None: the base model)."""
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    out: dict[tuple[str | None, str], str] = {}
    for name in (None, *adapters):
        model: Any = AutoModelForCausalLM.from_pretrained(base_model)
        if name is not None:
            model = PeftModel.from_pretrained(model, adapters[name])
        model.eval()
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            with torch.inference_mode():
                generated = model.generate(
                    ids, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False
                )
            out[(name, prompt)] = str(
                tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
            )
    return out


def _engine(base_model: Path, adapters: dict[str, Path], slots: int) -> Iterator[EngineCore]:
    model, tokenizer = load_base(str(base_model), torch.float32)
    core = EngineCore(model, tokenizer, max_loras=slots, max_lora_rank=16, max_num_seqs=16)
    core.start()
    for name, path in adapters.items():
        core.add_adapter(name, str(path), read_adapter(str(path), torch.float32)).result()
    yield core
    core.stop()


@pytest.fixture(scope="module")
def engine(base_model: Path, adapters: dict[str, Path]) -> Iterator[EngineCore]:
    yield from _engine(base_model, adapters, slots=4)


@pytest.fixture(scope="module")
def cramped(base_model: Path, adapters: dict[str, Path]) -> Iterator[EngineCore]:
    """Two slots for three adapters: requests wait for a slot, slots are refilled."""
    yield from _engine(base_model, adapters, slots=2)


def _generate(core: EngineCore, prompt: str, adapter: str | None, tokens: int = TOKENS) -> str:
    done = threading.Event()
    text: list[str] = []
    errors: list[BaseException] = []

    def sink(event: ChoiceEvent | BaseException) -> None:
        if isinstance(event, BaseException):
            errors.append(event)
            done.set()
            return
        text.append(event.delta)
        if event.finish_reason is not None:
            done.set()

    ids = core.tokenizer(prompt)["input_ids"]
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    core.submit(EngineRequest(ids, adapter, params, sink))
    assert done.wait(60), "no answer in time"
    assert not errors, errors
    return "".join(text)


def _all_at_once(core: EngineCore, cases: list[tuple[str | None, str]]) -> dict[int, str]:
    results: dict[int, str] = {}

    def run(index: int, adapter: str | None, prompt: str) -> None:
        results[index] = _generate(core, prompt, adapter)

    threads = [
        threading.Thread(target=run, args=(i, adapter, prompt))
        for i, (adapter, prompt) in enumerate(cases)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_each_adapter_alone_matches_peft(
    engine: EngineCore, expected: dict[tuple[str | None, str], str]
) -> None:
    for (adapter, prompt), text in expected.items():
        assert _generate(engine, prompt, adapter) == text, (adapter, prompt)
    # The adapters do change the answers (else this test could not tell them apart).
    assert len({expected[(name, PROMPTS[0])] for name in (None, "r8-all", "r16-mlp")}) == 3


def test_mixed_batches_match_peft(
    engine: EngineCore, expected: dict[tuple[str | None, str], str]
) -> None:
    cases = list(expected) * 2
    results = _all_at_once(engine, cases)
    for index, case in enumerate(cases):
        assert results[index] == expected[case], case


def test_more_adapters_than_slots(
    cramped: EngineCore, expected: dict[tuple[str | None, str], str]
) -> None:
    cases = [case for case in expected if case[0] is not None]
    results = _all_at_once(cramped, cases)
    for index, case in enumerate(cases):
        assert results[index] == expected[case], case


def test_sequences_joining_and_leaving_at_every_step(engine: EngineCore) -> None:
    """Staggered arrivals and lengths: rows leave (the last row moves into the hole) and
    join (written into free rows) while others decode; each answer equals its solo run."""
    adapters = [None, "r8-all", "r4-attn", "r16-mlp"]
    cases = [(adapters[i % 4], PROMPTS[i % 3], 2 + (5 * i) % 17) for i in range(14)]
    solo = [_generate(engine, prompt, adapter, tokens) for adapter, prompt, tokens in cases]
    results: dict[int, str] = {}

    def run(index: int) -> None:
        adapter, prompt, tokens = cases[index]
        results[index] = _generate(engine, prompt, adapter, tokens)

    threads = []
    for index in range(len(cases)):
        thread = threading.Thread(target=run, args=(index,))
        thread.start()
        threads.append(thread)
        time.sleep(0.003 * (index % 3))
    for thread in threads:
        thread.join()
    assert [results[i] for i in range(len(cases))] == solo
