"""Datasets: REST <-> protobuf, and protobuf field paths -> REST field names.

Artifact URIs never leave the gateway: they are paths on the dataset service's machine
(``file:///var/flywheel/...``) or bucket keys, of no use to a client and telling it more
about the deployment than it should know. Clients get the content's sha256 and size, and
download files through the gateway.
"""

from __future__ import annotations

from typing import Any

from flywheel.contracts.common.v1 import common_pb2
from flywheel.contracts.dataset.v1 import resources_pb2 as ds
from flywheel.contracts.dataset.v1 import service_pb2
from flywheel.contracts.trainer.v1 import resources_pb2 as tr
from flywheel.gateway.convert import adapter_ref, datetime_of, dict_of, struct
from flywheel.gateway.convert import timestamp as timestamp_pb
from flywheel.gateway.problems import FieldRenamer, renamer, validation_problem
from flywheel.gateway.routes.common import Artifact
from flywheel.gateway.routes.datasets.protocol import (
    ConflictRule,
    DatasetKind,
    ExportFormat,
    QualityReport,
    Snapshot,
    SnapshotDiff,
    SnapshotFile,
    SnapshotPreviewResult,
    SnapshotSpec,
    SnapshotStats,
    SnapshotTrigger,
    Split,
    TrainingOptions,
    TrainingRequest,
    TrainingRequestCreate,
    TriggerPolicy,
    TriggerPolicyUpdate,
)
from flywheel.gateway.routes.training_spec import (
    METHOD_TO_PROTO,
    lora_config,
    optional_field,
    training_spec_of,
)

KIND_TO_PROTO = {
    DatasetKind.SFT: ds.DATASET_KIND_SFT,
    DatasetKind.PREFERENCE: ds.DATASET_KIND_PREFERENCE,
    DatasetKind.UNPAIRED: ds.DATASET_KIND_UNPAIRED,
    DatasetKind.REWARD: ds.DATASET_KIND_REWARD,
}
_KIND_FROM_PROTO = {v: k for k, v in KIND_TO_PROTO.items()}
_CONFLICT_TO_PROTO = {
    ConflictRule.WEIGHTED_MAJORITY: ds.CONFLICT_RULE_WEIGHTED_MAJORITY,
    ConflictRule.LATEST: ds.CONFLICT_RULE_LATEST,
    ConflictRule.DROP: ds.CONFLICT_RULE_DROP,
}
_CONFLICT_FROM_PROTO = {v: k for k, v in _CONFLICT_TO_PROTO.items()}
SPLIT_TO_PROTO = {Split.TRAIN: ds.SPLIT_TRAIN, Split.EVAL: ds.SPLIT_EVAL}
_SPLIT_FROM_PROTO = {v: k for k, v in SPLIT_TO_PROTO.items()}
FORMAT_TO_PROTO = {
    ExportFormat.TRL_JSONL: ds.EXPORT_FORMAT_TRL_JSONL,
    ExportFormat.OPENAI_PREFERENCE_JSONL: ds.EXPORT_FORMAT_OPENAI_PREFERENCE_JSONL,
}
_FORMAT_FROM_PROTO = {v: k for k, v in FORMAT_TO_PROTO.items()}
_TRIGGER_FROM_PROTO = {
    ds.SNAPSHOT_TRIGGER_MANUAL: SnapshotTrigger.MANUAL,
    ds.SNAPSHOT_TRIGGER_POLICY: SnapshotTrigger.POLICY,
    ds.SNAPSHOT_TRIGGER_TRAINING_REQUEST: SnapshotTrigger.TRAINING_REQUEST,
}
# Optional scalars of SnapshotSpec: same name in REST and protobuf, copied when set.
_SPEC_OPTIONALS = (
    "sft_min_rating",
    "min_rating_chosen",
    "max_rating_rejected",
    "min_rating_margin",
    "max_prompt_tokens",
    "max_completion_tokens",
    "near_duplicate_threshold",
    "human_weight",
    "synthetic_weight",
    "eval_fraction",
    "seed",
)

# The service names a spec `spec.<field>` whichever request carried it.
training_fields: FieldRenamer = renamer(
    {"spec": "snapshot_spec", "training.dataset_snapshot_id": "snapshot_id"}
)
"""RequestTraining paths -> REST fields."""

list_fields: FieldRenamer = renamer({"page.cursor": "cursor", "page.page_size": "limit"})
"""ListSnapshots paths -> query parameters."""

