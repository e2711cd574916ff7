"""REST schemas of dataset snapshots, training requests and trigger policies.

The bounds of a spec mirror the dataset service's own checks, so most bad values are
refused here with the REST field named; the service still checks what depends on its
configured defaults (``max_rating_rejected`` below ``min_rating_chosen``).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field

from flywheel.gateway.routes.common import (
    AdapterRef,
    Artifact,
    Double,
    Int32,
    Metadata,
    RequestModel,
    ResponseModel,
    StrictBool,
    StrictInt,
    Timestamp,
    UInt32,
    UInt64,
)
from flywheel.gateway.routes.training_spec import (
    ADAPTER_NAME_PATTERN,
    LoraConfig,
    SnapshotIdField,
    TrainingMethod,
    TrainingSpecOut,
)

Rating = Annotated[StrictInt, Field(ge=1, le=5)]
TokenLimit = Annotated[StrictInt, Field(ge=1, le=1_000_000)]
Weight = Annotated[Double, Field(ge=0, le=1000)]
# Durations in whole seconds; int32 keeps them well inside what every backend stores.
Seconds = Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]


class DatasetKind(StrEnum):
    """What a snapshot's rows are for; decides their columns (TRL conventions)."""

    SFT = "sft"
    PREFERENCE = "preference"
    UNPAIRED = "unpaired"
    REWARD = "reward"


class ConflictRule(StrEnum):
    """How disagreeing preferences on the same pair are resolved."""

    WEIGHTED_MAJORITY = "weighted_majority"
    LATEST = "latest"
    DROP = "drop"


class Split(StrEnum):
    """Train or held-out eval part of a snapshot (split by prompt, never by row)."""

    TRAIN = "train"
    EVAL = "eval"


class ExportFormat(StrEnum):
    """File layout of a snapshot file."""

    TRL_JSONL = "trl_jsonl"
    OPENAI_PREFERENCE_JSONL = "openai_preference_jsonl"


class SnapshotTrigger(StrEnum):
    """Why a snapshot was built."""

    MANUAL = "manual"
    POLICY = "policy"
    TRAINING_REQUEST = "training_request"


class SnapshotSpec(RequestModel):
    """Build options. Unset (null) fields take the dataset service's configured defaults;
    a snapshot's `spec` has every field resolved, so posting it again rebuilds the same
    snapshot."""

    task: str = Field(
        "", max_length=63, description="Task type to take feedback of; empty: every task."
    )
    kind: DatasetKind | None = Field(
        None,
        description="`sft` (prompt/completion), `preference` (prompt/chosen/rejected), "
        "`unpaired` (prompt/completion/label, for KTO) or `reward` (pairs with a margin); "
        "null: `sft`.",
    )
    tokenizer: str = Field(
        "",
        max_length=500,
        description="Tokenizer (model id or path) for token counts and length limits; "
        "empty: the service's default.",
    )
    sft_min_rating: Rating | None = Field(
        None, description="SFT: lowest rating that makes an output a good completion."
    )
    min_rating_chosen: Rating | None = Field(
        None, description="Rating-derived pairs: lowest mean rating of the chosen output."
    )
    max_rating_rejected: Rating | None = Field(
        None,
        description="Rating-derived pairs: highest mean rating of the rejected output "
        "(below `min_rating_chosen`).",
    )
    min_rating_margin: Annotated[StrictInt, Field(ge=0, le=4)] | None = Field(
        None, description="Rating-derived pairs: least difference of the two mean ratings."
    )
    max_prompt_tokens: TokenLimit | None = None
    max_completion_tokens: TokenLimit | None = None
    near_duplicate_threshold: Annotated[Double, Field(gt=0, le=1)] | None = Field(
        None,
        description="Similarity (MinHash Jaccard) above which near-duplicate rows are "
        "dropped; 1: only exact duplicates.",
    )
    conflict_rule: ConflictRule | None = Field(
        None, description="How disagreeing preferences on one pair are resolved."
    )
    human_weight: Weight | None = Field(None, description="Weight of a person's feedback.")
    synthetic_weight: Weight | None = Field(None, description="Weight of a critic's feedback.")
    human_only: StrictBool = Field(False, description="Leave synthetic feedback out entirely.")
    eval_fraction: Annotated[Double, Field(ge=0, lt=1)] | None = Field(
        None, description="Share of prompts held out for eval, in [0, 1)."
    )
    seed: UInt64 | None = Field(None, description="Seed of the train/eval split.")
    cutoff: Timestamp | None = Field(
        None,
        description="Only feedback given before this instant (null: now); makes a rebuild "
        "reproducible.",
    )


class SnapshotBuild(RequestModel):
    """A snapshot to build from the tenant's feedback as of now (or the spec's cutoff)."""

    spec: SnapshotSpec


class SnapshotPreview(RequestModel):
    """What a build would hold, with some of its rows."""

    spec: SnapshotSpec
    sample_size: Annotated[StrictInt, Field(ge=0, le=100)] = Field(
        0, description="Rows to return as a sample; 0: none."
    )


class SnapshotStats(ResponseModel):
    """Counts describing a snapshot (or a preview)."""

    train_rows: int
    eval_rows: int
    prompts: int
    tokens: int
    rows_by_source: dict[str, int] = Field(
        description='Rows by feedback source ("human", "synthetic:<critic>").'
    )
    rows_by_task: dict[str, int]


