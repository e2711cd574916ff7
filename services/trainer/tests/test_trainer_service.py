"""The trainer service over gRPC on the embedded default (SQLite, the embedded event log):
jobs from SubmitJob and from training.requested events run in their own processes and
publish adapters; cancel, retry, logs, adapters and bad input behave as the contract says."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf.struct_pb2 import Struct

from flywheel.contracts.common.v1.common_pb2 import AdapterRef
from flywheel.contracts.dataset.v1 import events_pb2 as de
from flywheel.contracts.dataset.v1 import resources_pb2 as ds
from flywheel.contracts.trainer.v1 import resources_pb2 as tr
from flywheel.contracts.trainer.v1 import service_pb2 as api
from flywheel.contracts.trainer.v1.service_pb2_grpc import TrainerServiceStub
from flywheel.core.errors import field_errors_of
from flywheel.core.events.bus import EventRecord
from flywheel.core.events.envelope import event_options, parse, unpack, wrap
from flywheel.core.events.topics import Topic
from flywheel.core.layout import snapshot_file_key
from flywheel.core.runtime import ServiceRuntime
from flywheel.core.testing.local_infra import free_port
from flywheel.core.testing.services import serving
from flywheel.trainer.server import build

SNAPSHOT = "sha256:" + "5e" * 32


@dataclass
class Trainer:
    stub: TrainerServiceStub
    runtime: ServiceRuntime


@pytest.fixture
async def trainer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base_model: Path, datasets_dir: Path
) -> AsyncIterator[Trainer]:
    for name, value in {
        "FLYWHEEL_DATA_DIR": str(tmp_path / "data"), "FLYWHEEL_METRICS_PORT": "0",
        "FLYWHEEL_GRPC_PORT": str(free_port()), "FLYWHEEL_TRAINER_POLL_S": "0.2",
        "FLYWHEEL_TRAINER_DEFAULT_BASE_MODEL": str(base_model),
        "FLYWHEEL_TRAINER_PROGRESS_EVENT_INTERVAL_S": "0",
    }.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    runtime = build()
    for tenant in ("acme", "globex"):
        runtime.artifacts.put_file(
            snapshot_file_key(tenant, SNAPSHOT, "train"), datasets_dir / "preference.jsonl"
        )
        runtime.artifacts.put_file(
            snapshot_file_key(tenant, SNAPSHOT, "eval"), datasets_dir / "preference-eval.jsonl"
        )
    async with (
        serving(runtime),
        grpc.aio.insecure_channel(f"127.0.0.1:{runtime.settings.grpc_port}") as channel,
    ):
        yield Trainer(TrainerServiceStub(channel), runtime)


def dpo_spec(steps: int = 3, **fields: object) -> tr.TrainingSpec:
    hyperparameters = Struct()
    hyperparameters.update({"max_steps": steps, "per_device_train_batch_size": 4})
    spec = tr.TrainingSpec(
        task="retail_media.budgeting", method=tr.TRAINING_METHOD_DPO, dataset_snapshot_id=SNAPSHOT,
        adapter_name="acme-budgeting-dpo", adapter_type="brand", checkpoint_every_steps=2,
        hyperparameters=hyperparameters, **fields,  # type: ignore[arg-type]
    )  # fmt: skip
    spec.lora.r = 4
    return spec


async def finished(stub: TrainerServiceStub, tenant: str, job_id: str) -> tr.Job:
    """The job once it has finished, following WatchJob."""
    last = tr.Job()
    async for update in stub.WatchJob(api.WatchJobRequest(tenant_id=tenant, job_id=job_id)):
        last.CopyFrom(update.job)
    return last


async def events_of(runtime: ServiceRuntime, topic: str) -> list[tuple[str, object]]:
    """Every event on ``topic`` so far, as (type, envelope)."""
    subscription = await runtime.bus.subscribe(f"test-{uuid.uuid4()}", [topic])
    try:
        records = await subscription.poll(timeout_s=1.0)
    finally:
        await subscription.close()
    return [(r.event_type, parse(r.value)) for r in records]


async def test_a_job_runs_and_publishes_its_adapter(trainer: Trainer) -> None:
    submitted = await trainer.stub.SubmitJob(
        api.SubmitJobRequest(tenant_id="acme", spec=dpo_spec(), client_request_id="req-1")
    )
    again = await trainer.stub.SubmitJob(
        api.SubmitJobRequest(tenant_id="acme", spec=dpo_spec(), client_request_id="req-1")
    )
    assert again.job.job_id == submitted.job.job_id  # idempotent on client_request_id
    job = await finished(trainer.stub, "acme", submitted.job.job_id)
    assert job.state == tr.JOB_STATE_SUCCEEDED, job.state_reason
    assert job.progress.step == 3
    assert job.progress.total_steps == 3
    assert job.last_checkpoint_step >= 2
    # The eval pass after training logs no loss; the job keeps its training loss.
    assert job.progress.HasField("loss")
    assert job.progress.metrics["eval_loss"] > 0
    assert job.adapter == AdapterRef(name="acme-budgeting-dpo", version="v1")

    got = await trainer.stub.GetAdapter(
        api.GetAdapterRequest(tenant_id="acme", adapter=job.adapter)
    )
    manifest = got.adapter
    assert manifest.lineage.dataset_snapshot_id == SNAPSHOT
    assert manifest.lineage.training_job_id == job.job_id
    assert manifest.method == tr.TRAINING_METHOD_DPO
    assert manifest.adapter_type == "brand"
    assert "eval_loss" in manifest.metrics
    store = trainer.runtime.artifacts
    prefix = store.key_of(manifest.artifact.uri)
    names = {f.path for f in manifest.files}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    for digest in manifest.files:
        assert store.info(f"{prefix}/{digest.path}").sha256 == digest.sha256
    listed = await trainer.stub.ListAdapters(api.ListAdaptersRequest(tenant_id="acme"))
    assert [a.adapter for a in listed.adapters] == [job.adapter]
    assert (
        await trainer.stub.ListAdapters(api.ListAdaptersRequest(tenant_id="globex"))
    ).adapters == []

    await asyncio.sleep(0.5)  # the relay publishes what the transaction staged
    published = await events_of(trainer.runtime, Topic.ADAPTERS)
    (kind, envelope), = published  # fmt: skip
    from flywheel.contracts.trainer.v1 import events_pb2 as te

    assert kind == event_options(te.AdapterPublished)[0]
    assert unpack(envelope, te.AdapterPublished).manifest.adapter == job.adapter  # type: ignore[arg-type]
    training = [k for k, _ in await events_of(trainer.runtime, Topic.TRAINING)]
    assert training.count("training.job_status_changed") == 3  # queued, running, succeeded
    assert "training.job_progress" in training

    logs = trainer.stub.StreamJobLogs(api.StreamJobLogsRequest(tenant_id="acme", job_id=job.job_id))
    lines = [m.line async for m in logs]
    assert any("done: 3 steps" in line for line in lines)


async def test_a_training_request_event_becomes_one_job(trainer: Trainer) -> None:
    request = ds.TrainingRequest(
        training_request_id=str(uuid.uuid4()), tenant_id="globex", spec=dpo_spec(1), reason="policy"
    )
    envelope = wrap("globex", de.TrainingRequested(request=request), source_service="dataset")
    record = EventRecord(
        topic=Topic.TRAINING, key="globex", value=envelope.SerializeToString(),
        event_id=envelope.event_id, event_type=envelope.type,
    )  # fmt: skip
    await trainer.runtime.bus.publish([record, record])  # delivered twice: still one job
    for _ in range(100):
        jobs = (await trainer.stub.ListJobs(api.ListJobsRequest(tenant_id="globex"))).jobs
        if jobs:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    jobs = (await trainer.stub.ListJobs(api.ListJobsRequest(tenant_id="globex"))).jobs
    assert len(jobs) == 1
    assert jobs[0].training_request_id == request.training_request_id
    job = await finished(trainer.stub, "globex", jobs[0].job_id)
    assert job.state == tr.JOB_STATE_SUCCEEDED, job.state_reason


async def test_cancel_then_retry_resumes_from_the_checkpoint(trainer: Trainer) -> None:
    spec = dpo_spec(40)
    spec.checkpoint_every_steps = 1
    job = (await trainer.stub.SubmitJob(api.SubmitJobRequest(tenant_id="acme", spec=spec))).job
    async for update in trainer.stub.WatchJob(
        api.WatchJobRequest(tenant_id="acme", job_id=job.job_id)
    ):
        if update.job.HasField("last_checkpoint_step") and update.job.last_checkpoint_step >= 2:
            break
    cancelled = await trainer.stub.CancelJob(
        api.CancelJobRequest(tenant_id="acme", job_id=job.job_id, reason="wrong data")
    )
    assert cancelled.job.state in (tr.JOB_STATE_RUNNING, tr.JOB_STATE_CANCELLED)
    done = await finished(trainer.stub, "acme", job.job_id)
    assert done.state == tr.JOB_STATE_CANCELLED
    assert done.state_reason == "wrong data"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await trainer.stub.CancelJob(api.CancelJobRequest(tenant_id="acme", job_id=job.job_id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    retry = (
        await trainer.stub.RetryJob(api.RetryJobRequest(tenant_id="acme", job_id=job.job_id))
    ).job
    assert retry.attempt == 2
    assert retry.retry_of_job_id == job.job_id
    again = await finished(trainer.stub, "acme", retry.job_id)
    assert again.state == tr.JOB_STATE_SUCCEEDED, again.state_reason
    logs = trainer.stub.StreamJobLogs(
        api.StreamJobLogsRequest(tenant_id="acme", job_id=retry.job_id)
    )
    lines = [m.line async for m in logs]
    # The same spec, continued from the cancelled attempt's last complete checkpoint.
    assert any("done: 40 steps, resumed from step" in line for line in lines), lines[-5:]


async def test_bad_requests_are_field_errors_and_tenants_are_isolated(trainer: Trainer) -> None:
    bad = dpo_spec()
    bad.dataset_snapshot_id = "latest"
    bad.lora.r = 0
    bad.method = tr.TRAINING_METHOD_GRPO
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await trainer.stub.SubmitJob(api.SubmitJobRequest(tenant_id="acme", spec=bad))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = {e.field for e in field_errors_of(caught.value)}
    assert fields == {"spec.dataset_snapshot_id", "spec.lora.r", "spec.reward_functions"}

    missing = dpo_spec()
    missing.dataset_snapshot_id = "sha256:" + "0" * 64
    job = (await trainer.stub.SubmitJob(api.SubmitJobRequest(tenant_id="acme", spec=missing))).job
    failed = await finished(trainer.stub, "acme", job.job_id)
    assert failed.state == tr.JOB_STATE_FAILED
    assert "not in the artifact store" in failed.state_reason
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await trainer.stub.GetJob(api.GetJobRequest(tenant_id="globex", job_id=job.job_id))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_running_job_resumes_when_the_service_restarts(
    trainer: Trainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = dpo_spec(30)
    spec.checkpoint_every_steps = 1
    job = (await trainer.stub.SubmitJob(api.SubmitJobRequest(tenant_id="acme", spec=spec))).job
    request = api.WatchJobRequest(tenant_id="acme", job_id=job.job_id)
    async for update in trainer.stub.WatchJob(request):
        if update.job.HasField("last_checkpoint_step") and update.job.last_checkpoint_step >= 2:
            break
    # The service goes down with its job process (as when its pod is replaced) ...
    trainer.runtime.stop.set()
    await asyncio.sleep(1.0)
    monkeypatch.setenv("FLYWHEEL_GRPC_PORT", str(free_port()))
    restarted = build()  # ... and comes back on the same database and folders.
    async with (
        serving(restarted),
        grpc.aio.insecure_channel(f"127.0.0.1:{restarted.settings.grpc_port}") as channel,
    ):
        stub = TrainerServiceStub(channel)
        done = await finished(stub, "acme", job.job_id)
        assert done.state == tr.JOB_STATE_SUCCEEDED, done.state_reason
        logs = stub.StreamJobLogs(api.StreamJobLogsRequest(tenant_id="acme", job_id=job.job_id))
        lines = [m.line async for m in logs]
    assert any("done: 30 steps, resumed from step" in line for line in lines), lines[-5:]
