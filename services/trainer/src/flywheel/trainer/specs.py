"""Training specs as callers send them (the `TrainingSpec` message) and as a run takes them
(`TrainSpec`): validation up front, and the mapping once the job's files are in place."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from flywheel.contracts.trainer.v1 import resources_pb2 as tr
from flywheel.core.errors import FieldError, InvalidArgument
from flywheel.trainer.manifest import METHOD_NAMES
from flywheel.trainer.spec import LoraSettings, TrainSpec

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
SNAPSHOT = re.compile(r"^sha256:[0-9a-f]{64}$")


def default_adapter_name(tenant_id: str, spec: tr.TrainingSpec) -> str:
    """``tenant-task-method``, as the dataset policy names its requests."""
    method = METHOD_NAMES.get(spec.method, "adapter")
    return f"{tenant_id}-{spec.task or 'general'}-{method}"[:200]


def check(spec: tr.TrainingSpec, *, default_base_model: str) -> tr.TrainingSpec:
    """``spec`` with defaults filled in, or `InvalidArgument` naming every bad field.

    Hyperparameter names are checked by the job itself against TRL's config (importing
    TRL here would cost the service seconds per process); a typo fails the job at once.
    """
    errors = []
    if spec.method not in METHOD_NAMES:
        errors.append(
            FieldError("spec.method", "must be one of " + ", ".join(METHOD_NAMES.values()))
        )
    if not spec.base_model and not default_base_model:
        errors.append(FieldError("spec.base_model", "is required (the service has no default)"))
    if not SNAPSHOT.match(spec.dataset_snapshot_id):
        errors.append(
            FieldError("spec.dataset_snapshot_id", "must be a snapshot id, sha256:<64 hex>")
        )
    if spec.adapter_name and not NAME.match(spec.adapter_name):
        errors.append(FieldError("spec.adapter_name", "letters, digits, '.', '_', '-' only"))
    lora = spec.lora
    if lora.HasField("r") and not 1 <= lora.r <= 1024:
        errors.append(FieldError("spec.lora.r", "must be in 1..1024"))
    if lora.HasField("dropout") and not 0 <= lora.dropout < 1:
        errors.append(FieldError("spec.lora.dropout", "must be in [0, 1)"))
    if (
        spec.method in (tr.TRAINING_METHOD_GRPO, tr.TRAINING_METHOD_RLOO)
        and not spec.reward_functions
    ):
        errors.append(FieldError("spec.reward_functions", "online RL needs at least one"))
    if spec.HasField("reward_model"):
        errors.append(FieldError(
            "spec.reward_model",
            "online RL from a reward model is not available yet; use reward_functions",
        ))  # fmt: skip
    if spec.reward_dimension and spec.method != tr.TRAINING_METHOD_REWARD:
        errors.append(FieldError("spec.reward_dimension", "applies to the reward method only"))
    if spec.resources.gpus > 64:
        errors.append(FieldError("spec.resources.gpus", "at most 64"))
    if errors:
        raise InvalidArgument(errors)
    filled = tr.TrainingSpec()
    filled.CopyFrom(spec)
    filled.base_model = spec.base_model or default_base_model
    return filled


def to_json(spec: tr.TrainingSpec) -> dict[str, object]:
    """The spec as stored with its job."""
    return json_format.MessageToDict(spec, preserving_proto_field_name=True)


def from_json(data: dict[str, object]) -> tr.TrainingSpec:
    """The spec `to_json` stored."""
    return json_format.ParseDict(data, tr.TrainingSpec())


def _plain_numbers(values: dict[str, Any]) -> dict[str, Any]:
    """A Struct holds every number as a double; TRL's integer options (max_steps, batch
    sizes) must get ints, and an integral float is what a JSON caller meant as one."""
    return {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in values.items()}


def train_spec(
    spec: tr.TrainingSpec,
    *,
    adapter_name: str,
    train_file: Path,
    eval_file: Path | None,
    parent_adapter: Path | None,
    default_checkpoint_every: int,
) -> TrainSpec:
    """The run's `TrainSpec` for a job whose data (and parent) are at these paths."""
    lora = spec.lora
    defaults = LoraSettings()
    return TrainSpec(
        method=METHOD_NAMES[spec.method],
        base_model=spec.base_model,
        train_file=train_file,
        eval_file=eval_file,
        adapter_name=adapter_name,
        adapter_type=spec.adapter_type or "task",
        task=spec.task,
        lora=LoraSettings(
            r=lora.r if lora.HasField("r") else defaults.r,
            alpha=lora.alpha if lora.HasField("alpha") else defaults.alpha,
            dropout=lora.dropout if lora.HasField("dropout") else defaults.dropout,
            target_modules=tuple(lora.target_modules),
            use_rslora=lora.use_rslora,
        ),
        qlora=spec.qlora,
        hyperparameters=_plain_numbers(json_format.MessageToDict(spec.hyperparameters)),
        seed=spec.seed if spec.HasField("seed") else 0,
        reward_functions=tuple(spec.reward_functions),
        parent_adapter=parent_adapter,
        checkpoint_every=spec.checkpoint_every_steps or default_checkpoint_every,
        dataset_snapshot_id=spec.dataset_snapshot_id,
        reward_dimension=spec.reward_dimension,
    )
