"""The trainer contract's ``TrainingSpec`` in REST, shared by the features that send one:
dataset training requests (routes/datasets) and training jobs (routes/training).

Schemas and their protobuf conversions live together here so both features name, bound
and map a recipe, LoRA settings and a spec the same way.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field

from flywheel.contracts.trainer.v1 import resources_pb2 as tr
from flywheel.gateway.convert import adapter_of, dict_of
from flywheel.gateway.routes.common import (
    AdapterRef,
    Float32,
    RequestModel,
    ResponseModel,
    StrictBool,
    UInt32,
)

SNAPSHOT_ID_PATTERN = r"^sha256:[0-9a-f]{64}$"

SnapshotIdField = Annotated[
    str,
    Field(
        pattern=SNAPSHOT_ID_PATTERN,
        description="`sha256:<hex>` of the snapshot's data.",
        examples=["sha256:" + "0" * 64],
    ),
]

# The trainer's own bound (specs.check); larger ranks are refused before a job is queued.
MAX_LORA_RANK = 1024
# The trainer's adapter names (specs.NAME): they become folder and artifact key names.
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"


class TrainingMethod(StrEnum):
    """Training recipe (a TRL trainer and a PEFT config)."""

    SFT = "sft"
    DPO = "dpo"
    KTO = "kto"
    ORPO = "orpo"
    REWARD = "reward"
    GRPO = "grpo"
    RLOO = "rloo"


METHOD_TO_PROTO = {
    TrainingMethod.SFT: tr.TRAINING_METHOD_SFT,
    TrainingMethod.DPO: tr.TRAINING_METHOD_DPO,
    TrainingMethod.KTO: tr.TRAINING_METHOD_KTO,
    TrainingMethod.ORPO: tr.TRAINING_METHOD_ORPO,
    TrainingMethod.REWARD: tr.TRAINING_METHOD_REWARD,
    TrainingMethod.GRPO: tr.TRAINING_METHOD_GRPO,
    TrainingMethod.RLOO: tr.TRAINING_METHOD_RLOO,
}
METHOD_FROM_PROTO = {v: k for k, v in METHOD_TO_PROTO.items()}


class LoraConfig(RequestModel):
    """LoRA settings; unset fields take the recipe's defaults."""

    r: Annotated[UInt32, Field(ge=1, le=MAX_LORA_RANK)] | None = Field(
        None, description="Rank, 1-1024.", examples=[16]
    )
    alpha: Annotated[Float32, Field(gt=0)] | None = Field(
        None, description="Scaling factor (positive).", examples=[32]
    )
    dropout: Annotated[Float32, Field(ge=0, lt=1)] | None = Field(
        None, description="In [0, 1).", examples=[0.05]
    )
    target_modules: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list,
        max_length=100,
        description="Empty: the recipe's default modules for the architecture.",
        examples=[["q_proj", "v_proj"]],
    )
    use_rslora: StrictBool | None = Field(None, description="Rank-stabilised LoRA scaling.")


class LoraConfigOut(ResponseModel):
    """LoRA settings; null: the recipe's default."""

    r: int | None
    alpha: float | None
    dropout: float | None
    target_modules: list[str]
    use_rslora: bool | None


class TrainingSpecOut(ResponseModel):
    """What is trained, as sent to the trainer."""

    task: str
    method: TrainingMethod | None
    snapshot_id: str
    base_model: str
    adapter_name: str
    adapter_type: str
    parent_adapter: AdapterRef | None
    qlora: bool
    hyperparameters: dict[str, Any]
    seed: int | None
    lora: LoraConfigOut | None


def optional_field(message: Any, name: str) -> Any:
    """``message.<name>`` of an ``optional`` (or message) field, None when unset."""
    return getattr(message, name) if message.HasField(name) else None


def lora_config(config: LoraConfig) -> tr.LoraConfig:
    """The protobuf ``LoraConfig`` of a REST one; null fields stay unset (recipe defaults)."""
    message = tr.LoraConfig(target_modules=config.target_modules)
    for name in ("r", "alpha", "dropout", "use_rslora"):
        value = getattr(config, name)
        if value is not None:
            setattr(message, name, value)
    return message


def lora_of(message: tr.LoraConfig) -> LoraConfigOut:
    """REST view of a ``LoraConfig`` (unset fields are null)."""
    return LoraConfigOut(
        r=optional_field(message, "r"),
        alpha=optional_field(message, "alpha"),
        dropout=optional_field(message, "dropout"),
        target_modules=list(message.target_modules),
        use_rslora=optional_field(message, "use_rslora"),
    )


def training_spec_fields(message: tr.TrainingSpec) -> dict[str, Any]:
    """The :class:`TrainingSpecOut` fields of a ``TrainingSpec``, for it or a model that
    extends it."""
    return {
        "task": message.task,
        "method": METHOD_FROM_PROTO.get(message.method),
        "snapshot_id": message.dataset_snapshot_id,
        "base_model": message.base_model,
        "adapter_name": message.adapter_name,
        "adapter_type": message.adapter_type,
        "parent_adapter": adapter_of(message, "parent_adapter"),
        "qlora": message.qlora,
        "hyperparameters": dict_of(message.hyperparameters),
        "seed": optional_field(message, "seed"),
        "lora": lora_of(message.lora) if message.HasField("lora") else None,
    }


def training_spec_of(message: tr.TrainingSpec) -> TrainingSpecOut:
    """REST view of a ``TrainingSpec``."""
    return TrainingSpecOut(**training_spec_fields(message))
