"""Datasets through REST -> gRPC -> the real dataset service, fed by the real feedback
service's events, and back."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from flywheel.gateway.config import GatewaySettings

MakeTenant = Callable[..., Awaitable[Any]]

TASK = "budgeting"
PROMPT_1 = "Split 1000 EUR across retailers A and B."
PROMPT_2 = "Split 200 EUR across retailers C and D."
PROMPT_3 = "Split 50 EUR across retailers E and F."
# Every row in train: the split is by prompt hash, and three prompts could all land in eval.
SFT_SPEC = {"task": TASK, "kind": "sft", "eval_fraction": 0.0}
PREFERENCE_SPEC = {"task": TASK, "kind": "preference", "eval_fraction": 0.0}


@pytest.fixture
def gateway_settings(gateway_settings: GatewaySettings, dataset_target: str) -> GatewaySettings:
    gateway_settings.upstreams["dataset"] = dataset_target
    return gateway_settings


async def _preview(gateway: Any, secret: str, spec: dict[str, Any], size: int = 0) -> Any:
    response = await gateway.client.post(
        "/v1/datasets/snapshots/preview",
        json={"spec": spec, "sample_size": size},
        headers=gateway.auth(secret),
    )
    assert response.status_code == 200, response.text
    return response.json()


async def _rows(gateway: Any, secret: str, spec: dict[str, Any]) -> int:
    stats = (await _preview(gateway, secret, spec))["stats"]
    rows: int = stats["train_rows"] + stats["eval_rows"]
    return rows


async def _wait_for_rows(
    gateway: Any, secret: str, wanted: list[tuple[dict[str, Any], int]], timeout_s: float = 20.0
) -> None:
    """Poll previews until the dataset service's consumer has applied the feedback."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        counts = [await _rows(gateway, secret, spec) for spec, _ in wanted]
        if all(count >= rows for count, (_, rows) in zip(counts, wanted, strict=True)):
            return
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"the dataset service has {counts} rows, wanted {wanted}")
        await asyncio.sleep(0.2)


async def _seed(gateway: Any, tenant: Any) -> dict[str, str]:
    """Generations and feedback of each usable kind, through REST; their ids by name."""
    log = gateway.log_generation
    good = await log(tenant.integrator, prompt=PROMPT_1, output="A: 600, B: 400")
    bad = await log(tenant.integrator, prompt=PROMPT_1, output="A: 1000, B: 0")
    liked = await log(tenant.integrator, prompt=PROMPT_2, output="C: 100, D: 100")
    fair = await log(tenant.integrator, prompt=PROMPT_3, output="E: 25, F: 25")
    rater = tenant.rater
    await gateway.feedback(rater, generation_id=good["generation_id"], rating=5)
    await gateway.feedback(rater, generation_id=bad["generation_id"], rating=1)
    await gateway.feedback(rater, generation_id=liked["generation_id"], thumbs="up")
    await gateway.feedback(rater, generation_id=fair["generation_id"], rating=4)
    await gateway.feedback(
        rater,
        generation_id=good["generation_id"],
        preference={"generation_b_id": bad["generation_id"], "choice": "a"},
    )
    # SFT: good (5), liked (up), fair (4); preference: good over bad.
    await _wait_for_rows(gateway, tenant.integrator, [(SFT_SPEC, 3), (PREFERENCE_SPEC, 1)])
    return {
        name: generation["generation_id"]
        for name, generation in (("good", good), ("bad", bad), ("liked", liked), ("fair", fair))
    }


async def _build(gateway: Any, secret: str, spec: dict[str, Any], status: int = 201) -> Any:
    response = await gateway.client.post(
        "/v1/datasets/snapshots", json={"spec": spec}, headers=gateway.auth(secret)
    )
    assert response.status_code == status, response.text
    return response.json()


