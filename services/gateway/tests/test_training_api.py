"""Training jobs and adapters through REST -> gRPC -> the real trainer service, and back.

No test trains: the trainer's scheduler is idle by default, so jobs stay queued (and can
be cancelled, deterministically); the test that wants it running gets a scheduler with a
CPU, where a job whose snapshot is not in the artifact store fails at setup at once.
Adapters are published straight into the trainer's tables, as a finished job would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import delete

from flywheel.contracts.common.v1.common_pb2 import AdapterRef, ArtifactRef, FileDigest, Lineage
from flywheel.contracts.trainer.v1 import resources_pb2 as tr
from flywheel.core.runtime import ServiceRuntime
from flywheel.core.testing.local_infra import free_port
from flywheel.gateway.config import GatewaySettings
from flywheel.gateway.idempotency import IdempotencyRecord

MakeTenant = Callable[..., Awaitable[Any]]

SNAPSHOT = "sha256:" + "5e" * 32
JOBS = "/v1/training/jobs"
SECRET_URI = "file:///var/flywheel/secret-artifacts"

JOB = {"task": "budgeting", "method": "dpo", "base_model": "tiny-llama", "snapshot_id": SNAPSHOT}
FULL_JOB = {
    **JOB,
    "adapter_name": "acme-budgeting-dpo",
    "adapter_type": "brand",
    "parent_adapter": {"name": "acme-budgeting-sft", "version": "v3"},
    "lora": {
        "r": 8,
        "alpha": 16,
        "dropout": 0.05,
        "target_modules": ["q_proj", "v_proj"],
        "use_rslora": True,
    },
    "qlora": True,
    "hyperparameters": {"learning_rate": 0.0002, "beta": 0.1},
    "seed": 7,
    "reward_functions": ["retail_media.budget_sum"],
    "checkpoint_every_steps": 25,
    "resources": {
        "gpus": 2,
        "num_nodes": 1,
        "strategy": "deepspeed",
        "deepspeed_config": {"zero_optimization": {"stage": 2}},
    },
    "priority": 3,
}


@pytest.fixture
def gateway_settings(gateway_settings: GatewaySettings, trainer_target: str) -> GatewaySettings:
    gateway_settings.upstreams["trainer"] = trainer_target
    return gateway_settings


def _job_dir(trainer: ServiceRuntime, job_id: str) -> Path:
    from flywheel.trainer.config import TrainerSettings
    from flywheel.trainer.scheduler import work_dir_of

    settings = trainer.settings
    assert isinstance(settings, TrainerSettings)
    return work_dir_of(settings.resolved_work_dir(), job_id)


def _append_log(trainer: ServiceRuntime, job_id: str, *lines: str) -> None:
    from flywheel.trainer.scheduler import LOG_FILE

    folder = _job_dir(trainer, job_id)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / LOG_FILE).open("a") as log:
        log.writelines(f"{line}\n" for line in lines)


async def _submit(gateway: Any, secret: str, body: dict[str, Any] | None = None) -> Any:
    response = await gateway.client.post(JOBS, json=body or JOB, headers=gateway.auth(secret))
    assert response.status_code == 201, response.text
    return response.json()


async def _until_finished(gateway: Any, secret: str, job_id: str, timeout_s: float = 15.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        response = await gateway.client.get(f"{JOBS}/{job_id}", headers=gateway.auth(secret))
        assert response.status_code == 200, response.text
        job = response.json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"job {job_id} still {job['state']}")
        await asyncio.sleep(0.1)


async def test_submit_read_list_cancel_and_retry(gateway: Any, make_tenant: MakeTenant) -> None:
    acme = await make_tenant("acme")
    client, integrator = gateway.client, gateway.auth(acme.integrator)

    response = await client.post(JOBS, json=FULL_JOB, headers=integrator)
    assert response.status_code == 201, response.text
    job = response.json()
    assert response.headers["location"] == f"{JOBS}/{job['job_id']}"
    assert job["tenant_id"] == acme.tenant_id
    assert job["state"] == "queued"
    assert job["state_reason"] == ""
    assert job["priority"] == 3
    assert job["attempt"] == 1
    assert job["retry_of_job_id"] is None
    assert job["training_request_id"] is None
    assert job["progress"] is None
    assert job["last_checkpoint_step"] is None
    assert job["adapter"] is None
    assert job["device"] == ""
    assert job["created_at"] is not None
    assert job["started_at"] is None
    assert job["finished_at"] is None
    spec = job["spec"]
    assert spec == {
        "task": "budgeting",
        "method": "dpo",
        "snapshot_id": SNAPSHOT,
        "base_model": "tiny-llama",
        "adapter_name": "acme-budgeting-dpo",
        "adapter_type": "brand",
        "parent_adapter": {"name": "acme-budgeting-sft", "version": "v3"},
        "qlora": True,
        "hyperparameters": {"learning_rate": 0.0002, "beta": 0.1},
        "seed": 7,
        "lora": {
            "r": 8,
            "alpha": 16.0,
            "dropout": pytest.approx(0.05),
            "target_modules": ["q_proj", "v_proj"],
            "use_rslora": True,
        },
        "reward_functions": ["retail_media.budget_sum"],
        "reward_model": None,
        "reward_dimension": "",
        "checkpoint_every_steps": 25,
        "resources": {
            "gpus": 2,
            "num_nodes": 1,
            "strategy": "deepspeed",
            "deepspeed_config": {"zero_optimization": {"stage": 2}},
        },
    }

    got = await client.get(f"{JOBS}/{job['job_id']}", headers=integrator)
    assert got.status_code == 200, got.text
    assert got.json() == job

    # Defaults: no adapter name, type "task", no LoRA settings, no resources.
    sft = await _submit(gateway, acme.integrator, {**JOB, "method": "sft", "task": "creative"})
    assert sft["spec"]["adapter_name"] == ""
    assert sft["spec"]["adapter_type"] == "task"
    assert sft["spec"]["lora"] is None
    assert sft["spec"]["resources"] is None
    assert sft["spec"]["seed"] is None
    assert sft["priority"] == 0

    async def listed(**params: Any) -> list[str]:
        response = await client.get(JOBS, params=params, headers=integrator)
        assert response.status_code == 200, response.text
        return [j["job_id"] for j in response.json()["items"]]

    assert await listed() == [sft["job_id"], job["job_id"]]  # newest first
    assert await listed(state="queued") == [sft["job_id"], job["job_id"]]
    assert await listed(state="running") == []
    assert await listed(task="budgeting") == [job["job_id"]]
    assert await listed(method="sft") == [sft["job_id"]]
    assert await listed(method="kto") == []
    first = await client.get(JOBS, params={"limit": 1}, headers=integrator)
    cursor = first.json()["next_cursor"]
    assert cursor
    second = await client.get(JOBS, params={"limit": 1, "cursor": cursor}, headers=integrator)
    assert second.json()["next_cursor"] is None
    assert [j["job_id"] for r in (first, second) for j in r.json()["items"]] == await listed()

    # Queued: cancelled at once, with the reason given.
    cancel = await client.post(
        f"{JOBS}/{job['job_id']}/cancel", json={"reason": "wrong snapshot"}, headers=integrator
    )
    assert cancel.status_code == 200, cancel.text
    cancelled = cancel.json()
    assert cancelled["state"] == "cancelled"
    assert cancelled["state_reason"] == "wrong snapshot"
    assert cancelled["finished_at"] is not None
    # Once finished, a cancel is a conflict.
    again = await client.post(f"{JOBS}/{job['job_id']}/cancel", headers=integrator)
    assert again.status_code == 409, again.text
    assert again.headers["content-type"] == "application/problem+json"
    assert again.json()["type"] == "urn:flywheel:problem:conflict"
    # No body at all: the default reason.
    plain = await client.post(f"{JOBS}/{sft['job_id']}/cancel", headers=integrator)
    assert plain.status_code == 200, plain.text
    assert plain.json()["state"] == "cancelled"
    assert plain.json()["state_reason"] == "cancelled by request"

    retry = await client.post(
        f"{JOBS}/{job['job_id']}/retry", json={"from_scratch": True}, headers=integrator
    )
    assert retry.status_code == 201, retry.text
    attempt = retry.json()
    assert retry.headers["location"] == f"{JOBS}/{attempt['job_id']}"
    assert attempt["job_id"] != job["job_id"]
    assert attempt["attempt"] == 2
    assert attempt["retry_of_job_id"] == job["job_id"]
    assert attempt["state"] == "queued"
    assert attempt["priority"] == 3
    assert attempt["spec"] == job["spec"]
    # Only failed or cancelled jobs are retried.
    queued = await client.post(f"{JOBS}/{attempt['job_id']}/retry", headers=integrator)
    assert queued.status_code == 409, queued.text

    assert await listed(state="cancelled") == [sft["job_id"], job["job_id"]]
    assert await listed(state=["queued", "cancelled"]) == [
        attempt["job_id"],
        sft["job_id"],
        job["job_id"],
    ]


async def test_idempotency_key_submits_once(gateway: Any, make_tenant: MakeTenant) -> None:
    acme = await make_tenant("acme")
    client = gateway.client
    keyed = {**gateway.auth(acme.integrator), "Idempotency-Key": "train-once"}
    first = await client.post(JOBS, json=JOB, headers=keyed)
    retry = await client.post(JOBS, json=JOB, headers=keyed)
    assert first.status_code == retry.status_code == 201, retry.text
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.json()["job_id"] == first.json()["job_id"]
    assert retry.headers["location"] == first.headers["location"]
    different = await client.post(JOBS, json={**JOB, "priority": 9}, headers=keyed)
    assert different.status_code == 422, different.text

    # The gateway lost its record (its call timed out after the trainer had queued the
    # job, say): the trainer still knows the key and returns the same job.
    async with gateway.state.idempotency.sessions() as session, session.begin():
        await session.execute(delete(IdempotencyRecord))
    again = await client.post(JOBS, json=JOB, headers=keyed)
    assert again.status_code == 201, again.text
    assert "idempotent-replayed" not in again.headers
    assert again.json()["job_id"] == first.json()["job_id"]
    # Another key of the tenant with the same Idempotency-Key is another request.
    other_key = await gateway.key(acme.tenant_id, "integrator")
    other = await client.post(
        JOBS, json=JOB, headers={**gateway.auth(other_key), "Idempotency-Key": "train-once"}
    )
    assert other.status_code == 201, other.text
    assert other.json()["job_id"] != first.json()["job_id"]
    listed = await client.get(JOBS, headers=gateway.auth(acme.integrator))
    assert len(listed.json()["items"]) == 2


@pytest.mark.parametrize("trainer_schedules", [True])
async def test_a_job_that_cannot_start_fails_then_retries(
    gateway: Any, make_tenant: MakeTenant
) -> None:
    acme = await make_tenant("acme")
    client, integrator = gateway.client, gateway.auth(acme.integrator)
    job = await _submit(gateway, acme.integrator)
    failed = await _until_finished(gateway, acme.integrator, job["job_id"])
    assert failed["state"] == "failed"
    assert "not in the artifact store" in failed["state_reason"]
    assert failed["finished_at"] is not None

    cancel = await client.post(f"{JOBS}/{job['job_id']}/cancel", headers=integrator)
    assert cancel.status_code == 409, cancel.text
    assert "finished" in cancel.json()["detail"]

    # Nothing ran, so nothing was logged.
    logs = await client.get(f"{JOBS}/{job['job_id']}/logs", headers=integrator)
    assert logs.status_code == 200, logs.text
    assert logs.headers["content-type"] == "text/plain; charset=utf-8"
    assert logs.text == ""

    retry = await client.post(f"{JOBS}/{job['job_id']}/retry", json={}, headers=integrator)
    assert retry.status_code == 201, retry.text
    attempt = retry.json()
    assert attempt["attempt"] == 2
    assert attempt["retry_of_job_id"] == job["job_id"]
    again = await _until_finished(gateway, acme.integrator, attempt["job_id"])
    assert again["state"] == "failed"
    failures = await client.get(JOBS, params={"state": "failed"}, headers=integrator)
    assert {j["job_id"] for j in failures.json()["items"]} == {job["job_id"], attempt["job_id"]}


class _Uvicorn(uvicorn.Server):
    """uvicorn in the test's loop, leaving the signal handlers alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@pytest.fixture
