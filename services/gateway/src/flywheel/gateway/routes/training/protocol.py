"""REST schemas of training jobs and the adapters they publish.

The bounds of a job mirror the trainer's own checks (``specs.check``) and the sizes of its
columns, so bad values are refused here with the REST field named; the service still
checks what depends on its configuration (a base model when none is given, reward
functions for online RL).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import ConfigDict, Field

from flywheel.gateway.routes.common import (
    AdapterRef,
    Artifact,
    Int32,
    Metadata,
    RequestModel,
    ResponseModel,
    StrictBool,
    UInt32,
    UInt64,
)
from flywheel.gateway.routes.training_spec import (
    ADAPTER_NAME_PATTERN,
    LoraConfig,
    LoraConfigOut,
    SnapshotIdField,
    TrainingMethod,
    TrainingSpecOut,
)

# The trainer's resource bound (specs.check).
MAX_GPUS = 64

SNAPSHOT_EXAMPLE = "sha256:" + "5e" * 32


class JobState(StrEnum):
    """Job lifecycle: queued -> running -> succeeded | failed | cancelled."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class DistributedStrategy(StrEnum):
    """How training is spread over devices."""

    SINGLE = "single"
    DDP = "ddp"
    FSDP = "fsdp"
    DEEPSPEED = "deepspeed"


class ResourceRequest(RequestModel):
    """Devices a job asks for; more than one GPU (or node) runs it under `accelerate launch`."""

    gpus: Annotated[UInt32, Field(le=MAX_GPUS)] = Field(
        0,
        description="GPUs the job holds at once, at most 64; 0 or 1: one of the trainer's "
        "devices (a GPU, or the CPU of a CPU-only trainer). The job waits until that many "
        "are free, and fails if the trainer has fewer.",
        examples=[2],
    )
    num_nodes: UInt32 = Field(0, description="Machines; 0 or 1: one.")
    strategy: DistributedStrategy | None = Field(
        None,
        description="`single`, `ddp`, `fsdp` or `deepspeed` for several GPUs; null: DDP.",
        examples=["deepspeed"],
    )
    deepspeed_config: Metadata = Field(
        default_factory=dict,
        description="DeepSpeed config (ZeRO stage, ...), passed through as given.",
        examples=[{"zero_optimization": {"stage": 2}}],
    )