async def test_snapshots_build_read_list_and_download(
    gateway: Any, make_tenant: MakeTenant
) -> None:
    acme = await make_tenant("acme")
    await _seed(gateway, acme)
    client, integrator = gateway.client, gateway.auth(acme.integrator)

    preview = await _preview(gateway, acme.integrator, SFT_SPEC, size=2)
    assert preview["stats"]["train_rows"] == 3
    assert len(preview["sample_rows"]) == 2
    assert {"prompt", "completion"} <= set(preview["sample_rows"][0])

    sft = await _build(gateway, acme.integrator, SFT_SPEC)
    sid = sft["snapshot_id"]
    assert sid.startswith("sha256:")
    assert sft["tenant_id"] == acme.tenant_id
    assert sft["trigger"] == "manual"
    assert sft["spec"]["kind"] == "sft"
    assert sft["spec"]["task"] == TASK
    assert sft["spec"]["sft_min_rating"] == 4  # resolved from the service's defaults
    assert sft["spec"]["cutoff"] is not None
    assert sft["stats"]["train_rows"] == 3
    assert sft["stats"]["rows_by_task"] == {TASK: 3}
    assert sft["source_event_count"] >= 3
    assert sft["previous_snapshot_id"] is None
    assert sft["lineage"]["sha256"]
    assert "uri" not in sft["lineage"]
    assert "file://" not in json.dumps(sft)
    train = next(f for f in sft["files"] if f["split"] == "train")
    assert train == {
        "split": "train",
        "format": "trl_jsonl",
        "rows": 3,
        "sha256": train["sha256"],
        "size_bytes": train["size_bytes"],
    }

    # The same data again: the same snapshot, not a new one.
    again = await _build(gateway, acme.integrator, SFT_SPEC, status=200)
    assert again["snapshot_id"] == sid
    assert again == sft

    preference = await _build(gateway, acme.integrator, PREFERENCE_SPEC)
    assert preference["snapshot_id"] != sid
    assert preference["stats"]["train_rows"] == 1
    formats = {(f["split"], f["format"]) for f in preference["files"]}
    assert ("train", "openai_preference_jsonl") in formats
    rebuilt = await _build(gateway, acme.integrator, PREFERENCE_SPEC, status=200)
    assert rebuilt["snapshot_id"] == preference["snapshot_id"]

    got = await client.get(f"/v1/datasets/snapshots/{sid}", headers=integrator)
    assert got.status_code == 200, got.text
    assert got.json() == sft

    listed = await client.get("/v1/datasets/snapshots", headers=integrator)
    assert listed.status_code == 200, listed.text
    ids = {s["snapshot_id"] for s in listed.json()["items"]}
    assert ids == {sid, preference["snapshot_id"]}
    by_kind = await client.get(
        "/v1/datasets/snapshots", params={"kind": "preference", "task": TASK}, headers=integrator
    )
    assert [s["snapshot_id"] for s in by_kind.json()["items"]] == [preference["snapshot_id"]]
    first = await client.get("/v1/datasets/snapshots", params={"limit": 1}, headers=integrator)
    cursor = first.json()["next_cursor"]
    assert cursor
    second = await client.get(
        "/v1/datasets/snapshots", params={"limit": 1, "cursor": cursor}, headers=integrator
    )
    assert second.json()["next_cursor"] is None
    paged = [s["snapshot_id"] for r in (first, second) for s in r.json()["items"]]
    assert set(paged) == ids

    file = await client.get(f"/v1/datasets/snapshots/{sid}/files/train", headers=integrator)
    assert file.status_code == 200, file.text
    assert file.headers["content-type"].startswith("application/x-ndjson")
    assert file.headers["x-content-sha256"] == hashlib.sha256(file.content).hexdigest()
    assert file.headers["x-content-sha256"] == train["sha256"]
    lines = [json.loads(line) for line in file.text.splitlines()]
    assert int(file.headers["x-row-count"]) == len(lines) == 3
    assert all(set(line) == {"prompt", "completion"} for line in lines)
    assert {line["completion"] for line in lines} == {
        "A: 600, B: 400",
        "C: 100, D: 100",
        "E: 25, F: 25",
    }

    pairs = await client.get(
        f"/v1/datasets/snapshots/{preference['snapshot_id']}/files/train",
        params={"format": "openai_preference_jsonl"},
        headers=integrator,
    )
    assert pairs.status_code == 200, pairs.text
    assert pairs.headers["x-content-sha256"] == hashlib.sha256(pairs.content).hexdigest()
    (pair,) = [json.loads(line) for line in pairs.text.splitlines()]
    assert pair["preferred_output"] == [{"role": "assistant", "content": "A: 600, B: 400"}]

    no_such_format = await client.get(
        f"/v1/datasets/snapshots/{sid}/files/train",
        params={"format": "openai_preference_jsonl"},
        headers=integrator,
    )
    assert no_such_format.status_code == 422
    assert [e["field"] for e in no_such_format.json()["errors"]] == ["format"]


