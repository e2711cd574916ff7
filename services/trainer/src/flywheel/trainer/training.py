"""One training run, from a `TrainSpec` to a PEFT adapter folder.

Used by the service's job processes and by `flywheel train` alike. The run lives in a work
folder: ``checkpoints/`` (complete ones marked, see checkpoints.py) and, at the end,
``adapter/`` (PEFT format, safetensors only). Started again on the same folder, a run
resumes from its newest complete checkpoint; with the same seed it ends where an
uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, TrainerCallback, set_seed

from flywheel.core.artifacts import ArtifactStore
from flywheel.trainer import checkpoints, data, fingerprints
from flywheel.trainer.base import REFERENCE_ADAPTER, load_model, load_tokenizer
from flywheel.trainer.callbacks import CompletionMarker
from flywheel.trainer.progress import Progress, ProgressReporter
from flywheel.trainer.recipes import RECIPES, build_config, build_trainer
from flywheel.trainer.ref_cache import ReferenceCache
from flywheel.trainer.rewards import Evaluator, reward_functions
from flywheel.trainer.spec import TrainSpec

ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"


class SpecError(ValueError):
    """The spec cannot run (listing every problem)."""


@dataclass
class Outcome:
    """What a finished run produced."""

    adapter_dir: Path
    # Final metrics: train_loss, eval_loss, parent_eval_loss, reward_margin, tokens/s, ...
    metrics: dict[str, float]
    # The TRL config's values that differ from TRL's defaults, overrides included.
    hyperparameters: dict[str, Any]
    steps: int
    resumed_from_step: int | None
    lora: dict[str, Any] = field(default_factory=dict)
    reference_cache_hit: bool = False


def validate(spec: TrainSpec) -> None:
    """Raise `SpecError` listing what is wrong with ``spec``."""
    from flywheel.trainer.recipes import check_hyperparameters

    problems = spec.problems()
    if spec.method in RECIPES:
        problems += check_hyperparameters(spec.method, spec.hyperparameters)
    if problems:
        raise SpecError("; ".join(problems))


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _changed_settings(args: Any) -> dict[str, Any]:
    """The config's fields that differ from TRL's declared defaults: the recipe's
    effective hyperparameters, small enough for a manifest."""
    skip = {"output_dir", "logging_dir", "use_cpu", "disable_tqdm", "report_to"}
    out: dict[str, Any] = {}
    for f in dataclasses.fields(args):
        value = getattr(args, f.name, None)
        if not f.init or f.name in skip or _default(f) == value:
            continue
        if isinstance(value, enum.Enum):
            value = value.value
        if isinstance(value, str | int | float | bool) or value is None:
            out[f.name] = value
        elif (
            value
            and isinstance(value, list | tuple)
            and all(isinstance(v, str | int | float) for v in value)
        ):
            out[f.name] = list(value)
    return out


def _reference_cache(
    spec: TrainSpec, args: Any, store: ArtifactStore | None
) -> ReferenceCache | None:
    if store is None or not getattr(args, "precompute_ref_log_probs", False):
        return None
    key = fingerprints.cache_key(
        base=fingerprints.base_model_digest(spec.base_model),
        parent=fingerprints.adapter_digest(spec.parent_adapter),
        train=fingerprints.file_digest(spec.train_file),
        eval=fingerprints.file_digest(spec.eval_file),
        max_length=args.max_length,
        ld_alpha=args.ld_alpha,
        qlora=spec.qlora,
        dtype=str(args.bf16),
    )
    return ReferenceCache(store, key)


def run(
    spec: TrainSpec,
    work_dir: Path,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    artifacts: ArtifactStore | None = None,
    callbacks: list[TrainerCallback] | None = None,
    evaluators: Mapping[str, Evaluator] | None = None,
) -> Outcome:
    """Train ``spec`` in ``work_dir`` (resuming if it holds a complete checkpoint)."""
    validate(spec)
    recipe = RECIPES[spec.method]
    set_seed(spec.seed)
    tokenizer = load_tokenizer(spec.base_model)
    chat = tokenizer.chat_template is not None
    dimension = spec.reward_dimension
    train = data.load_dataset(spec.train_file, spec.method, chat=chat, dimension=dimension)
    evaluation = (
        data.load_dataset(spec.eval_file, spec.method, chat=chat, dimension=dimension)
        if spec.eval_file
        else None
    )
    checkpoint_root = work_dir / CHECKPOINT_DIR
    args = build_config(recipe, spec, checkpoint_root)
    loaded = load_model(spec, tokenizer, gradient_checkpointing=bool(args.gradient_checkpointing))
    cache = _reference_cache(spec, args, artifacts) if recipe.method == "dpo" else None
    # The DPO recipe's trainer reads its reference log-probs through the cache.
    extra: dict[str, Any] = {"reference_cache": cache} if cache is not None else {}
    # The marker goes last: a checkpoint is complete only once every other callback has
    # seen it saved.
    all_callbacks: list[TrainerCallback] = [*(callbacks or []), CompletionMarker()]
    if on_progress is not None:
        all_callbacks.append(ProgressReporter(on_progress))
    set_seed(spec.seed)
    trainer = build_trainer(
        recipe, loaded, args, train, evaluation,
        callbacks=all_callbacks,
        reward_funcs=reward_functions(spec.reward_functions, evaluators) if recipe.online else [],
        **extra,
    )  # fmt: skip
    # Progress goes through on_progress; TRL's printed log dicts would only be noise.
    trainer.remove_callback(PrinterCallback)
    metrics: dict[str, float] = {}
    resume = checkpoints.latest_complete(checkpoint_root)
    evaluate = evaluation is not None and not recipe.online
    if evaluate and spec.parent_adapter is not None and resume is None:
        metrics["parent_eval_loss"] = float(trainer.evaluate()["eval_loss"])
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    metrics.update(_final_metrics(trainer, result.metrics))
    if evaluate:
        metrics["eval_loss"] = float(trainer.evaluate()["eval_loss"])
    adapter_dir = _save_adapter(trainer.model, work_dir / ADAPTER_DIR)
    return Outcome(
        adapter_dir=adapter_dir,
        metrics=metrics,
        hyperparameters=_changed_settings(args),
        steps=int(trainer.state.global_step),
        resumed_from_step=int(resume.name.split("-")[1]) if resume else None,
        lora=_lora_settings(trainer.model),
        reference_cache_hit=bool(getattr(trainer, "reference_cache_hits", 0)),
    )


def _final_metrics(trainer: Any, train_metrics: dict[str, Any]) -> dict[str, float]:
    out = {
        k: float(v)
        for k, v in train_metrics.items()
        if isinstance(v, int | float) and math.isfinite(v)
    }
    history = [h for h in trainer.state.log_history if "rewards/margins" in h]
    if history:
        out["reward_margin"] = float(history[-1]["rewards/margins"])
    return out


def _lora_settings(model: Any) -> dict[str, Any]:
    config = model.peft_config["default"]
    modules = config.target_modules
    return {
        "r": int(config.r),
        "alpha": float(config.lora_alpha),
        "dropout": float(config.lora_dropout),
        # Module kinds (q_proj, ...), not every layer's path: what composition compares.
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules})
        if isinstance(modules, set | list)
        else [str(modules)],
        "use_rslora": bool(config.use_rslora),
    }


def _save_adapter(model: Any, target: Path) -> Path:
    """The trained adapter in PEFT format, safetensors only (no pickles for loaders to
    trust), without the frozen reference copy."""
    if target.exists():
        shutil.rmtree(target)
    adapters = [n for n in model.peft_config if n != REFERENCE_ADAPTER]
    model.save_pretrained(target, safe_serialization=True, selected_adapters=adapters)
    unsafe = [p.name for p in target.rglob("*") if p.suffix in (".bin", ".pt", ".pkl")]
    if unsafe:
        raise RuntimeError(f"adapter folder has pickle files: {unsafe}")
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return target