class TrainingJobCreate(RequestModel):
    """A training job to queue: one adapter from one dataset snapshot."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "task": "budgeting",
                    "method": "dpo",
                    "base_model": "Qwen/Qwen2.5-0.5B-Instruct",
                    "snapshot_id": SNAPSHOT_EXAMPLE,
                    "adapter_name": "acme-budgeting-dpo",
                    "adapter_type": "brand",
                    "parent_adapter": {"name": "acme-budgeting-sft", "version": "v3"},
                    "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
                    "hyperparameters": {"learning_rate": 5e-6, "beta": 0.1, "num_train_epochs": 1},
                    "seed": 42,
                    "checkpoint_every_steps": 50,
                    "priority": 5,
                }
            ]
        }
    )

    task: str = Field(
        "",
        max_length=63,
        description="Task type the adapter is for; recorded with the job and its adapter.",
        examples=["budgeting"],
    )
    method: TrainingMethod = Field(
        description="Recipe: `sft`, `dpo`, `kto`, `orpo`, `reward`, `grpo` or `rloo`. It must "
        "suit the snapshot's kind (sft: sft, grpo, rloo; preference: dpo, orpo, kto, reward, "
        "grpo, rloo; unpaired: kto; reward: reward), else the job fails when it starts.",
        examples=["dpo"],
    )
    base_model: str = Field(
        "",
        max_length=500,
        description="Hugging Face id or path on the trainer; empty: the trainer's default "
        "(422 when it has none).",
        examples=["Qwen/Qwen2.5-0.5B-Instruct"],
    )
    snapshot_id: SnapshotIdField = Field(
        description="Dataset snapshot to train on (`sha256:<hex>`, from /v1/datasets/snapshots).",
        examples=[SNAPSHOT_EXAMPLE],
    )
    parent_adapter: AdapterRef | None = Field(
        None,
        description="Continue from this adapter of the tenant (e.g. DPO on top of an SFT "
        "adapter); an empty version: its newest.",
    )
    adapter_name: str = Field(
        "",
        pattern=r"^$|" + ADAPTER_NAME_PATTERN,
        description="Adapter to produce (letters, digits, `.`, `_`, `-`); its version is "
        "assigned when published. Empty: `<tenant>-<task>-<method>`.",
        examples=["acme-budgeting-dpo"],
    )
    adapter_type: str = Field(
        "task",
        min_length=1,
        max_length=100,
        description='What the adapter specialises on: "task", "brand", "retailer", ...',
        examples=["brand"],
    )
    lora: LoraConfig | None = Field(None, description="LoRA settings; null: the recipe's.")
    qlora: StrictBool = Field(False, description="Load the base in 4-bit NF4 (QLoRA).")
    hyperparameters: Metadata = Field(
        default_factory=dict,
        description="Overrides of the TRL config (learning_rate, num_train_epochs, beta, "
        "loss_type, per_device_train_batch_size, ...); a name the recipe does not know "
        "fails the job when it starts.",
        examples=[{"learning_rate": 5e-6, "beta": 0.1}],
    )
    seed: UInt64 | None = Field(None, description="Random seed; null: 0.")
    reward_functions: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list,
        max_length=100,
        description="Online RL (`grpo`, `rloo`, which need at least one): evaluator names "
        "registered by domain plug-ins.",
        examples=[["retail_media.budget_sum"]],
    )
    reward_model: AdapterRef | None = Field(
        None,
        description="Reserved for online RL from a reward adapter (trained with `reward`); "
        "refused (422) until the trainer can call reward models as rewards.",
    )
    reward_dimension: str = Field(
        "",
        max_length=200,
        description="`reward` only: learn one quality dimension (e.g. `compliance`): pairs "
        "ordered by the critics' scores on it, margin their difference. Empty: the overall "
        "preference.",
        examples=["compliance"],
    )
    checkpoint_every_steps: UInt32 = Field(
        0,
        description="Checkpoint every N optimizer steps (a retry resumes from the last one); "
        "0: the trainer's default.",
    )
    resources: ResourceRequest | None = Field(
        None, description="Devices; null: one of the trainer's."
    )
    priority: Int32 = Field(0, description="Higher runs first.")


class TrainingJobCancel(RequestModel):
    """Why a job is cancelled (optional)."""

    reason: str | None = Field(
        None,
        max_length=2000,
        description='Recorded as its `state_reason`; null: "cancelled by request".',
        examples=["wrong snapshot"],
    )


class TrainingJobRetry(RequestModel):
    """How to retry a job (optional)."""

    from_scratch: StrictBool = Field(
        False,
        description="Start over instead of resuming from the last complete checkpoint.",
    )


class ResourceRequestOut(ResponseModel):
    """Devices a job asked for."""

    gpus: int
    num_nodes: int
    strategy: DistributedStrategy | None
    deepspeed_config: dict[str, Any]


class TrainingJobSpec(TrainingSpecOut):
    """What the job trains, as the trainer resolved it (its default base model filled in)."""

    reward_functions: list[str]
    reward_model: AdapterRef | None
    reward_dimension: str
    checkpoint_every_steps: int
    resources: ResourceRequestOut | None


class JobProgress(ResponseModel):
    """Latest training progress of a job."""

    step: int = Field(description="Optimizer steps done.")
    total_steps: int
    epoch: float
    loss: float | None = Field(description="Latest training loss.")
    reward_margin: float | None = Field(
        description="DPO family: chosen-minus-rejected reward margin."
    )
    tokens_per_second: float
    eta_s: float | None = Field(description="Estimated seconds to go.")
    metrics: dict[str, float | None] = Field(
        description="Further trainer metrics (learning_rate, grad_norm, eval_loss, ...)."
    )
    updated_at: datetime | None


class TrainingJob(ResponseModel):
    """A training job: its spec, state and latest progress."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "job_id": "0b7e6c1e-3f5d-4a4e-9d0c-5f6b2f1c9a10",
                    "tenant_id": "acme",
                    "spec": {
                        "task": "budgeting",
                        "method": "dpo",
                        "snapshot_id": SNAPSHOT_EXAMPLE,
                        "base_model": "Qwen/Qwen2.5-0.5B-Instruct",
                        "adapter_name": "acme-budgeting-dpo",
                        "adapter_type": "brand",
                        "parent_adapter": None,
                        "qlora": False,
                        "hyperparameters": {"beta": 0.1},
                        "seed": None,
                        "lora": {
                            "r": 16,
                            "alpha": 32.0,
                            "dropout": None,
                            "target_modules": [],
                            "use_rslora": None,
                        },
                        "reward_functions": [],
                        "reward_model": None,
                        "checkpoint_every_steps": 50,
                        "resources": None,
                    },
                    "state": "running",
                    "state_reason": "",
                    "priority": 5,
                    "attempt": 1,
                    "retry_of_job_id": None,
                    "training_request_id": None,
                    "progress": {
                        "step": 120,
                        "total_steps": 400,
                        "epoch": 0.3,
                        "loss": 0.52,
                        "reward_margin": 0.8,
                        "tokens_per_second": 2150.0,
                        "eta_s": 310.0,
                        "metrics": {"learning_rate": 5e-6},
                        "updated_at": "2025-01-01T12:05:00Z",
                    },
                    "last_checkpoint_step": 100,
                    "adapter": None,
                    "device": "cuda:0",
                    "created_at": "2025-01-01T12:00:00Z",
                    "started_at": "2025-01-01T12:00:02Z",
                    "finished_at": None,
                }
            ]
        }
    )

    job_id: str
    tenant_id: str
    spec: TrainingJobSpec
    state: JobState | None
    state_reason: str = Field(
        description="Why it is in its state (failure message, cancel reason); empty when obvious."
    )
    priority: int
    attempt: int = Field(description="1 for the first run; each retry is a new job.")
    retry_of_job_id: str | None = Field(description="The job this one retries.")
    training_request_id: str | None = Field(
        description="The dataset training request that created it, if any."
    )
    progress: JobProgress | None = Field(description="null until the job reports progress.")
    last_checkpoint_step: int | None = Field(
        description="Step of the last complete checkpoint; a retry resumes after it."
    )
    adapter: AdapterRef | None = Field(description="The adapter it published, once succeeded.")
    device: str = Field(description='Device it runs on ("cuda:0", "cpu"); empty until started.')
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None