async def test_snapshots_are_the_tenants_own(gateway: Any, make_tenant: MakeTenant) -> None:
    acme = await make_tenant("acme")
    brandb = await make_tenant("brandb")
    await _seed(gateway, acme)
    sid = (await _build(gateway, acme.integrator, SFT_SPEC))["snapshot_id"]
    client, other = gateway.client, gateway.auth(brandb.integrator)

    for path in (
        f"/v1/datasets/snapshots/{sid}",
        f"/v1/datasets/snapshots/{sid}/files/train",
        f"/v1/datasets/snapshots/{sid}/diff?base={sid}",
    ):
        response = await client.get(path, headers=other)
        assert response.status_code == 404, (path, response.text)
        assert response.headers["content-type"] == "application/problem+json"
    listed = await client.get("/v1/datasets/snapshots", headers=other)
    assert listed.json()["items"] == []
    # Nothing of brandb's to build from: acme's feedback is not seen.
    empty = await client.post("/v1/datasets/snapshots", json={"spec": SFT_SPEC}, headers=other)
    assert empty.status_code == 409, empty.text
    assert empty.json()["type"] == "urn:flywheel:problem:conflict"
    training = await client.post(
        "/v1/datasets/training-requests",
        json={"snapshot_id": sid, "training": {"base_model": "m", "adapter_name": "a"}},
        headers=other,
    )
    assert training.status_code == 404, training.text


async def test_roles_allowed_on_datasets(gateway: Any, make_tenant: MakeTenant) -> None:
    acme = await make_tenant("acme")
    client = gateway.client
    for secret in (acme.rater, acme.service):
        denied = await client.get("/v1/datasets/snapshots", headers=gateway.auth(secret))
        assert denied.status_code == 403, denied.text
        policy = await client.get(f"/v1/datasets/policies/{TASK}", headers=gateway.auth(secret))
        assert policy.status_code == 403
    # An admin key reads its own tenant's datasets.
    admin = await client.get("/v1/datasets/snapshots", headers=gateway.auth(gateway.admin_secret))
    assert admin.status_code == 200, admin.text
    assert admin.json()["items"] == []
    assert (await client.get("/v1/datasets/snapshots")).status_code == 401


async def test_invalid_requests_name_the_rest_field(gateway: Any, make_tenant: MakeTenant) -> None:
    acme = await make_tenant("acme")
    client, integrator = gateway.client, gateway.auth(acme.integrator)

    async def fields(method: str, path: str, **kwargs: Any) -> list[str]:
        response = await client.request(method, path, headers=integrator, **kwargs)
        assert response.status_code == 422, response.text
        assert response.headers["content-type"] == "application/problem+json"
        return [e["field"] for e in response.json()["errors"]]

    build = "/v1/datasets/snapshots"
    # The tenant is the key's, never the body's.
    assert await fields("POST", build, json={"spec": SFT_SPEC, "tenant_id": "other"}) == [
        "tenant_id"
    ]
    assert await fields("POST", build, json={"spec": {**SFT_SPEC, "tenant_id": "x"}}) == [
        "spec.tenant_id"
    ]
    for name, value in (
        ("min_rating_chosen", 6),
        ("sft_min_rating", 0),
        ("eval_fraction", 1.0),
        ("near_duplicate_threshold", 0),
        ("human_weight", 1001),
        ("max_prompt_tokens", 0),
        ("kind", "pairs"),
        ("conflict_rule", "loudest"),
        ("cutoff", "yesterday"),
    ):
        spec = {**SFT_SPEC, name: value}
        assert await fields("POST", build, json={"spec": spec}) == [f"spec.{name}"], name
    # Within REST's bounds, refused by the service against its defaults: still REST paths.
    crossed = {**SFT_SPEC, "min_rating_chosen": 3, "max_rating_rejected": 4}
    assert await fields("POST", build, json={"spec": crossed}) == ["spec.max_rating_rejected"]
    training = {"base_model": "tiny-llama", "adapter_name": "acme-budgeting"}
    assert await fields(
        "POST",
        "/v1/datasets/training-requests",
        json={"snapshot_spec": crossed, "training": training},
    ) == ["snapshot_spec.max_rating_rejected"]
    assert await fields("POST", "/v1/datasets/training-requests", json={"training": training}) == [
        "snapshot_id",
        "snapshot_spec",
    ]
    # What the trainer would refuse (names become folders) is refused here already.
    for bad, field in (
        ({"adapter_name": "acme/evil"}, "training.adapter_name"),
        ({"lora": {"r": 2048}}, "training.lora.r"),
        ({"lora": {"alpha": -1}}, "training.lora.alpha"),
    ):
        assert await fields(
            "POST",
            "/v1/datasets/training-requests",
            json={"snapshot_id": "sha256:" + "0" * 64, "training": {**training, **bad}},
        ) == [field], bad
    assert await fields(
        "POST",
        "/v1/datasets/snapshots/preview",
        json={"spec": SFT_SPEC, "sample_size": 101},
    ) == ["sample_size"]
    assert await fields("GET", "/v1/datasets/snapshots/sha256:nothex") == ["snapshot_id"]
    assert await fields("GET", "/v1/datasets/snapshots", params={"kind": "pairs"}) == ["kind"]
    assert await fields("GET", "/v1/datasets/snapshots", params={"cursor": "garbage!"}) == [
        "cursor"
    ]
    sid = "sha256:" + "0" * 64
    assert await fields("GET", f"/v1/datasets/snapshots/{sid}/files/test") == ["split"]
    assert await fields("GET", f"/v1/datasets/snapshots/{sid}/diff") == ["base"]
    assert await fields(
        "PUT", f"/v1/datasets/policies/{TASK}", json={"enabled": True, "min_new_examples": 0}
    ) == ["min_new_examples"]
    assert sorted(
        await fields(
            "PUT",
            f"/v1/datasets/policies/{TASK}",
            json={"enabled": True, "min_new_examples": 5, "tenant_id": "x", "cooldown_s": -1},
        )
    ) == ["cooldown_s", "tenant_id"]
    missing = await client.get(f"/v1/datasets/snapshots/{sid}", headers=integrator)
    assert missing.status_code == 404