async def gateway_url(gateway: Any) -> AsyncIterator[str]:
    """The gateway app (already started) over real HTTP, for responses that stream."""
    port = free_port()
    config = uvicorn.Config(
        gateway.app, host="127.0.0.1", port=port, lifespan="off", log_config=None
    )
    server = _Uvicorn(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def test_logs_tail_and_follow(
    gateway: Any, gateway_url: str, make_tenant: MakeTenant, trainer_runtime: ServiceRuntime
) -> None:
    acme = await make_tenant("acme")
    client, integrator = gateway.client, gateway.auth(acme.integrator)
    job = await _submit(gateway, acme.integrator)
    path = f"{JOBS}/{job['job_id']}/logs"

    empty = await client.get(path, headers=integrator)
    assert empty.status_code == 200, empty.text
    assert empty.text == ""
    _append_log(trainer_runtime, job["job_id"], *(f"step {n}" for n in range(1, 6)))
    whole = await client.get(path, headers=integrator)
    assert whole.status_code == 200, whole.text
    assert whole.headers["content-type"] == "text/plain; charset=utf-8"
    assert whole.text == "".join(f"step {n}\n" for n in range(1, 6))
    tail = await client.get(path, params={"tail": 2}, headers=integrator)
    assert tail.text == "step 4\nstep 5\n"

    # Followed over real HTTP: the response starts at once, each new line arrives as the
    # job writes it, and the stream ends when the job finishes.
    async def next_line(lines: AsyncIterator[str]) -> str:
        return await asyncio.wait_for(anext(lines), timeout=10)

    async with (
        httpx.AsyncClient(base_url=gateway_url, timeout=10) as http,
        http.stream(
            "GET", path, params={"follow": "true", "tail": 1}, headers=integrator
        ) as followed,
    ):
        assert followed.status_code == 200
        assert followed.headers["content-type"] == "text/plain; charset=utf-8"
        assert followed.headers.get("transfer-encoding") == "chunked"
        lines = followed.aiter_lines()
        assert await next_line(lines) == "step 5"
        _append_log(trainer_runtime, job["job_id"], "step 6")
        assert await next_line(lines) == "step 6"
        _append_log(trainer_runtime, job["job_id"], "step 7", "step 8")
        assert [await next_line(lines), await next_line(lines)] == ["step 7", "step 8"]
        cancel = await client.post(f"{JOBS}/{job['job_id']}/cancel", headers=integrator)
        assert cancel.status_code == 200, cancel.text
        rest = await asyncio.wait_for(_drain(lines), timeout=10)
        assert rest == []

    # A finished job's followed log is its whole log, then the end.
    done = await client.get(path, params={"follow": "true"}, headers=integrator)
    assert done.status_code == 200, done.text
    assert done.text.splitlines() == [f"step {n}" for n in range(1, 9)]

    # A client that hangs up ends the follow (the next test would hang otherwise).
    other = await _submit(gateway, acme.integrator)
    async with (
        httpx.AsyncClient(base_url=gateway_url, timeout=10) as http,
        http.stream(
            "GET", f"{JOBS}/{other['job_id']}/logs?follow=true", headers=integrator
        ) as hung,
    ):
        assert hung.status_code == 200

    missing = await client.get(f"{JOBS}/no-such-job/logs", headers=integrator)
    assert missing.status_code == 404, missing.text
    assert missing.headers["content-type"] == "application/problem+json"
    followed_missing = await client.get(
        f"{JOBS}/no-such-job/logs", params={"follow": "true"}, headers=integrator
    )
    assert followed_missing.status_code == 404, followed_missing.text


async def _drain(lines: AsyncIterator[str]) -> list[str]:
    return [line async for line in lines]


async def _publish(
    trainer: ServiceRuntime, job_id: str, tenant_id: str, name: str, task: str
) -> tr.AdapterManifest:
    """Publish an adapter for ``job_id`` the way the scheduler does when a job succeeds."""
    from flywheel.trainer.jobs import JobStore

    manifest = tr.AdapterManifest(
        adapter=AdapterRef(name=name),
        tenant_id=tenant_id,
        task=task,
        adapter_type="brand",
        method=tr.TRAINING_METHOD_DPO,
        lineage=Lineage(
            base_model="tiny-llama",
            base_model_sha256="ab" * 32,
            dataset_snapshot_id=SNAPSHOT,
            parent_adapter=AdapterRef(name="acme-budgeting-sft", version="v3"),
            training_job_id=job_id,
        ),
        lora=tr.LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=["q_proj"], use_rslora=False),
        metrics={"eval_loss": 0.5, "train_loss": float("nan")},
        files=[
            FileDigest(path="adapter_config.json", sha256="cd" * 32, size_bytes=300),
            FileDigest(path="adapter_model.safetensors", sha256="ef" * 32, size_bytes=4096),
        ],
        worse_than_parent=True,
    )
    manifest.hyperparameters.update({"beta": 0.1, "num_train_epochs": 1})
    manifest.created_at.FromDatetime(datetime.now(UTC))

    def store(m: tr.AdapterManifest) -> tr.AdapterManifest:
        uri = f"{SECRET_URI}/{tenant_id}/{m.adapter.name}/{m.adapter.version}"
        m.artifact.CopyFrom(ArtifactRef(uri=uri, sha256="12" * 32, size_bytes=4396))
        return m

    jobs = JobStore(trainer.sessions, on_commit=lambda: None)
    return await jobs.publish_adapter(job_id, manifest, store)


