"""Reading the base model and LoRA adapter folders from disk."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from flywheel.inference.engine.lora import AdapterLoadError, AdapterWeights, adapter_weights

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def load_base(path: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The causal LM and tokenizer at ``path`` (a folder or a Hugging Face id in the cache)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.requires_grad_(False)
    return model, tokenizer


def read_adapter(path: str, dtype: torch.dtype) -> AdapterWeights:
    """The LoRA adapter in folder ``path`` (PEFT layout, safetensors only).

    Raises ``AdapterLoadError`` with the reason for anything else: a missing folder or
    file, pickle weights, a truncated or malformed safetensors file, a bad config.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterLoadError(f"no adapter folder at {path!r}")
    config_file, weights_file = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_file.is_file():
        raise AdapterLoadError(f"{path!r} has no {ADAPTER_CONFIG}")
    if not weights_file.is_file():
        # PEFT's adapter_model.bin is a pickle: loading one can run code. Never.
        raise AdapterLoadError(f"{path!r} has no {ADAPTER_WEIGHTS} (only safetensors are loaded)")
    try:
        config: dict[str, Any] = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise AdapterLoadError(f"{ADAPTER_CONFIG} is not valid JSON: {error}") from error
    if not isinstance(config, dict) or str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterLoadError(f"{ADAPTER_CONFIG} does not describe a LoRA adapter")
    try:
        tensors = load_file(os.fspath(weights_file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise AdapterLoadError(f"{ADAPTER_WEIGHTS} cannot be read: {error}") from error
    return adapter_weights(tensors, config, dtype)