async def test_diff_between_two_snapshots(gateway: Any, make_tenant: MakeTenant) -> None:
    acme = await make_tenant("acme")
    await _seed(gateway, acme)
    client, integrator = gateway.client, gateway.auth(acme.integrator)
    broad = await _build(gateway, acme.integrator, SFT_SPEC)
    strict = await _build(gateway, acme.integrator, {**SFT_SPEC, "sft_min_rating": 5})
    assert strict["stats"]["train_rows"] == 2  # the rating of 4 no longer counts
    # Same task and kind: the second points back at the first.
    assert strict["previous_snapshot_id"] == broad["snapshot_id"]

    diff = await client.get(
        f"/v1/datasets/snapshots/{broad['snapshot_id']}/diff",
        params={"base": strict["snapshot_id"], "sample_size": 5},
        headers=integrator,
    )
    assert diff.status_code == 200, diff.text
    body = diff.json()
    assert body["base_snapshot_id"] == strict["snapshot_id"]
    assert body["target_snapshot_id"] == broad["snapshot_id"]
    assert (body["rows_added"], body["rows_removed"], body["rows_unchanged"]) == (1, 0, 2)
    assert body["added_sample"] == [{"prompt": PROMPT_3, "completion": "E: 25, F: 25"}]
    assert body["removed_sample"] == []
    assert body["target_stats"]["train_rows"] == 3