async def test_adapters_are_listed_and_read_without_their_location(
    gateway: Any, make_tenant: MakeTenant, trainer_runtime: ServiceRuntime
) -> None:
    acme, brandb = await make_tenant("acme"), await make_tenant("brandb")
    client, integrator = gateway.client, gateway.auth(acme.integrator)
    name = "acme-budgeting-dpo"
    first_job = await _submit(gateway, acme.integrator)
    second_job = await _submit(gateway, acme.integrator)
    other_job = await _submit(gateway, acme.integrator, {**JOB, "task": "creative"})
    await _publish(trainer_runtime, first_job["job_id"], acme.tenant_id, name, "budgeting")
    await _publish(trainer_runtime, second_job["job_id"], acme.tenant_id, name, "budgeting")
    await _publish(
        trainer_runtime, other_job["job_id"], acme.tenant_id, "acme-creative", "creative"
    )

    succeeded = await client.get(f"{JOBS}/{first_job['job_id']}", headers=integrator)
    assert succeeded.json()["state"] == "succeeded"
    assert succeeded.json()["adapter"] == {"name": name, "version": "v1"}

    got = await client.get(f"/v1/adapters/{name}/versions/v1", headers=integrator)
    assert got.status_code == 200, got.text
    assert SECRET_URI not in got.text
    assert "file://" not in got.text
    manifest = got.json()
    assert manifest == {
        "adapter": {"name": name, "version": "v1"},
        "tenant_id": acme.tenant_id,
        "task": "budgeting",
        "adapter_type": "brand",
        "method": "dpo",
        "lineage": {
            "base_model": "tiny-llama",
            "base_model_sha256": "ab" * 32,
            "snapshot_id": SNAPSHOT,
            "parent_adapter": {"name": "acme-budgeting-sft", "version": "v3"},
            "training_job_id": first_job["job_id"],
            "training_request_id": "",
        },
        "lora": {
            "r": 8,
            "alpha": 16.0,
            "dropout": 0.0,
            "target_modules": ["q_proj"],
            "use_rslora": False,
        },
        "hyperparameters": {"beta": 0.1, "num_train_epochs": 1},
        # A diverged metric (NaN) has no JSON number: null.
        "metrics": {"eval_loss": 0.5, "train_loss": None},
        "artifact": {"sha256": "12" * 32, "size_bytes": 4396},
        "files": [
            {"path": "adapter_config.json", "sha256": "cd" * 32, "size_bytes": 300},
            {"path": "adapter_model.safetensors", "sha256": "ef" * 32, "size_bytes": 4096},
        ],
        "worse_than_parent": True,
        "created_at": manifest["created_at"],
    }
    assert manifest["created_at"] is not None
    latest = await client.get(f"/v1/adapters/{name}/versions/latest", headers=integrator)
    assert latest.status_code == 200, latest.text
    assert latest.json()["adapter"] == {"name": name, "version": "v2"}

    async def listed(**params: Any) -> list[str]:
        response = await client.get("/v1/adapters", params=params, headers=integrator)
        assert response.status_code == 200, response.text
        assert "file://" not in response.text
        return [
            f"{a['adapter']['name']}@{a['adapter']['version']}" for a in response.json()["items"]
        ]

    everything = await listed()
    assert sorted(everything) == [
        "acme-budgeting-dpo@v1",
        "acme-budgeting-dpo@v2",
        "acme-creative@v1",
    ]
    assert everything[0] == "acme-creative@v1"  # newest first
    assert await listed(adapter_name=name) == ["acme-budgeting-dpo@v2", "acme-budgeting-dpo@v1"]
    assert await listed(task="creative") == ["acme-creative@v1"]
    assert await listed(task="nothing") == []
    first = await client.get("/v1/adapters", params={"limit": 2}, headers=integrator)
    assert len(first.json()["items"]) == 2
    cursor = first.json()["next_cursor"]
    second = await client.get(
        "/v1/adapters", params={"limit": 2, "cursor": cursor}, headers=integrator
    )
    assert second.json()["next_cursor"] is None
    paged = [a["adapter"] for r in (first, second) for a in r.json()["items"]]
    assert [f"{a['name']}@{a['version']}" for a in paged] == everything
    listed_v1 = next(
        a
        for r in (first, second)
        for a in r.json()["items"]
        if a["adapter"]["version"] == "v1" and a["adapter"]["name"] == name
    )
    assert listed_v1 == manifest

    for missing in (f"/v1/adapters/{name}/versions/v9", "/v1/adapters/nope/versions/latest"):
        response = await client.get(missing, headers=integrator)
        assert response.status_code == 404, (missing, response.text)
    # A succeeded job is neither cancelled nor retried.
    for action in ("cancel", "retry"):
        response = await client.post(f"{JOBS}/{first_job['job_id']}/{action}", headers=integrator)
        assert response.status_code == 409, (action, response.text)

    # Another tenant sees none of it.
    theirs = gateway.auth(brandb.integrator)
    hidden = await client.get(f"/v1/adapters/{name}/versions/v1", headers=theirs)
    assert hidden.status_code == 404, hidden.text
    assert acme.tenant_id not in hidden.text
    assert (await client.get("/v1/adapters", headers=theirs)).json()["items"] == []


