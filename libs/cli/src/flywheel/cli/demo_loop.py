"""The loop as far as it turns today, driven the way a frontend team would drive it.

A tenant and an integrator key are made on the feedback service; generations and feedback
(ratings of a good and a bad budget split per prompt, and some A/B preferences) go through
the gateway's REST API; the dataset service consumes the events, its trigger policy builds a
preference snapshot and requests DPO training on it; the trainer runs the job and publishes
a LoRA adapter; the inference service hot-loads it, an alias splits traffic between the
base model and the new adapter, answers are served through the gateway's OpenAI API with
the generation id and adapter version that served each, a rater's thumbs-down lands on
one of them, and the adapter is promoted. The demo follows each step and prints it.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
import uuid
from typing import Any

import grpc

from flywheel.contracts.common.v1 import common_pb2 as cm
from flywheel.contracts.dataset.v1 import resources_pb2 as ds
from flywheel.contracts.dataset.v1 import service_pb2 as dsapi
from flywheel.contracts.dataset.v1.service_pb2_grpc import DatasetServiceStub
from flywheel.contracts.feedback.v1 import resources_pb2 as fb
from flywheel.contracts.feedback.v1 import service_pb2 as fbapi
from flywheel.contracts.feedback.v1.service_pb2_grpc import FeedbackServiceStub
from flywheel.contracts.inference.v1 import resources_pb2 as ir
from flywheel.contracts.inference.v1 import service_pb2 as iapi
from flywheel.contracts.inference.v1.service_pb2_grpc import InferenceServiceStub
from flywheel.contracts.trainer.v1 import resources_pb2 as tr
from flywheel.contracts.trainer.v1 import service_pb2 as trapi
from flywheel.contracts.trainer.v1.service_pb2_grpc import TrainerServiceStub

# What `flywheel demo` sets for the dataset service, so a few dozen examples trigger it.
DEMO_POLICY = {
    "FLYWHEEL_POLICY_MIN_NEW_EXAMPLES": "20",
    "FLYWHEEL_POLICY_MIN_PREFERENCE_PAIRS": "5",
    "FLYWHEEL_POLICY_COOLDOWN_S": "0",
}
USERS = ("ana", "ben", "chloe", "dev", "eli", "fay", "gus", "hana", "ivo", "jin", "kai", "lea")
RETAILERS = ("search", "display", "social", "retail media", "video", "audio")


def _post(base: str, path: str, key: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return dict(json.loads(response.read()))


def _examples() -> list[tuple[str, str, str]]:
    """(prompt, good answer, bad answer) for budgeting tasks."""
    out = []
    for i, (a, b) in enumerate(zip(RETAILERS, RETAILERS[1:] + RETAILERS[:1], strict=True)):
        budget = 10_000 * (i + 1)
        prompt = f"Split a ${budget:,} budget across {a} and {b}; {a} returns 4x, {b} 2x."
        good = f"Put 70% (${budget * 0.7:,.0f}) on {a} and 30% (${budget * 0.3:,.0f}) on {b}."
        bad = f"Put everything on {b}, it feels right."
        out.append((prompt, good, bad))
    return out


async def run_loop(
    gateway: str,
    feedback: str,
    dataset: str,
    trainer: str,
    inference: str,
    timeout_s: float = 90,
) -> bool:
    """Drive one turn of the loop; print what happened; whether it worked."""
    tenant = f"demo-{uuid.uuid4().hex[:8]}"
    async with grpc.aio.insecure_channel(feedback) as channel:
        stub = FeedbackServiceStub(channel)
        await stub.CreateTenant(fbapi.CreateTenantRequest(tenant_id=tenant, display_name="Demo"))
        key = (
            await stub.CreateApiKey(
                fbapi.CreateApiKeyRequest(tenant_id=tenant, role=fb.ROLE_INTEGRATOR, name="demo")
            )
        ).secret
    print(f"demo: tenant {tenant}; posting generations and feedback through the gateway")
    posted = 0
    for prompt, good, bad in _examples():
        ids = []
        for output in (good, bad):
            body = {"task": "budgeting", "prompt": prompt, "output": output, "model": "demo"}
            ids.append(
                (await asyncio.to_thread(_post, gateway, "/v1/generations", key, body))[
                    "generation_id"
                ]
            )
        feedback_bodies: list[dict[str, Any]] = [
            {"generation_id": ids[0], "rating": 5},
            {"generation_id": ids[1], "rating": 1},
            {"generation_id": ids[0], "thumbs": "up"},
            {"generation_id": ids[0], "preference": {"generation_b_id": ids[1], "choice": "a"}},
        ]
        for body in feedback_bodies:
            await asyncio.to_thread(_post, gateway, "/v1/feedback", key, body)
            posted += 1
    print(f"demo: {posted} feedback recorded; waiting for the dataset service's policy")
    snapshot = await _policy_snapshot(dataset, tenant, timeout_s)
    if snapshot is None:
        print("demo: no snapshot was built by the trigger policy in time")
        return False
    stats = snapshot.stats
    print(
        f"demo: snapshot {snapshot.snapshot_id[:19]}… ({ds.DatasetKind.Name(snapshot.spec.kind)}"
        f"): {stats.train_rows} train + {stats.eval_rows} eval rows, {stats.tokens} tokens, "
        f"dropped {dict(snapshot.quality.dropped_by_reason) or 'nothing'}"
    )
    print("demo: training.requested published with it; waiting for the trainer's job")
    job = await _training_job(trainer, tenant, timeout_s=max(timeout_s, 300))
    if job is None or job.state != tr.JOB_STATE_SUCCEEDED:
        reason = job.state_reason if job is not None else "no job finished in time"
        print(f"demo: training did not succeed: {reason}")
        return False
    p = job.progress
    print(
        f"demo: job {job.job_id[:8]} ({tr.TrainingMethod.Name(job.spec.method)}) succeeded: "
        f"{p.step} steps, loss {p.loss:.4f}, {p.tokens_per_second:.0f} tokens/s"
    )
    print(f"demo: adapter {job.adapter.name} {job.adapter.version} published (adapter.published)")
    return await _serve(gateway, inference, tenant, key, job.adapter, timeout_s)


async def _serve(
    gateway: str, inference: str, tenant: str, key: str, adapter: cm.AdapterRef, timeout_s: float
) -> bool:
    """Hot-load -> A/B alias -> answers through the gateway -> feedback -> promotion."""
    model = f"{adapter.name}@{adapter.version}"
    deadline = asyncio.get_running_loop().time() + timeout_s
    while model not in await asyncio.to_thread(_model_ids, gateway, key):
        if asyncio.get_running_loop().time() > deadline:
            print(f"demo: the inference service did not make {model} routable in time")
            return False
        await asyncio.sleep(0.5)
    print(f"demo: inference hot-loaded {model}; it is routable (GET /v1/models)")
    async with grpc.aio.insecure_channel(inference) as channel:
        stub = InferenceServiceStub(channel)
        arms = [
            ir.TrafficArm(label="control", weight=1.0),
            ir.TrafficArm(label="candidate", weight=1.0,
                          adapters=[cm.WeightedAdapter(adapter=adapter, weight=1.0)]),
        ]  # fmt: skip
        await stub.SetSplit(
            iapi.SetSplitRequest(tenant_id=tenant, alias="budgeting", arms=arms, sticky=True)
        )
        print(f"demo: alias {tenant}/budgeting splits users 50/50: base model vs {model}")
        served: list[tuple[dict[str, Any], str]] = []
        # Users until both arms have answered (sticky hashing spreads them 50/50).
        for user in USERS:
            if len(served) >= 4 and len({b["traffic_arm"] for b, _ in served}) == 2:
                break
            body = {
                "model": f"{tenant}/budgeting",
                "messages": [{"role": "user", "content": _examples()[0][0]}],
                "max_tokens": 24, "temperature": 0, "user": user,
            }  # fmt: skip
            answer = await asyncio.to_thread(_post, gateway, "/v1/chat/completions", key, body)
            by = answer["served_by"]
            text = answer["choices"][0]["message"]["content"]
            print(f"demo:   {user}: arm {by['traffic_arm']:<9} -> {text[:48]!r}")
            served.append((by, answer["choices"][0]["generation_id"]))
        by, generation_id = next(((b, g) for b, g in served if b["adapter"]), served[0])
        await _rate(gateway, key, {"generation_id": generation_id, "thumbs": "down"}, timeout_s)
        version = f"{by['adapter']['name']}@{by['adapter']['version']}" if by["adapter"] else "base"
        print(f"demo: a rater's thumbs-down on generation {generation_id[:8]} lands on {version}")
        await stub.Promote(
            iapi.PromoteRequest(tenant_id=tenant, alias="budgeting", adapter=adapter,
                                reason="demo: promote the new adapter")
        )  # fmt: skip
    print(f"demo: {model} promoted: {tenant}/budgeting now routes all traffic to it")
    return True


async def _rate(gateway: str, key: str, body: dict[str, Any], timeout_s: float) -> None:
    """Post feedback on a served generation, waiting for its log to reach the feedback
    service (the inference service logs asynchronously, so serving never waits on it)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            await asyncio.to_thread(_post, gateway, "/v1/feedback", key, body)
            return
        except urllib.error.HTTPError as error:
            if error.code != 404 or asyncio.get_running_loop().time() > deadline:
                raise
        await asyncio.sleep(0.2)


