"""Training jobs and adapters: REST <-> protobuf, and protobuf field paths -> REST names.

Artifact URIs never leave the gateway: an adapter's location is a path on the trainer's
machine or a bucket key, of no use to a client and telling it more about the deployment
than it should know. Clients get the manifest's sha256 and every file's digest and size.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from flywheel.contracts.trainer.v1 import resources_pb2 as tr
from flywheel.contracts.trainer.v1 import service_pb2
from flywheel.gateway.convert import adapter_of, adapter_ref, datetime_of, dict_of, struct
from flywheel.gateway.problems import FieldRenamer, renamer
from flywheel.gateway.routes.common import AdapterRef, Artifact
from flywheel.gateway.routes.training.protocol import (
    AdapterFile,
    AdapterLineage,
    AdapterManifest,
    DistributedStrategy,
    JobProgress,
    JobState,
    ResourceRequest,
    ResourceRequestOut,
    TrainingJob,
    TrainingJobCreate,
    TrainingJobSpec,
)
from flywheel.gateway.routes.training_spec import (
    METHOD_FROM_PROTO,
    METHOD_TO_PROTO,
    lora_config,
    lora_of,
    optional_field,
    training_spec_fields,
)

STATE_TO_PROTO = {
    JobState.QUEUED: tr.JOB_STATE_QUEUED,
    JobState.RUNNING: tr.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: tr.JOB_STATE_SUCCEEDED,
    JobState.FAILED: tr.JOB_STATE_FAILED,
    JobState.CANCELLED: tr.JOB_STATE_CANCELLED,
}
_STATE_FROM_PROTO = {v: k for k, v in STATE_TO_PROTO.items()}
_STRATEGY_TO_PROTO = {
    DistributedStrategy.SINGLE: tr.DISTRIBUTED_STRATEGY_SINGLE,
    DistributedStrategy.DDP: tr.DISTRIBUTED_STRATEGY_DDP,
    DistributedStrategy.FSDP: tr.DISTRIBUTED_STRATEGY_FSDP,
    DistributedStrategy.DEEPSPEED: tr.DISTRIBUTED_STRATEGY_DEEPSPEED,
}
_STRATEGY_FROM_PROTO = {v: k for k, v in _STRATEGY_TO_PROTO.items()}

# The body is the spec's fields (and priority) at the top level.
submit_fields: FieldRenamer = renamer(
    {"dataset_snapshot_id": "snapshot_id", "client_request_id": "Idempotency-Key"},
    strip="spec",
)
"""SubmitJob paths (``spec.lora.r``) -> REST fields (``lora.r``)."""

adapter_fields: FieldRenamer = renamer({"adapter": ""})
"""GetAdapter paths (``adapter.name``) -> path parameters (``name``)."""

log_fields: FieldRenamer = renamer({"tail_lines": "tail"})
"""StreamJobLogs paths -> query parameters."""


def client_request_id(api_key_id: str, idempotency_key: str) -> str:
    """The trainer's ``client_request_id`` of a submit sent with an Idempotency-Key.

    The gateway replays a keyed POST it has answered; this also makes the trainer return
    the same job when the gateway never stored the answer (its call timed out after the
    trainer had queued the job). Hashed: scoped to the API key like the gateway's own
    keys, and of fixed length whatever the key's.
    """
    return hashlib.sha256(f"{api_key_id}\n{idempotency_key}".encode()).hexdigest()


def _resources(body: ResourceRequest) -> tr.ResourceRequest:
    message = tr.ResourceRequest(
        gpus=body.gpus,
        num_nodes=body.num_nodes,
        deepspeed_config=struct(body.deepspeed_config),
    )
    if body.strategy is not None:
        message.strategy = _STRATEGY_TO_PROTO[body.strategy]
    return message


def job_spec(body: TrainingJobCreate) -> tr.TrainingSpec:
    """The protobuf ``TrainingSpec`` of a REST job."""
    message = tr.TrainingSpec(
        task=body.task,
        method=METHOD_TO_PROTO[body.method],
        base_model=body.base_model,
        dataset_snapshot_id=body.snapshot_id,
        adapter_name=body.adapter_name,
        adapter_type=body.adapter_type,
        qlora=body.qlora,
        hyperparameters=struct(body.hyperparameters),
        reward_functions=body.reward_functions,
        reward_dimension=body.reward_dimension,
        checkpoint_every_steps=body.checkpoint_every_steps,
    )
    if body.parent_adapter is not None:
        message.parent_adapter.CopyFrom(adapter_ref(body.parent_adapter))
    if body.reward_model is not None:
        message.reward_model.CopyFrom(adapter_ref(body.reward_model))
    if body.lora is not None:
        message.lora.CopyFrom(lora_config(body.lora))
    if body.seed is not None:
        message.seed = body.seed
    if body.resources is not None:
        message.resources.CopyFrom(_resources(body.resources))
    return message


def submit_request(
    tenant_id: str, body: TrainingJobCreate, request_id: str | None
) -> service_pb2.SubmitJobRequest:
    """The ``SubmitJobRequest`` of a REST body (``request_id``: see client_request_id)."""
    request = service_pb2.SubmitJobRequest(
        tenant_id=tenant_id, spec=job_spec(body), priority=body.priority
    )
    if request_id is not None:
        request.client_request_id = request_id
    return request


def _finite(value: float) -> float | None:
    # A diverged run reports NaN or inf; JSON has no such numbers.
    return value if math.isfinite(value) else None


def _finite_optional(message: Any, name: str) -> float | None:
    value = optional_field(message, name)
    return None if value is None else _finite(value)


def _resources_of(message: tr.ResourceRequest) -> ResourceRequestOut:
    return ResourceRequestOut(
        gpus=message.gpus,
        num_nodes=message.num_nodes,
        strategy=_STRATEGY_FROM_PROTO.get(message.strategy),
        deepspeed_config=dict_of(message.deepspeed_config),
    )


def job_spec_of(message: tr.TrainingSpec) -> TrainingJobSpec:
    """REST view of a job's ``TrainingSpec``."""
    return TrainingJobSpec(
        **training_spec_fields(message),
        reward_functions=list(message.reward_functions),
        reward_model=adapter_of(message, "reward_model"),
        reward_dimension=message.reward_dimension,
        checkpoint_every_steps=message.checkpoint_every_steps,
        resources=_resources_of(message.resources) if message.HasField("resources") else None,
    )