diff_fields: FieldRenamer = renamer(
    {"base_snapshot_id": "base", "target_snapshot_id": "snapshot_id"}
)
"""DiffSnapshots paths -> query and path parameters."""

policy_fields: FieldRenamer = renamer(
    {"max_interval": "max_interval_s", "cooldown": "cooldown_s"}, strip="policy"
)
"""UpdateTriggerPolicy paths (``policy.cooldown``) -> REST fields (``cooldown_s``)."""


# --- snapshots --------------------------------------------------------------------------


def snapshot_spec(spec: SnapshotSpec) -> ds.SnapshotSpec:
    """The protobuf spec of a REST one; null fields stay unset (the service's defaults)."""
    message = ds.SnapshotSpec(task=spec.task, tokenizer=spec.tokenizer, human_only=spec.human_only)
    if spec.kind is not None:
        message.kind = KIND_TO_PROTO[spec.kind]
    if spec.conflict_rule is not None:
        message.conflict_rule = _CONFLICT_TO_PROTO[spec.conflict_rule]
    for name in _SPEC_OPTIONALS:
        value = getattr(spec, name)
        if value is not None:
            setattr(message, name, value)
    if spec.cutoff is not None:
        message.cutoff.CopyFrom(timestamp_pb(spec.cutoff))
    return message


def spec_of(message: ds.SnapshotSpec) -> SnapshotSpec:
    """REST spec of a protobuf one (unset optionals are null)."""
    optionals = {name: optional_field(message, name) for name in _SPEC_OPTIONALS}
    # Built without validation: the service's resolved values are the truth, even one at
    # an edge the REST bounds would refuse as input (a cutoff at the end of time, say).
    return SnapshotSpec.model_construct(
        task=message.task,
        kind=_KIND_FROM_PROTO.get(message.kind),
        tokenizer=message.tokenizer,
        conflict_rule=_CONFLICT_FROM_PROTO.get(message.conflict_rule),
        human_only=message.human_only,
        cutoff=datetime_of(message, "cutoff"),
        **optionals,
    )


def _artifact_of(message: Any, name: str) -> Artifact | None:
    if not message.HasField(name):
        return None
    ref: common_pb2.ArtifactRef = getattr(message, name)
    return Artifact(sha256=ref.sha256, size_bytes=ref.size_bytes)


def stats_of(message: ds.SnapshotStats) -> SnapshotStats:
    """REST stats of a ``SnapshotStats``."""
    return SnapshotStats(
        train_rows=message.train_rows,
        eval_rows=message.eval_rows,
        prompts=message.prompts,
        tokens=message.tokens,
        rows_by_source=dict(message.rows_by_source),
        rows_by_task=dict(message.rows_by_task),
    )


def file_of(message: ds.SnapshotFile) -> SnapshotFile:
    """REST metadata of one snapshot file."""
    return SnapshotFile(
        split=_SPLIT_FROM_PROTO.get(message.split),
        format=_FORMAT_FROM_PROTO.get(message.format),
        rows=message.rows,
        sha256=message.artifact.sha256,
        size_bytes=message.artifact.size_bytes,
    )


def snapshot_of(message: ds.Snapshot) -> Snapshot:
    """REST snapshot of a ``Snapshot`` message."""
    return Snapshot(
        snapshot_id=message.snapshot_id,
        tenant_id=message.tenant_id,
        spec=spec_of(message.spec),
        stats=stats_of(message.stats),
        quality=QualityReport(
            dropped_by_reason=dict(message.quality.dropped_by_reason),
            report=_artifact_of(message.quality, "report"),
        ),
        files=[file_of(f) for f in message.files],
        lineage=_artifact_of(message, "lineage"),
        source_event_count=message.source_event_count,
        previous_snapshot_id=(
            message.previous_snapshot_id if message.HasField("previous_snapshot_id") else None
        ),
        trigger=_TRIGGER_FROM_PROTO.get(message.trigger),
        created_at=datetime_of(message, "created_at"),
    )


def preview_of(message: service_pb2.PreviewSnapshotResponse) -> SnapshotPreviewResult:
    """REST preview of a ``PreviewSnapshotResponse``."""
    return SnapshotPreviewResult(
        stats=stats_of(message.stats),
        dropped_by_reason=dict(message.quality.dropped_by_reason),
        sample_rows=[dict_of(row) for row in message.sample_rows],
    )


