"""Every recipe trains a few steps on a tiny model and yields a PEFT adapter that loads
back and changes the model; DPO on a clear preference moves the margin; QLoRA trains on
a 4-bit base; reference log-probs are cached; a child adapter records its parent."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from flywheel.core.artifacts import LocalArtifactStore
from flywheel.domains.retail_media import budgeting_prompt
from flywheel.trainer import data, training
from flywheel.trainer.bootstrap import bootstrap_model
from flywheel.trainer.spec import LoraSettings, TrainSpec
from flywheel.trainer.testing import TINY, preference_rows, write_jsonl

FILES = {"sft": "sft", "dpo": "preference", "kto": "unpaired", "orpo": "preference",
         "reward": "reward", "grpo": "prompts", "rloo": "prompts"}  # fmt: skip
ONLINE = {"num_generations": 2, "max_completion_length": 8, "per_device_train_batch_size": 2}


def _letters(prompt: str, completion: str) -> float:
    """A reward with spread even for a barely trained model: the share of letters."""
    return sum(c.isalpha() for c in completion) / max(len(completion), 1)


def spec_for(method: str, base: Path, data: Path, **changes: Any) -> TrainSpec:
    hyperparameters = {"max_steps": 3, "learning_rate": 1e-2, "per_device_train_batch_size": 4}
    if method in ("grpo", "rloo"):
        hyperparameters.update(ONLINE)
        prompts = [{"prompt": budgeting_prompt(random.Random(i)).text} for i in range(6)]
        write_jsonl(data / "prompts.jsonl", prompts)
    values: dict[str, Any] = {
        "method": method,
        "base_model": str(base),
        "train_file": data / f"{FILES[method]}.jsonl",
        "lora": LoraSettings(r=4, alpha=8, dropout=0.0),
        "hyperparameters": hyperparameters,
        "reward_functions": ("letters",) if method in ("grpo", "rloo") else (),
    }
    return TrainSpec(**{**values, **changes})


def _logits(model: Any, tokenizer: Any) -> torch.Tensor:
    ids = tokenizer("<|user|>\nAllocate $5,000 across Amazon Ads", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits: torch.Tensor = model(input_ids=ids).logits
    return logits


def _lora_b_norm(adapter: Path) -> float:
    weights = load_file(adapter / "adapter_model.safetensors")
    return sum(float(w.abs().sum()) for k, w in weights.items() if "lora_B" in k)


@pytest.mark.parametrize("method", ["sft", "dpo", "kto", "orpo", "reward", "grpo", "rloo"])
def test_recipe_trains_an_adapter_that_loads_back(
    method: str, base_model: Path, datasets_dir: Path, tmp_path: Path
) -> None:
    spec = spec_for(method, base_model, datasets_dir)
    outcome = training.run(spec, tmp_path / "run", evaluators={"letters": _letters})

    adapter = outcome.adapter_dir
    assert outcome.steps == 3
    assert (adapter / "adapter_config.json").is_file()
    assert sorted(p.suffix for p in adapter.iterdir()) == [".json", ".md", ".safetensors"]
    assert _lora_b_norm(adapter) > 0  # LoRA's B starts at zero: non-zero means it learned
    if method == "reward":
        return
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    base = AutoModelForCausalLM.from_pretrained(base_model)
    before = _logits(base, tokenizer)
    tuned = PeftModel.from_pretrained(base, adapter)
    assert not torch.allclose(_logits(tuned, tokenizer), before, atol=1e-5)


def _margin(model: Any, tokenizer: Any, rows: list[dict[str, str]]) -> float:
    """Mean log p(chosen) - log p(rejected) over ``rows``, in the chat layout."""

    def logp(prompt: str, answer: str) -> float:
        messages = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": answer}], tokenize=False
        )
        head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([tokenizer(full, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logprobs = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        targets = ids[0, 1:]
        picked = logprobs.gather(1, targets[:, None])[:, 0]
        return float(picked[len(head_ids) - 1 :].sum())

    return sum(
        logp(r["prompt"], r["chosen"]) - logp(r["prompt"], r["rejected"]) for r in rows
    ) / len(rows)


def test_dpo_on_a_clear_preference_raises_the_margin(
    base_model: Path, datasets_dir: Path, tmp_path: Path
) -> None:
    spec = spec_for("dpo", base_model, datasets_dir, hyperparameters={
        "max_steps": 12, "learning_rate": 5e-3, "per_device_train_batch_size": 4, "beta": 0.1,
        "loss_type": ["sigmoid"],
    })  # fmt: skip
    outcome = training.run(spec, tmp_path / "run")
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    base = AutoModelForCausalLM.from_pretrained(base_model)
    held_out = preference_rows(4, seed=7)
    before = _margin(base, tokenizer, held_out)
    after = _margin(PeftModel.from_pretrained(base, outcome.adapter_dir), tokenizer, held_out)
    assert after > before + 1.0, (before, after)
    assert outcome.metrics["reward_margin"] > 0


def test_ipo_loss_variant_is_a_hyperparameter(
    base_model: Path, datasets_dir: Path, tmp_path: Path
) -> None:
    spec = spec_for("dpo", base_model, datasets_dir, hyperparameters={
        "max_steps": 2, "loss_type": ["ipo"], "per_device_train_batch_size": 4,
    })  # fmt: skip
    outcome = training.run(spec, tmp_path / "run")
    assert outcome.hyperparameters["loss_type"] == ["ipo"]


def test_qlora_trains_on_a_4bit_base(tmp_path: Path, datasets_dir: Path) -> None:
    # bitsandbytes quantises in blocks of 64 inputs, so the layers must be that wide.
    wide = dataclasses.replace(TINY, hidden_size=64, intermediate_size=128, steps=5)
    base = bootstrap_model(tmp_path / "models", wide, progress=False)
    spec = spec_for("sft", base, datasets_dir, qlora=True)
    seen: list[str] = []

    class LayerKinds(TrainerCallback):
        def on_train_begin(
            self, args: Any, state: Any, control: Any, model: Any = None, **_: Any
        ) -> None:
            seen.extend(type(m).__name__ for m in model.modules())

    outcome = training.run(spec, tmp_path / "run", callbacks=[LayerKinds()])
    assert "Linear4bit" in seen  # the base really was 4-bit
    assert _lora_b_norm(outcome.adapter_dir) > 0


def test_reference_log_probs_are_cached_in_the_artifact_store(
    base_model: Path, datasets_dir: Path, tmp_path: Path
) -> None:
    store = LocalArtifactStore(tmp_path / "artifacts")
    spec = spec_for("dpo", base_model, datasets_dir, hyperparameters={"max_steps": 2})
    first = training.run(spec, tmp_path / "a", artifacts=store)
    second = training.run(spec, tmp_path / "b", artifacts=store)
    assert not first.reference_cache_hit
    assert second.reference_cache_hit
    assert len(list(store.list("cache/ref-logps/"))) == 1
    a = load_file(first.adapter_dir / "adapter_model.safetensors")
    b = load_file(second.adapter_dir / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # same reference, same result


def test_dpo_continues_from_a_parent_sft_adapter(
    base_model: Path, datasets_dir: Path, tmp_path: Path
) -> None:
    sft = training.run(spec_for("sft", base_model, datasets_dir), tmp_path / "sft")
    spec = spec_for(
        "dpo", base_model, datasets_dir, parent_adapter=sft.adapter_dir,
        eval_file=datasets_dir / "preference-eval.jsonl", hyperparameters={"max_steps": 2},
    )  # fmt: skip
    child = training.run(spec, tmp_path / "dpo")
    assert "parent_eval_loss" in child.metrics
    assert "eval_loss" in child.metrics
    assert child.lora["r"] == 4  # the parent's shape, continued
    parent_b = load_file(sft.adapter_dir / "adapter_model.safetensors")
    child_b = load_file(child.adapter_dir / "adapter_model.safetensors")
    assert parent_b.keys() == child_b.keys()
    assert any(not torch.equal(parent_b[k], child_b[k]) for k in parent_b)


def test_a_bad_spec_lists_every_problem(base_model: Path, tmp_path: Path) -> None:
    spec = TrainSpec(
        method="dpo", base_model=str(base_model), train_file=tmp_path / "missing.jsonl",
        hyperparameters={"learning_rate": 1e-4, "no_such_option": 1, "output_dir": "/etc"},
        lora=LoraSettings(r=0),
    )  # fmt: skip
    with pytest.raises(training.SpecError) as caught:
        training.run(spec, tmp_path / "run")
    message = str(caught.value)
    for part in ("missing.jsonl", "no_such_option", "output_dir", "lora r"):
        assert part in message


def test_a_reward_model_for_one_dimension_learns_from_its_scores(
    base_model: Path, datasets_dir: Path, tmp_path: Path
) -> None:
    rows = []
    for i, row in enumerate(preference_rows(12)):
        # Compliance disagrees with the overall preference on every other pair.
        good, bad = (
            {"dimension": "compliance", "score": 0.9},
            {"dimension": "compliance", "score": 0.2},
        )
        first, second = (good, bad) if i % 2 else (bad, good)
        rows.append({**row, "margin": 1.0, "chosen_scores": [first],
                     "rejected_scores": [second, {"dimension": "tone", "score": 0.5}]})  # fmt: skip
    rows.append(
        {**preference_rows(1)[0], "margin": 1.0, "chosen_scores": [], "rejected_scores": []}
    )
    write_jsonl(datasets_dir / "scored.jsonl", rows)

    pairs = data.dimension_pairs(rows, "compliance")
    assert len(pairs) == 12  # the pair without scores is left out
    flipped = [p for p, r in zip(pairs, rows, strict=False) if p["chosen"] == r["rejected"]]
    assert len(flipped) == 6
    assert all(p["margin"] == pytest.approx(0.7) for p in pairs)
    with pytest.raises(data.DataError, match="tone"):
        data.dimension_pairs(rows, "tone")  # only one side has a tone score

    spec = spec_for("reward", base_model, datasets_dir, train_file=datasets_dir / "scored.jsonl",
                    reward_dimension="compliance")  # fmt: skip
    outcome = training.run(spec, tmp_path / "run")
    assert outcome.steps == 3
    assert _lora_b_norm(outcome.adapter_dir) > 0
    wrong = spec_for("dpo", base_model, datasets_dir, reward_dimension="compliance")
    assert "reward method only" in " ".join(wrong.problems())