async def test_invalid_requests_name_the_rest_field(gateway: Any, make_tenant: MakeTenant) -> None:
    acme = await make_tenant("acme")
    client, integrator = gateway.client, gateway.auth(acme.integrator)

    async def fields(method: str, path: str, **kwargs: Any) -> list[str]:
        response = await client.request(method, path, headers=integrator, **kwargs)
        assert response.status_code == 422, response.text
        assert response.headers["content-type"] == "application/problem+json"
        return sorted(e["field"] for e in response.json()["errors"])

    for change, field in (
        ({"lora": {"r": 0}}, "lora.r"),
        ({"lora": {"r": 1025}}, "lora.r"),
        ({"lora": {"dropout": 1.0}}, "lora.dropout"),
        ({"lora": {"alpha": 0}}, "lora.alpha"),
        ({"lora": {"rank": 8}}, "lora.rank"),
        ({"snapshot_id": "latest"}, "snapshot_id"),
        ({"snapshot_id": None}, "snapshot_id"),
        ({"method": "ppo"}, "method"),
        ({"method": None}, "method"),
        ({"tenant_id": "other"}, "tenant_id"),
        ({"adapter_name": "acme/evil"}, "adapter_name"),
        ({"adapter_name": ".hidden"}, "adapter_name"),
        ({"task": "t" * 64}, "task"),
        ({"resources": {"gpus": 65}}, "resources.gpus"),
        ({"resources": {"strategy": "magic"}}, "resources.strategy"),
        ({"priority": 2**31}, "priority"),
        ({"seed": -1}, "seed"),
        ({"parent_adapter": {"name": ""}}, "parent_adapter.name"),
        ({"hyperparameters": {"lr": 10**400}}, "hyperparameters"),
    ):
        assert await fields("POST", JOBS, json={**JOB, **change}) == [field], change
    # Not JSON at all (json.dumps writes Infinity): refused whole.
    not_json = await client.post(
        JOBS,
        content=json.dumps({**JOB, "hyperparameters": {"lr": float("inf")}}),
        headers={**integrator, "Content-Type": "application/json"},
    )
    assert not_json.status_code == 400, not_json.text
    missing = {k: v for k, v in JOB.items() if k not in ("method", "snapshot_id")}
    assert await fields("POST", JOBS, json=missing) == ["method", "snapshot_id"]
    # Within REST's bounds, refused by the service: still REST names.
    assert await fields("POST", JOBS, json={**JOB, "method": "grpo"}) == ["reward_functions"]
    assert await fields("POST", JOBS, json={**JOB, "base_model": ""}) == ["base_model"]
    reward_model = {"name": "acme-reward", "version": "v1"}
    assert await fields("POST", JOBS, json={**JOB, "reward_model": reward_model}) == [
        "reward_model"
    ]
    assert await fields("POST", JOBS, json={**JOB, "reward_dimension": "tone"}) == [
        "reward_dimension"
    ]

    assert await fields("GET", JOBS, params={"state": "done"}) == ["state.0"]
    assert await fields("GET", JOBS, params={"method": "ppo"}) == ["method"]
    assert await fields("GET", JOBS, params={"limit": 0}) == ["limit"]
    assert await fields("GET", JOBS, params={"cursor": "garbage!"}) == ["cursor"]
    assert await fields("GET", "/v1/adapters", params={"cursor": "garbage!"}) == ["cursor"]
    assert await fields("GET", "/v1/adapters", params={"limit": 501}) == ["limit"]
    assert await fields("GET", f"{JOBS}/x/logs", params={"tail": -1}) == ["tail"]
    assert await fields("GET", f"{JOBS}/x/logs", params={"follow": "maybe"}) == ["follow"]
    assert await fields("POST", f"{JOBS}/x/retry", json={"from_scratch": "yes"}) == ["from_scratch"]
    assert await fields("POST", f"{JOBS}/x/cancel", json={"reason": "r" * 2001}) == ["reason"]
    assert await fields("POST", f"{JOBS}/x/cancel", json={"why": "no"}) == ["why"]
    unknown = await client.get(f"{JOBS}/no-such-job", headers=integrator)
    assert unknown.status_code == 404, unknown.text


