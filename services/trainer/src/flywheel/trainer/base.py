"""Base model, tokenizer and LoRA wiring for a run: plain or 4-bit (QLoRA), fresh or
continuing a parent adapter.

On a GPU the base loads in bf16 (NF4 + bf16 compute for QLoRA); on the CPU in fp32,
since CPUs without bf16 units run bf16 many times slower.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, TaskType, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedTokenizerBase,
)

from flywheel.trainer.spec import LoraSettings, TrainSpec

# The frozen copy of a parent adapter that TRL's trainers use as the reference policy;
# never part of what a run saves.
REFERENCE_ADAPTER = "ref"


@dataclass
class Loaded:
    """What a recipe trains: the model (PEFT-wrapped when continuing a parent), its
    tokenizer, and the LoRA config to add when starting fresh."""

    model: Any
    tokenizer: PreTrainedTokenizerBase
    peft_config: LoraConfig | None
    dtype: torch.dtype


def compute_dtype() -> torch.dtype:
    """bf16 where the device has it, fp32 on the CPU."""
    return (
        torch.bfloat16
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        else torch.float32
    )


def load_tokenizer(base_model: str) -> PreTrainedTokenizerBase:
    """The base model's tokenizer, with a pad token (the EOS one when it has none)."""
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def lora_config(settings: LoraSettings, *, reward_model: bool) -> LoraConfig:
    """PEFT's LoRA config for these settings."""
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # PEFT takes any number
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules) or "all-linear",
        use_rslora=settings.use_rslora,
        bias="none",
        task_type=TaskType.SEQ_CLS if reward_model else TaskType.CAUSAL_LM,
    )


def _quantization(qlora: bool, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if not qlora:
        return None
    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        # The reward head stays in full precision: it is new and trained (as with LoRA).
        llm_int8_skip_modules=["score"],
    )


def load_model(
    spec: TrainSpec, tokenizer: PreTrainedTokenizerBase, *, gradient_checkpointing: bool
) -> Loaded:
    """The model ``spec`` trains, ready to hand to its TRL trainer."""
    dtype = compute_dtype()
    reward_model = spec.method == "reward"
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "quantization_config": _quantization(spec.qlora, dtype),
    }
    if reward_model:
        model = AutoModelForSequenceClassification.from_pretrained(
            spec.base_model, num_labels=1, **kwargs
        )
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(spec.base_model, **kwargs)
    if spec.qlora:
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=gradient_checkpointing
        )
    if spec.parent_adapter is None:
        return Loaded(model, tokenizer, lora_config(spec.lora, reward_model=reward_model), dtype)
    return Loaded(_continue_from(model, spec.parent_adapter), tokenizer, None, dtype)


def _continue_from(model: Any, parent: Path) -> PeftModel:
    """``model`` with the parent adapter loaded trainable. TRL's preference and online-RL
    trainers copy it into a frozen ``ref`` adapter themselves, so their reference is the
    parent policy rather than the bare base."""
    return PeftModel.from_pretrained(model, parent, is_trainable=True)