def progress_of(message: tr.JobProgress) -> JobProgress | None:
    """REST progress of a job; None before its first report."""
    if not message.HasField("updated_at") and not message.step:
        return None
    return JobProgress(
        step=message.step,
        total_steps=message.total_steps,
        epoch=_finite(message.epoch) or 0.0,
        loss=_finite_optional(message, "loss"),
        reward_margin=_finite_optional(message, "reward_margin"),
        tokens_per_second=_finite(message.tokens_per_second) or 0.0,
        eta_s=message.eta.ToNanoseconds() / 1e9 if message.HasField("eta") else None,
        metrics={name: _finite(value) for name, value in message.metrics.items()},
        updated_at=datetime_of(message, "updated_at"),
    )


def job_of(message: tr.Job) -> TrainingJob:
    """REST job of a ``Job`` message."""
    return TrainingJob(
        job_id=message.job_id,
        tenant_id=message.tenant_id,
        spec=job_spec_of(message.spec),
        state=_STATE_FROM_PROTO.get(message.state),
        state_reason=message.state_reason,
        priority=message.priority,
        attempt=message.attempt,
        retry_of_job_id=optional_field(message, "retry_of_job_id"),
        training_request_id=optional_field(message, "training_request_id"),
        progress=progress_of(message.progress),
        last_checkpoint_step=optional_field(message, "last_checkpoint_step"),
        adapter=adapter_of(message, "adapter"),
        device=message.device,
        created_at=datetime_of(message, "created_at"),
        started_at=datetime_of(message, "started_at"),
        finished_at=datetime_of(message, "finished_at"),
    )


def manifest_of(message: tr.AdapterManifest) -> AdapterManifest:
    """REST manifest of an ``AdapterManifest``: digests and sizes, never the artifact URI."""
    lineage = message.lineage
    artifact = None
    if message.HasField("artifact"):
        artifact = Artifact(sha256=message.artifact.sha256, size_bytes=message.artifact.size_bytes)
    return AdapterManifest(
        adapter=AdapterRef.model_construct(
            name=message.adapter.name, version=message.adapter.version
        ),
        tenant_id=message.tenant_id,
        task=message.task,
        adapter_type=message.adapter_type,
        method=METHOD_FROM_PROTO.get(message.method),
        lineage=AdapterLineage(
            base_model=lineage.base_model,
            base_model_sha256=lineage.base_model_sha256,
            snapshot_id=lineage.dataset_snapshot_id,
            parent_adapter=adapter_of(lineage, "parent_adapter"),
            training_job_id=lineage.training_job_id,
            training_request_id=lineage.training_request_id,
        ),
        lora=lora_of(message.lora) if message.HasField("lora") else None,
        hyperparameters=dict_of(message.hyperparameters),
        metrics={name: _finite(value) for name, value in message.metrics.items()},
        artifact=artifact,
        files=[
            AdapterFile(path=f.path, sha256=f.sha256, size_bytes=f.size_bytes)
            for f in message.files
        ],
        worse_than_parent=message.worse_than_parent,
        created_at=datetime_of(message, "created_at"),
    )
