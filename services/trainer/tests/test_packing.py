"""Packed forward passes give what TRL's padded ones give: the same hidden states at every
real token and the same gradients, for SFT rows and for DPO pairs with a shared prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from trl.trainer.dpo_trainer import DataCollatorForPreference

from flywheel.trainer import packing


def _pairs() -> list[dict[str, list[int]]]:
    # Prompts and completions of different lengths; the last pair's completions start
    # alike, so their shared prefix runs into the completion.
    return [
        {"prompt_ids": [1, 5, 6, 7], "chosen_ids": [8, 9, 10], "rejected_ids": [11]},
        {"prompt_ids": [1, 12], "chosen_ids": [13], "rejected_ids": [14, 15, 16, 17, 18]},
        {"prompt_ids": [1, 20, 21], "chosen_ids": [22, 23, 2], "rejected_ids": [22, 24, 2]},
    ]


def test_pairs_are_laid_out_once_with_their_prompt() -> None:
    batch = packing.PackingCollator(DataCollatorForPreference(pad_token_id=0), paired=True)(
        _pairs()
    )
    plan = batch["packing"]
    # 4+3+1, 2+1+5, 3+3+2 tokens (the third pair shares one completion token too).
    assert plan.input_ids.shape == (1, 8 + 8 + 8)
    assert plan.position_ids[0, :8].tolist() == [0, 1, 2, 3, 4, 5, 6, 4]
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    assert torch.equal(plan.input_ids[0][plan.gather].view(ids.shape)[mask], ids[mask])


def _model(base_model: Path) -> Any:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    lora = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, lora)


def _hidden_and_grads(model: Any, batch: dict[str, Any], packed: bool) -> tuple[Any, Any]:
    model.zero_grad()
    extra = {"packing": batch["packing"]} if packed else {}
    backbone = model.get_base_model().model
    hidden = backbone(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra
    ).last_hidden_state
    real = hidden[batch["attention_mask"].bool()]
    (real**2).mean().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    return real.detach(), grads


def test_packed_forward_matches_the_padded_one(base_model: Path) -> None:
    model = _model(base_model)
    assert packing.enable_packing(model)
    collate = packing.PackingCollator(DataCollatorForPreference(pad_token_id=0), paired=True)
    batch = collate(_pairs())
    padded_hidden, padded_grads = _hidden_and_grads(model, batch, packed=False)
    packed_hidden, packed_grads = _hidden_and_grads(model, batch, packed=True)
    assert torch.allclose(packed_hidden, padded_hidden, atol=1e-5)
    assert torch.allclose(packed_grads, padded_grads, rtol=1e-4, atol=1e-6)