class QualityReport(ResponseModel):
    """What the quality checks removed, and the full report."""

    dropped_by_reason: dict[str, int] = Field(
        description='Dropped rows by reason ("too_long", "exact_duplicate", '
        '"near_duplicate", "conflict", "tie", ...).'
    )
    report: Artifact | None = Field(description="Full report with the dropped items.")


class SnapshotFile(ResponseModel):
    """One file of a snapshot; download it from `.../files/{split}?format=`."""

    split: Split | None
    format: ExportFormat | None
    rows: int
    sha256: str = Field(description="Hex sha256 of the file's bytes.")
    size_bytes: int


class Snapshot(ResponseModel):
    """An immutable, content-addressed snapshot of curated training data."""

    snapshot_id: str = Field(description="`sha256:<hex>` of its data: equal data, equal id.")
    tenant_id: str
    spec: SnapshotSpec = Field(description="The resolved build options.")
    stats: SnapshotStats
    quality: QualityReport
    files: list[SnapshotFile]
    lineage: Artifact | None = Field(
        description="The feedback event ids behind every row (JSON lines)."
    )
    source_event_count: int = Field(description="How many feedback events the rows come from.")
    previous_snapshot_id: str | None = Field(
        description="Previous snapshot of the same tenant, task and kind."
    )
    trigger: SnapshotTrigger | None
    created_at: datetime | None


class SnapshotPreviewResult(ResponseModel):
    """What a build now would hold; nothing is stored."""

    stats: SnapshotStats
    dropped_by_reason: dict[str, int]
    sample_rows: list[dict[str, Any]] = Field(
        description="Rows in TRL's columns for the spec's kind."
    )


class SnapshotDiff(ResponseModel):
    """Rows (matched by content) only in the target, only in the base, and in both."""

    base_snapshot_id: str
    target_snapshot_id: str
    rows_added: int
    rows_removed: int
    rows_unchanged: int
    base_stats: SnapshotStats
    target_stats: SnapshotStats
    added_sample: list[dict[str, Any]]
    removed_sample: list[dict[str, Any]]


class TrainingOptions(RequestModel):
    """What to train on the snapshot."""

    method: TrainingMethod | None = Field(
        None,
        description="null: follows the snapshot's kind (sft -> sft, preference -> dpo, "
        "unpaired -> kto, reward -> reward).",
    )
    base_model: str = Field(min_length=1, max_length=500, description="Hugging Face id or path.")
    adapter_name: str = Field(
        pattern=ADAPTER_NAME_PATTERN,
        description="Adapter to produce (letters, digits, `.`, `_`, `-`; at most 200); its "
        "version is assigned when published.",
    )
    adapter_type: str = Field(
        "task",
        min_length=1,
        max_length=100,
        description='What the adapter specialises on: "task", "brand", "retailer", ...',
    )
    parent_adapter: AdapterRef | None = Field(
        None, description="Continue from this adapter (e.g. DPO on top of an SFT adapter)."
    )
    qlora: StrictBool = Field(False, description="Load the base in 4-bit NF4 (QLoRA).")
    hyperparameters: Metadata = Field(
        default_factory=dict,
        description="Overrides of the TRL config (learning_rate, num_train_epochs, beta, ...).",
    )
    seed: UInt64 | None = None
    lora: LoraConfig | None = None


class TrainingRequestCreate(RequestModel):
    """Training to request now: on a snapshot, or on one built from `snapshot_spec` first.
    Give exactly one of `snapshot_id` and `snapshot_spec`."""

    snapshot_id: SnapshotIdField | None = None
    snapshot_spec: SnapshotSpec | None = None
    training: TrainingOptions
    priority: Int32 = Field(0, description="Higher runs first.")
    reason: str = Field("", max_length=2000, description='Why; empty: "manual".')


class TrainingRequest(ResponseModel):
    """A request for training, published to the trainer."""

    training_request_id: str
    tenant_id: str
    training: TrainingSpecOut
    priority: int
    reason: str
    created_at: datetime | None


class TriggerPolicyUpdate(RequestModel):
    """When the dataset service requests training for a task by itself; replaces the
    task's policy whole."""

    enabled: StrictBool
    min_new_examples: UInt32 = Field(
        description="New usable feedback since the last snapshot that triggers training; "
        "at least 1 unless `max_interval_s` is set."
    )
    max_interval_s: Annotated[Seconds, Field(ge=1)] | None = Field(
        None,
        description="Trigger after this many seconds even below `min_new_examples`, if "
        "there is any new feedback; null: never by time alone.",
    )
    cooldown_s: Seconds = Field(0, description="Least seconds between two triggers.")
    min_preference_pairs: UInt32 = Field(
        0,
        description="Preference pairs needed before DPO is chosen over SFT "
        "(0: DPO as soon as there is a pair).",
    )
    base_model: str = Field("", max_length=500, description="Base model to train.")
    snapshot_defaults: SnapshotSpec | None = Field(
        None, description="Options of the snapshots it builds (its kind and task are set)."
    )
    hyperparameters: Metadata = Field(
        default_factory=dict, description="TRL config overrides of the training it requests."
    )


class TriggerPolicy(ResponseModel):
    """The effective trigger policy of a task (the service's defaults until one is set)."""

    tenant_id: str
    task: str
    enabled: bool
    min_new_examples: int
    max_interval_s: int | None
    cooldown_s: int
    min_preference_pairs: int
    base_model: str
    snapshot_defaults: SnapshotSpec
    hyperparameters: dict[str, Any]