async def test_roles_and_tenants_on_training(gateway: Any, make_tenant: MakeTenant) -> None:
    acme, brandb = await make_tenant("acme"), await make_tenant("brandb")
    client = gateway.client
    theirs = await _submit(gateway, brandb.integrator, {**JOB, "adapter_name": "brandb-secret"})
    jid = theirs["job_id"]

    calls: list[tuple[str, str, Any]] = [
        ("POST", JOBS, JOB),
        ("GET", JOBS, None),
        ("GET", f"{JOBS}/{jid}", None),
        ("POST", f"{JOBS}/{jid}/cancel", None),
        ("POST", f"{JOBS}/{jid}/retry", None),
        ("GET", f"{JOBS}/{jid}/logs", None),
        ("GET", "/v1/adapters", None),
        ("GET", "/v1/adapters/brandb-secret/versions/v1", None),
    ]
    for secret in (acme.rater, acme.service):
        for method, path, body in calls:
            response = await client.request(method, path, json=body, headers=gateway.auth(secret))
            assert response.status_code == 403, (method, path, response.text)
    for method, path, body in calls:
        response = await client.request(method, path, json=body)
        assert response.status_code == 401, (method, path, response.text)

    # Another tenant's job is 404 everywhere, exactly like one that does not exist.
    integrator = gateway.auth(acme.integrator)
    for method, path in (
        ("GET", f"{JOBS}/{jid}"),
        ("POST", f"{JOBS}/{jid}/cancel"),
        ("POST", f"{JOBS}/{jid}/retry"),
        ("GET", f"{JOBS}/{jid}/logs"),
        ("GET", f"{JOBS}/{jid}/logs?follow=true"),
    ):
        response = await client.request(method, path, headers=integrator)
        assert response.status_code == 404, (method, path, response.text)
        assert brandb.tenant_id not in response.text
        assert "brandb-secret" not in response.text
    assert (await client.get(JOBS, headers=integrator)).json()["items"] == []
    still = await client.get(f"{JOBS}/{jid}", headers=gateway.auth(brandb.integrator))
    assert still.json()["state"] == "queued"

    # An admin key manages its own tenant's training.
    admin = gateway.auth(gateway.admin_secret)
    mine = await client.post(JOBS, json=JOB, headers=admin)
    assert mine.status_code == 201, mine.text
    assert mine.json()["tenant_id"] == "platform"
    assert [j["job_id"] for j in (await client.get(JOBS, headers=admin)).json()["items"]] == [
        mine.json()["job_id"]
    ]


async def test_no_trainer_behind_the_gateway_is_503(
    gateway: Any, make_tenant: MakeTenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    acme = await make_tenant("acme")
    monkeypatch.delitem(gateway.state.upstreams.stubs, "trainer")
    response = await gateway.client.get(JOBS, headers=gateway.auth(acme.integrator))
    assert response.status_code == 503, response.text
    assert response.json()["type"] == "urn:flywheel:problem:service-unavailable"