def diff_of(
    message: service_pb2.DiffSnapshotsResponse, base_id: str, target_id: str
) -> SnapshotDiff:
    """REST diff of a ``DiffSnapshotsResponse``."""
    return SnapshotDiff(
        base_snapshot_id=base_id,
        target_snapshot_id=target_id,
        rows_added=message.rows_added,
        rows_removed=message.rows_removed,
        rows_unchanged=message.rows_unchanged,
        base_stats=stats_of(message.base_stats),
        target_stats=stats_of(message.target_stats),
        added_sample=[dict_of(row) for row in message.added_sample],
        removed_sample=[dict_of(row) for row in message.removed_sample],
    )


# --- training requests ------------------------------------------------------------------


def training_spec(options: TrainingOptions) -> tr.TrainingSpec:
    """The protobuf ``TrainingSpec`` of the REST options (task and snapshot id are the
    service's to fill in)."""
    message = tr.TrainingSpec(
        base_model=options.base_model,
        adapter_name=options.adapter_name,
        adapter_type=options.adapter_type,
        qlora=options.qlora,
        hyperparameters=struct(options.hyperparameters),
    )
    if options.method is not None:
        message.method = METHOD_TO_PROTO[options.method]
    if options.parent_adapter is not None:
        message.parent_adapter.CopyFrom(adapter_ref(options.parent_adapter))
    if options.seed is not None:
        message.seed = options.seed
    if options.lora is not None:
        message.lora.CopyFrom(lora_config(options.lora))
    return message


def training_request(tenant_id: str, body: TrainingRequestCreate) -> Any:
    """The ``RequestTrainingRequest`` of a REST body; a 422 unless it names exactly one of
    a snapshot and a spec to build one."""
    given = [name for name in ("snapshot_id", "snapshot_spec") if getattr(body, name) is not None]
    if len(given) != 1:
        problem = "give only one of these" if given else "one of these is required"
        raise validation_problem(
            [(name, problem) for name in given or ("snapshot_id", "snapshot_spec")],
            "Give exactly one of snapshot_id and snapshot_spec.",
        )
    request = service_pb2.RequestTrainingRequest(
        tenant_id=tenant_id,
        training=training_spec(body.training),
        priority=body.priority,
        reason=body.reason,
    )
    if body.snapshot_id is not None:
        request.snapshot_id = body.snapshot_id
    if body.snapshot_spec is not None:
        request.snapshot_spec.CopyFrom(snapshot_spec(body.snapshot_spec))
    return request


def training_request_of(message: ds.TrainingRequest) -> TrainingRequest:
    """REST training request of a ``TrainingRequest`` message."""
    return TrainingRequest(
        training_request_id=message.training_request_id,
        tenant_id=message.tenant_id,
        training=training_spec_of(message.spec),
        priority=message.priority,
        reason=message.reason,
        created_at=datetime_of(message, "created_at"),
    )


# --- trigger policies -------------------------------------------------------------------


def trigger_policy(task: str, body: TriggerPolicyUpdate) -> ds.TriggerPolicy:
    """The protobuf policy of a REST one for ``task`` (the tenant is the service's to set
    from the request)."""
    message = ds.TriggerPolicy(
        task=task,
        enabled=body.enabled,
        min_new_examples=body.min_new_examples,
        min_preference_pairs=body.min_preference_pairs,
        base_model=body.base_model,
        hyperparameters=struct(body.hyperparameters),
    )
    if body.max_interval_s is not None:
        message.max_interval.FromSeconds(body.max_interval_s)
    # Always set: a zero cool-down and none behave alike, and GET then says 0 either way.
    message.cooldown.FromSeconds(body.cooldown_s)
    if body.snapshot_defaults is not None:
        message.snapshot_defaults.CopyFrom(snapshot_spec(body.snapshot_defaults))
    return message


def policy_of(message: ds.TriggerPolicy) -> TriggerPolicy:
    """REST policy of a ``TriggerPolicy`` message."""
    return TriggerPolicy(
        tenant_id=message.tenant_id,
        task=message.task,
        enabled=message.enabled,
        min_new_examples=message.min_new_examples,
        max_interval_s=(
            message.max_interval.ToSeconds() if message.HasField("max_interval") else None
        ),
        cooldown_s=message.cooldown.ToSeconds() if message.HasField("cooldown") else 0,
        min_preference_pairs=message.min_preference_pairs,
        base_model=message.base_model,
        snapshot_defaults=spec_of(message.snapshot_defaults),
        hyperparameters=dict_of(message.hyperparameters),
    )