class AdapterFile(ResponseModel):
    """One file of an adapter, to verify before loading it."""

    path: str = Field(description="Relative to the adapter folder.")
    sha256: str = Field(description="Hex sha256 of the file.")
    size_bytes: int


class AdapterLineage(ResponseModel):
    """Where an adapter came from: enough to reproduce or audit it."""

    base_model: str
    base_model_sha256: str = Field(description="sha256 over the base model's weight files.")
    snapshot_id: str = Field(description="The dataset snapshot it was trained on.")
    parent_adapter: AdapterRef | None
    training_job_id: str
    training_request_id: str


class AdapterManifest(ResponseModel):
    """A published adapter version (PEFT, safetensors) and everything known about it."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "adapter": {"name": "acme-budgeting-dpo", "version": "v3"},
                    "tenant_id": "acme",
                    "task": "budgeting",
                    "adapter_type": "brand",
                    "method": "dpo",
                    "lineage": {
                        "base_model": "Qwen/Qwen2.5-0.5B-Instruct",
                        "base_model_sha256": "9f" * 32,
                        "snapshot_id": SNAPSHOT_EXAMPLE,
                        "parent_adapter": {"name": "acme-budgeting-sft", "version": "v2"},
                        "training_job_id": "0b7e6c1e-3f5d-4a4e-9d0c-5f6b2f1c9a10",
                        "training_request_id": "",
                    },
                    "lora": {
                        "r": 16,
                        "alpha": 32.0,
                        "dropout": 0.05,
                        "target_modules": [],
                        "use_rslora": False,
                    },
                    "hyperparameters": {"beta": 0.1, "learning_rate": 5e-6},
                    "metrics": {"train_loss": 0.41, "eval_loss": 0.47},
                    "artifact": {"sha256": "3c" * 32, "size_bytes": 8405120},
                    "files": [
                        {
                            "path": "adapter_model.safetensors",
                            "sha256": "a1" * 32,
                            "size_bytes": 8404992,
                        }
                    ],
                    "worse_than_parent": False,
                    "created_at": "2025-01-01T12:10:00Z",
                }
            ]
        }
    )

    adapter: AdapterRef
    tenant_id: str
    task: str
    adapter_type: str
    method: TrainingMethod | None
    lineage: AdapterLineage
    lora: LoraConfigOut | None = Field(description="The effective LoRA settings.")
    hyperparameters: dict[str, Any] = Field(
        description="The effective hyperparameters, defaults included."
    )
    metrics: dict[str, float | None] = Field(
        description="Final training and eval metrics (train_loss, eval_loss, reward_margin, ...)."
    )
    artifact: Artifact | None = Field(
        description="sha256 of the manifest file (which covers every file's) and the total "
        "size of the files; where it is stored is the server's business."
    )
    files: list[AdapterFile] = Field(description="Every file of the adapter with its sha256.")
    worse_than_parent: bool = Field(
        description="Eval loss worse than the parent adapter's: published, but flagged so "
        "promotion policies can skip it."
    )
    created_at: datetime | None
