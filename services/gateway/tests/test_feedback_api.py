"""Feedback and generations through REST -> gRPC -> the real feedback service, and back."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import REGISTRY

MakeTenant = Callable[..., Awaitable[Any]]

# (first value, edited value) of each kind but preference, which needs two generations.
SIMPLE_KINDS = [
    ("thumbs", "down", "up"),
    ("rating", 4, 2),
    ("comment", "Forgets retailer B's minimum spend.", "Fine after all."),
    ("correction", "A: 500, B: 500", "A: 550, B: 450"),
]


async def _round_trip(
    gateway: Any, tenant: Any, kind: str, body: dict[str, Any], edited: dict[str, Any]
) -> None:
    client, rater = gateway.client, gateway.auth(tenant.rater)
    created = await client.post("/v1/feedback", json=body, headers=rater)
    assert created.status_code == 201, created.text
    feedback = created.json()
    fid = feedback["feedback_id"]
    assert feedback["kind"] == kind
    assert feedback["source"] == "human"
    assert feedback["revision"] == 1
    assert feedback["tenant_id"] == tenant.tenant_id
    assert feedback["task"] == "budgeting"
    assert feedback["adapter"] == {"name": "acme-budgeting", "version": "v1"}
    assert created.headers["location"] == f"/v1/feedback/{fid}"
    assert created.headers["etag"] == '"1"'
    for other in ("thumbs", "rating", "comment", "preference", "correction"):
        if other != kind:
            assert feedback[other] is None

    got = await client.get(f"/v1/feedback/{fid}", headers=rater)
    assert got.status_code == 200
    assert got.json() == feedback

    listed = await client.get("/v1/feedback", params={"kind": kind}, headers=rater)
    assert [f["feedback_id"] for f in listed.json()["items"]] == [fid]

    patched = await client.patch(
        f"/v1/feedback/{fid}", json={**edited, "reason": "changed my mind"},
        headers={**rater, "If-Match": '"1"'},
    )  # fmt: skip
    assert patched.status_code == 200, patched.text
    assert patched.json()["revision"] == 2
    assert patched.headers["etag"] == '"2"'
    assert {k: patched.json()[k] for k in edited} == edited

    stale = await client.patch(
        f"/v1/feedback/{fid}", json=edited, headers={**rater, "If-Match": '"1"'}
    )
    assert stale.status_code == 409
    assert stale.headers["content-type"] == "application/problem+json"

    retracted = await client.post(
        f"/v1/feedback/{fid}/retract", json={"reason": "duplicate"}, headers=rater
    )
    assert retracted.status_code == 200, retracted.text
    assert retracted.json()["retracted_at"] is not None
    assert (await client.post(f"/v1/feedback/{fid}/retract", headers=rater)).status_code == 200
    edit_retracted = await client.patch(f"/v1/feedback/{fid}", json=edited, headers=rater)
    assert edit_retracted.status_code == 409

    hidden = await client.get("/v1/feedback", params={"kind": kind}, headers=rater)
    assert hidden.json()["items"] == []
    shown = await client.get(
        "/v1/feedback", params={"kind": kind, "include_retracted": "true"}, headers=rater
    )
    assert [f["feedback_id"] for f in shown.json()["items"]] == [fid]

    export = await client.get(
        "/v1/feedback/export", params={"include_retracted": "true", "kind": kind}, headers=rater
    )
    assert export.status_code == 200
    assert export.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in export.text.splitlines()]
    assert [line["feedback_id"] for line in lines] == [fid]
    assert lines[0]["kind"] == kind
    assert lines[0]["generation"]["generation_id"] == body["generation_id"]


@pytest.mark.parametrize(("kind", "value", "edited"), SIMPLE_KINDS)
async def test_each_simple_kind_round_trips(
    gateway: Any, make_tenant: MakeTenant, kind: str, value: Any, edited: Any
) -> None:
    acme = await make_tenant("acme")
    generation = await gateway.log_generation(acme.integrator)
    body = {"generation_id": generation["generation_id"], kind: value}
    await _round_trip(gateway, acme, kind, body, {kind: edited})


async def test_preference_round_trips(gateway: Any, make_tenant: MakeTenant) -> None:
    acme = await make_tenant("acme")
    a = await gateway.log_generation(acme.integrator)
    b = await gateway.log_generation(acme.integrator, output="A: 500, B: 500")
    assert a["prompt_hash"] == b["prompt_hash"]
    body = {
        "generation_id": a["generation_id"],
        "preference": {"generation_b_id": b["generation_id"], "choice": "b", "strength": 0.75},
    }
    edited = {"preference": {"generation_b_id": b["generation_id"], "choice": "tie"}}
    await _round_trip(
        gateway,
        acme,
        "preference",
        body,
        {"preference": {**edited["preference"], "strength": None}},
    )


async def test_preference_between_different_prompts_names_the_field(
    gateway: Any, make_tenant: MakeTenant
) -> None:
    acme = await make_tenant("acme")
    a = await gateway.log_generation(acme.integrator)
    b = await gateway.log_generation(acme.integrator, prompt="Another prompt")
    response = await gateway.client.post(
        "/v1/feedback",
        json={
            "generation_id": a["generation_id"],
            "preference": {"generation_b_id": b["generation_id"], "choice": "a"},
        },
        headers=gateway.auth(acme.rater),
    )
    assert response.status_code == 422
    assert [e["field"] for e in response.json()["errors"]] == ["preference.generation_b_id"]


async def test_client_feedback_id_replays_with_200(gateway: Any, make_tenant: MakeTenant) -> None:
    acme = await make_tenant("acme")
    generation = await gateway.log_generation(acme.integrator)
    body = {"generation_id": generation["generation_id"], "rating": 5, "client_feedback_id": "r-1"}
    first = await gateway.client.post("/v1/feedback", json=body, headers=gateway.auth(acme.rater))
    again = await gateway.client.post("/v1/feedback", json=body, headers=gateway.auth(acme.rater))
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["feedback_id"] == first.json()["feedback_id"]


async def test_synthetic_feedback_only_from_service_keys(
    gateway: Any, make_tenant: MakeTenant
) -> None:
    acme = await make_tenant("acme")
    generation = await gateway.log_generation(acme.service)
    gid = generation["generation_id"]
    synthetic = {
        "generation_id": gid,
        "rating": 2,
        "source": "synthetic:brand-voice",
        "dimension_scores": [
            {"dimension": "brand_voice", "score": 0.25, "evaluator": "crew", "rationale": "flat"}
        ],
    }
    response = await gateway.client.post(
        "/v1/feedback", json=synthetic, headers=gateway.auth(acme.service)
    )
    assert response.status_code == 201, response.text
    assert response.json()["source"] == "synthetic:brand-voice"
    assert response.json()["dimension_scores"] == synthetic["dimension_scores"]

    by_rater = await gateway.client.post(
        "/v1/feedback", json=synthetic, headers=gateway.auth(acme.rater)
    )
    assert by_rater.status_code == 403
    human_by_service = await gateway.client.post(
        "/v1/feedback", json={"generation_id": gid, "rating": 2}, headers=gateway.auth(acme.service)
    )
    assert human_by_service.status_code == 403
    assert human_by_service.headers["content-type"] == "application/problem+json"

    only_synthetic = await gateway.client.get(
        "/v1/feedback", params={"source": "synthetic"}, headers=gateway.auth(acme.rater)
    )
    assert [f["source"] for f in only_synthetic.json()["items"]] == ["synthetic:brand-voice"]
    only_human = await gateway.client.get(
        "/v1/feedback", params={"source": "human"}, headers=gateway.auth(acme.rater)
    )
    assert only_human.json()["items"] == []


async def test_stats_group_by_adapter_and_task(gateway: Any, make_tenant: MakeTenant) -> None:
    acme = await make_tenant("acme")
    v1 = await gateway.log_generation(acme.integrator)
    v2 = await gateway.log_generation(
        acme.integrator, adapter={"name": "acme-budgeting", "version": "v2"}
    )
    for gen, thumbs, rating in ((v1, "down", 2), (v1, "down", 4), (v2, "up", 5)):
        await gateway.feedback(acme.rater, generation_id=gen["generation_id"], thumbs=thumbs)
        await gateway.feedback(acme.rater, generation_id=gen["generation_id"], rating=rating)
    response = await gateway.client.get(
        "/v1/feedback/stats",
        params={"group_by": "adapter,task"},
        headers=gateway.auth(acme.integrator),
    )
    assert response.status_code == 200, response.text
    buckets = {b["adapter"]["version"]: b for b in response.json()["buckets"]}
    assert buckets["v1"]["task"] == "budgeting"
    assert buckets["v1"]["mean_rating"] == pytest.approx(3.0)
    assert buckets["v1"]["thumbs_down_rate"] == pytest.approx(1.0)
    assert buckets["v1"]["count_by_kind"] == {"thumbs": 2, "rating": 2}
    assert buckets["v2"]["thumbs_down_rate"] == pytest.approx(0.0)
    assert buckets["v2"]["source"] is None

    by_source = await gateway.client.get(
        "/v1/feedback/stats",
        params=[("group_by", "source"), ("kind", "rating")],
        headers=gateway.auth(acme.rater),
    )
    assert [b["source"] for b in by_source.json()["buckets"]] == ["human"]
    assert by_source.json()["buckets"][0]["count_by_kind"] == {"rating": 3}


async def test_generations_log_replay_batch_and_chat_prompts(
    gateway: Any, make_tenant: MakeTenant
) -> None:
    acme = await make_tenant("acme")
    client, integrator = gateway.client, gateway.auth(acme.integrator)
    chat = gateway.generation_body(
        client_generation_id="req-1",
        prompt=[
            {"role": "system", "content": "You plan budgets."},
            {"role": "user", "content": "Split 1000 EUR.", "name": "ann"},
        ],
        sampling={"temperature": 0.0, "top_p": 0.9, "max_tokens": 64, "stop": ["\n\n"]},
        composed_adapters=[{"adapter": {"name": "brand", "version": "v3"}, "weight": 0.5}],
        alias="acme/budgeting",
        traffic_arm="b",
        user_id="shopper-7",
        served_at="2026-01-02T03:04:05Z",
    )
    first = await client.post("/v1/generations", json=chat, headers=integrator)
    assert first.status_code == 201, first.text
    generation = first.json()
    assert generation["prompt"] == [
        {"role": "system", "content": "You plan budgets.", "name": None},
        {"role": "user", "content": "Split 1000 EUR.", "name": "ann"},
    ]
    assert generation["sampling"]["temperature"] == 0.0  # set, not "engine default"
    assert generation["sampling"]["top_k"] is None
    assert generation["composed_adapters"][0]["adapter"] == {"name": "brand", "version": "v3"}
    assert generation["latency_ms"] == pytest.approx(12.0)
    assert generation["metadata"] == {"page": "checkout"}
    assert len(generation["prompt_hash"]) == 64

    replay = await client.post("/v1/generations", json=chat, headers=integrator)
    assert replay.status_code == 200
    assert replay.json()["generation_id"] == generation["generation_id"]

    batch = await client.post(
        "/v1/generations/batch",
        json={
            "generations": [
                chat,
                gateway.generation_body(client_generation_id="req-2"),
                gateway.generation_body(),
            ]
        },
        headers=integrator,
    )
    assert batch.status_code == 200, batch.text
    results = batch.json()["results"]
    assert [r["created"] for r in results] == [False, True, True]
    assert results[0]["generation"]["generation_id"] == generation["generation_id"]


async def test_list_generations_filters_and_pages(gateway: Any, make_tenant: MakeTenant) -> None:
    acme = await make_tenant("acme")
    rater = gateway.auth(acme.rater)
    ids = [
        (await gateway.log_generation(acme.integrator, output=f"out {i}"))["generation_id"]
        for i in range(5)
    ]
    await gateway.log_generation(
        acme.integrator, task="creative", adapter={"name": "acme-creative", "version": "v1"}
    )
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"task": "budgeting", "limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = (await gateway.client.get("/v1/generations", params=params, headers=rater)).json()
        seen += [g["generation_id"] for g in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids)
    assert len(seen) == 5

    creative = await gateway.client.get(
        "/v1/generations",
        params={"adapter": "acme-creative", "adapter_version": "v1"},
        headers=rater,
    )
    assert [g["task"] for g in creative.json()["items"]] == ["creative"]
    none_yet = await gateway.client.get(
        "/v1/generations", params={"created_before": "2000-01-01T00:00:00Z"}, headers=rater
    )
    assert none_yet.json() == {"items": [], "next_cursor": None}


async def test_users_and_task_types(gateway: Any, make_tenant: MakeTenant) -> None:
    acme = await make_tenant("acme")
    client, integrator = gateway.client, gateway.auth(acme.integrator)
    user = await client.post(
        "/v1/users", json={"external_id": "ann@acme", "display_name": "Ann"}, headers=integrator
    )
    assert user.status_code == 201, user.text
    assert user.json()["tenant_id"] == acme.tenant_id
    again = await client.post("/v1/users", json={"external_id": "ann@acme"}, headers=integrator)
    assert again.status_code == 409
    users = await client.get("/v1/users", headers=integrator)
    assert [u["external_id"] for u in users.json()["items"]] == ["ann@acme"]

    task = await client.post(
        "/v1/task-types",
        json={"name": "budgeting", "description": "Budget splits", "domain": "retail_media"},
        headers=integrator,
    )
    assert task.status_code == 201, task.text
    tasks = await client.get("/v1/task-types", headers=integrator)
    assert [t["name"] for t in tasks.json()["items"]] == ["budgeting"]
    assert (await client.get("/v1/users", headers=gateway.auth(acme.rater))).status_code == 403


async def test_feedback_of_a_key_bound_to_a_user_is_attributed(
    gateway: Any, make_tenant: MakeTenant
) -> None:
    acme = await make_tenant("acme")
    user = await gateway.client.post(
        "/v1/users", json={"external_id": "bo"}, headers=gateway.auth(acme.integrator)
    )
    user_id = user.json()["user_id"]
    bo = await gateway.key(acme.tenant_id, "rater", user_id=user_id)
    generation = await gateway.log_generation(acme.integrator)
    feedback = await gateway.feedback(bo, generation_id=generation["generation_id"], thumbs="up")
    assert feedback["user_id"] == user_id
    other = await gateway.client.post(
        "/v1/feedback",
        json={"generation_id": generation["generation_id"], "thumbs": "up", "user_id": "eve"},
        headers=gateway.auth(bo),
    )
    assert other.status_code == 403

    # Bo may change Bo's feedback, not the integrator's (which acts for nobody in particular).
    mine = await gateway.client.patch(
        f"/v1/feedback/{feedback['feedback_id']}", json={"thumbs": "down"},
        headers=gateway.auth(bo),
    )  # fmt: skip
    assert mine.status_code == 200, mine.text
    theirs = await gateway.feedback(
        acme.integrator, generation_id=generation["generation_id"], rating=2
    )
    for method, path, body in (
        ("PATCH", f"/v1/feedback/{theirs['feedback_id']}", {"rating": 5}),
        ("POST", f"/v1/feedback/{theirs['feedback_id']}/retract", {}),
    ):
        refused = await gateway.client.request(method, path, json=body, headers=gateway.auth(bo))
        assert refused.status_code == 403, refused.text
    still = await gateway.client.get(
        f"/v1/feedback/{theirs['feedback_id']}", headers=gateway.auth(acme.integrator)
    )
    assert (still.json()["revision"], still.json()["retracted_at"]) == (1, None)


async def test_concurrent_feedback_is_recorded_in_batches(
    gateway: Any, make_tenant: MakeTenant
) -> None:
    acme = await make_tenant("acme")
    gid = (await gateway.log_generation(acme.integrator))["generation_id"]
    labels = {
        "service": "flywheel.contracts.feedback.v1.FeedbackService",
        "method": "BatchRecordFeedback",
        "code": "OK",
    }
    before = REGISTRY.get_sample_value("flywheel_grpc_server_handled_total", labels) or 0.0
    bodies: list[dict[str, Any]] = [
        {"generation_id": gid, "thumbs": "up" if i % 2 else "down"} for i in range(30)
    ]
    bodies += [{"generation_id": "missing", "rating": 3}] * 5
    bodies += [{"generation_id": gid, "comment": "   "}] * 5
    responses = await asyncio.gather(
        *(
            gateway.client.post("/v1/feedback", json=body, headers=gateway.auth(acme.rater))
            for body in bodies
        )
    )
    assert [r.status_code for r in responses] == [201] * 30 + [404] * 5 + [422] * 5
    for response in responses[35:]:
        assert [e["field"] for e in response.json()["errors"]] == ["comment"]
    assert len({r.json()["feedback_id"] for r in responses[:30]}) == 30
    calls = (REGISTRY.get_sample_value("flywheel_grpc_server_handled_total", labels) or 0) - before
    # Fewer calls than requests: concurrent POSTs shared transactions.
    assert 1 <= calls < len(bodies)
    listed = await gateway.client.get(
        "/v1/feedback", params={"limit": 100}, headers=gateway.auth(acme.rater)
    )
    assert len(listed.json()["items"]) == 30