def _model_ids(gateway: str, key: str) -> list[str]:
    request = urllib.request.Request(
        gateway + "/v1/models", headers={"Authorization": f"Bearer {key}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return [str(m["id"]) for m in json.loads(response.read())["data"]]


async def _training_job(trainer: str, tenant: str, timeout_s: float) -> tr.Job | None:
    """The tenant's first training job once it has finished."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    finished = (tr.JOB_STATE_SUCCEEDED, tr.JOB_STATE_FAILED, tr.JOB_STATE_CANCELLED)
    async with grpc.aio.insecure_channel(trainer) as channel:
        stub = TrainerServiceStub(channel)
        while asyncio.get_running_loop().time() < deadline:
            jobs: list[tr.Job] = list(
                (await stub.ListJobs(trapi.ListJobsRequest(tenant_id=tenant))).jobs
            )
            if jobs and jobs[-1].state in finished:
                return jobs[-1]
            await asyncio.sleep(1.0)
    return None


async def _policy_snapshot(dataset: str, tenant: str, timeout_s: float) -> ds.Snapshot | None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with grpc.aio.insecure_channel(dataset) as channel:
        stub = DatasetServiceStub(channel)
        while asyncio.get_running_loop().time() < deadline:
            listed = await stub.ListSnapshots(dsapi.ListSnapshotsRequest(tenant_id=tenant))
            found: list[ds.Snapshot] = [
                s for s in listed.snapshots if s.trigger == ds.SNAPSHOT_TRIGGER_POLICY
            ]
            if found:
                return found[0]
            await asyncio.sleep(0.5)
    return None