async def test_training_request_on_a_snapshot_or_a_spec(
    gateway: Any, make_tenant: MakeTenant
) -> None:
    acme = await make_tenant("acme")
    await _seed(gateway, acme)
    client, integrator = gateway.client, gateway.auth(acme.integrator)
    sid = (await _build(gateway, acme.integrator, SFT_SPEC))["snapshot_id"]
    training = {
        "method": "sft",
        "base_model": "tiny-llama",
        "adapter_name": "acme-budgeting",
        "adapter_type": "task",
        "parent_adapter": {"name": "acme-base", "version": "v3"},
        "qlora": True,
        "hyperparameters": {"learning_rate": 0.0002, "num_train_epochs": 2},
        "seed": 7,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
    }
    response = await client.post(
        "/v1/datasets/training-requests",
        json={"snapshot_id": sid, "training": training, "priority": 3, "reason": "new data"},
        headers=integrator,
    )
    assert response.status_code == 201, response.text
    made = response.json()
    assert made["tenant_id"] == acme.tenant_id
    assert made["training_request_id"]
    assert made["priority"] == 3
    assert made["reason"] == "new data"
    spec = made["training"]
    assert spec["method"] == "sft"
    assert spec["snapshot_id"] == sid
    assert spec["task"] == TASK
    assert spec["parent_adapter"] == {"name": "acme-base", "version": "v3"}
    assert spec["qlora"] is True
    assert spec["seed"] == 7
    assert spec["hyperparameters"] == {"learning_rate": 0.0002, "num_train_epochs": 2}
    assert spec["lora"] == {
        "r": 8,
        "alpha": 16.0,
        "dropout": pytest.approx(0.05),
        "target_modules": ["q_proj", "v_proj"],
        "use_rslora": None,
    }

    # No snapshot named: one is built from the spec, and the method follows its kind.
    built = await client.post(
        "/v1/datasets/training-requests",
        json={
            "snapshot_spec": PREFERENCE_SPEC,
            "training": {"base_model": "tiny-llama", "adapter_name": "acme-budgeting-dpo"},
        },
        headers=integrator,
    )
    assert built.status_code == 201, built.text
    assert built.json()["training"]["method"] == "dpo"
    assert built.json()["reason"] == "manual"
    new_id = built.json()["training"]["snapshot_id"]
    snapshot = await client.get(f"/v1/datasets/snapshots/{new_id}", headers=integrator)
    assert snapshot.json()["trigger"] == "training_request"

    # A retry with the same Idempotency-Key replays the request instead of making another.
    retry_body = {"snapshot_id": sid, "training": training, "reason": "retried"}
    keyed = {**integrator, "Idempotency-Key": "train-once"}
    first = await client.post("/v1/datasets/training-requests", json=retry_body, headers=keyed)
    retry = await client.post("/v1/datasets/training-requests", json=retry_body, headers=keyed)
    assert first.status_code == retry.status_code == 201, retry.text
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.json()["training_request_id"] == first.json()["training_request_id"]

    wrong = await client.post(
        "/v1/datasets/training-requests",
        json={"snapshot_id": sid, "training": {**training, "method": "kto"}},
        headers=integrator,
    )
    assert wrong.status_code == 422, wrong.text
    assert [e["field"] for e in wrong.json()["errors"]] == ["training.method"]


async def test_trigger_policy_defaults_then_round_trip(
    gateway: Any, make_tenant: MakeTenant
) -> None:
    acme = await make_tenant("acme")
    client, integrator = gateway.client, gateway.auth(acme.integrator)
    path = f"/v1/datasets/policies/{TASK}"

    defaults = await client.get(path, headers=integrator)
    assert defaults.status_code == 200, defaults.text
    policy = defaults.json()
    assert policy["tenant_id"] == acme.tenant_id
    assert policy["task"] == TASK
    assert policy["enabled"] is False  # FLYWHEEL_POLICY_ENABLED=false in these tests
    assert policy["min_new_examples"] == 50
    assert policy["max_interval_s"] is None
    assert policy["cooldown_s"] == 600
    assert policy["min_preference_pairs"] == 20

    update = {
        "enabled": True,
        "min_new_examples": 100,
        "max_interval_s": 86_400,
        "cooldown_s": 3_600,
        "min_preference_pairs": 10,
        "base_model": "tiny-llama",
        "snapshot_defaults": {"min_rating_chosen": 5, "human_only": True},
        "hyperparameters": {"beta": 0.1},
    }
    put = await client.put(path, json=update, headers=integrator)
    assert put.status_code == 200, put.text
    got = await client.get(path, headers=integrator)
    assert got.status_code == 200
    assert got.json() == put.json()
    stored = got.json()
    assert stored["tenant_id"] == acme.tenant_id
    assert {k: stored[k] for k in update if k != "snapshot_defaults"} == {
        k: v for k, v in update.items() if k != "snapshot_defaults"
    }
    assert stored["snapshot_defaults"]["min_rating_chosen"] == 5
    assert stored["snapshot_defaults"]["human_only"] is True
    assert stored["snapshot_defaults"]["max_rating_rejected"] is None

    # Another task keeps the defaults; another tenant never sees this one.
    other_task = await client.get("/v1/datasets/policies/creative", headers=integrator)
    assert other_task.json()["min_new_examples"] == 50
    brandb = await make_tenant("brandb")
    theirs = await client.get(path, headers=gateway.auth(brandb.integrator))
    assert theirs.json()["min_new_examples"] == 50
    assert theirs.json()["tenant_id"] == brandb.tenant_id
