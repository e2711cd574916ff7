"""Recipes: for each method, TRL's config class, its trainer and Flywheel's defaults.

A recipe's config is TRL's own dataclass, so every TRL option is available as a
hyperparameter override, and a name TRL does not know is an error rather than silently
ignored. Flywheel's defaults differ from TRL's in three ways, all for the hardware a job
lands on: bf16 only where the device has it, gradient checkpointing off on the CPU (tiny
models gain nothing from it and pay ~30% more compute), and LoRA-sized learning rates.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import TrainerCallback, TrainingArguments
from trl import (
    DPOConfig,
    GRPOConfig,
    GRPOTrainer,
    KTOConfig,
    KTOTrainer,
    RewardConfig,
    RewardTrainer,
    RLOOConfig,
    RLOOTrainer,
    SFTConfig,
)

from flywheel.trainer.base import Loaded
from flywheel.trainer.packing import PackedDPOTrainer, PackedSFTTrainer
from flywheel.trainer.spec import TrainSpec

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

# Set by Flywheel from the spec and the job's folder; overriding them would break
# checkpoints, seeding or reporting.
RESERVED = frozenset(
    {"output_dir", "seed", "data_seed", "save_strategy", "save_steps", "save_total_limit",
     "report_to", "resume_from_checkpoint", "push_to_hub", "hub_model_id", "logging_dir"}
)  # fmt: skip


class RecipeError(ValueError):
    """Hyperparameters the recipe cannot take."""


@dataclass(frozen=True)
class Recipe:
    """One method: its TRL config and trainer, and defaults on top of TRL's."""

    method: str
    config_class: type[TrainingArguments]
    trainer_class: type[Any]
    defaults: dict[str, Any] = field(default_factory=dict)
    online: bool = False


_ONLINE = {"num_generations": 4, "max_completion_length": 128, "per_device_train_batch_size": 4}
_PRECOMPUTE = {"precompute_ref_log_probs": True}
RECIPES: dict[str, Recipe] = {
    r.method: r
    for r in (
        # Padding-free forward passes; DPO's pairs with their prompt once (packing.py).
        Recipe("sft", SFTConfig, PackedSFTTrainer, {"learning_rate": 2e-4}),
        # Reference log-probs once per dataset (and cached across runs, see ref_cache.py)
        # instead of a second forward pass every step.
        Recipe("dpo", DPOConfig, PackedDPOTrainer, {"learning_rate": 5e-5, **_PRECOMPUTE}),
        Recipe("kto", KTOConfig, KTOTrainer, {"learning_rate": 5e-5}),
        Recipe("orpo", ORPOConfig, ORPOTrainer, {"learning_rate": 5e-5}),
        Recipe("reward", RewardConfig, RewardTrainer, {"learning_rate": 1e-4}),
        Recipe("grpo", GRPOConfig, GRPOTrainer, {"learning_rate": 1e-5, **_ONLINE}, online=True),
        Recipe("rloo", RLOOConfig, RLOOTrainer, {"learning_rate": 1e-5, **_ONLINE}, online=True),
    )
}  # fmt: skip


def config_fields(recipe: Recipe) -> set[str]:
    """The hyperparameter names ``recipe`` accepts."""
    return {f.name for f in dataclasses.fields(recipe.config_class) if f.init} - RESERVED


def check_hyperparameters(method: str, hyperparameters: dict[str, Any]) -> list[str]:
    """Problems with ``hyperparameters`` for ``method`` (empty when all are known)."""
    accepted = config_fields(RECIPES[method])
    return [
        f"{name!r} is not a {RECIPES[method].config_class.__name__} option"
        for name in sorted(hyperparameters)
        if name not in accepted
    ]


def device_defaults(*, qlora: bool) -> dict[str, Any]:
    """Precision and checkpointing for the device the run is on."""
    gpu = torch.cuda.is_available()
    return {
        "bf16": gpu and torch.cuda.is_bf16_supported(),
        "fp16": False,
        # Recomputation pays off on GPUs short of memory (QLoRA's reason to exist).
        "gradient_checkpointing": gpu and qlora,
        "use_cpu": not gpu,
    }


def build_config(recipe: Recipe, spec: TrainSpec, output_dir: Path) -> TrainingArguments:
    """TRL's config for ``spec``: Flywheel's defaults, then the spec's overrides."""
    problems = check_hyperparameters(recipe.method, spec.hyperparameters)
    if problems:
        raise RecipeError("; ".join(problems))
    values: dict[str, Any] = {
        **device_defaults(qlora=spec.qlora),
        "num_train_epochs": 1,
        "logging_steps": 1,
        "report_to": "none",
        "disable_tqdm": True,
        "include_num_input_tokens_seen": "non_padding",
        **recipe.defaults,
        **spec.hyperparameters,
        "output_dir": str(output_dir),
        "seed": spec.seed,
        "data_seed": spec.seed,
        "save_strategy": "steps" if spec.checkpoint_every else "no",
        "save_steps": spec.checkpoint_every or 500,
        # Old checkpoints are pruned by Flywheel once a newer one is complete.
        "save_total_limit": None,
    }
    if values["gradient_checkpointing"]:
        values.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})
    accepted = {f.name for f in dataclasses.fields(recipe.config_class) if f.init}
    return recipe.config_class(**{k: v for k, v in values.items() if k in accepted})


RewardFn = Callable[..., list[float | None]]


def build_trainer(
    recipe: Recipe,
    loaded: Loaded,
    args: TrainingArguments,
    train: Dataset,
    evaluation: Dataset | None,
    *,
    callbacks: list[TrainerCallback],
    reward_funcs: list[RewardFn],
    trainer_class: type[Any] | None = None,
    **extra: Any,
) -> Any:
    """The TRL trainer of ``recipe`` over the loaded model and data."""
    kwargs: dict[str, Any] = {
        "model": loaded.model,
        "args": args,
        "train_dataset": train,
        "eval_dataset": evaluation,
        "processing_class": loaded.tokenizer,
        "callbacks": callbacks,
        "peft_config": loaded.peft_config,
        **extra,
    }
    if recipe.online:
        kwargs["reward_funcs"] = reward_funcs
        del kwargs["eval_dataset"]  # rollouts on eval prompts would double the cost
    return (trainer_class or recipe.trainer_class)(**kwargs)
