"""Tenant isolation: another tenant's ids are 404 everywhere and nothing of theirs changes;
a body cannot choose its tenant, role or server-assigned fields."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx

MakeTenant = Callable[..., Awaitable[Any]]


async def test_every_id_bearing_endpoint_hides_other_tenants(
    gateway: Any, make_tenant: MakeTenant
) -> None:
    acme, brandb = await make_tenant("acme"), await make_tenant("brandb")
    client = gateway.client
    b_generation = await gateway.log_generation(brandb.integrator)
    b_other = await gateway.log_generation(brandb.integrator, output="other")
    b_feedback = await gateway.feedback(
        brandb.rater, generation_id=b_generation["generation_id"], rating=4
    )
    a_generation = await gateway.log_generation(acme.integrator)
    gid, fid = b_generation["generation_id"], b_feedback["feedback_id"]

    calls: list[tuple[str, str, str, Any]] = [
        (acme.rater, "GET", f"/v1/generations/{gid}", None),
        (acme.integrator, "GET", f"/v1/generations/{gid}", None),
        (acme.rater, "GET", f"/v1/feedback/{fid}", None),
        (acme.rater, "PATCH", f"/v1/feedback/{fid}", {"rating": 1}),
        (acme.integrator, "PATCH", f"/v1/feedback/{fid}", {"rating": 1}),
        (acme.rater, "POST", f"/v1/feedback/{fid}/retract", None),
        (acme.rater, "POST", "/v1/feedback", {"generation_id": gid, "thumbs": "down"}),
        (acme.service, "POST", "/v1/feedback",
         {"generation_id": gid, "rating": 1, "source": "synthetic:x"}),
        (acme.rater, "POST", "/v1/feedback", {
            "generation_id": a_generation["generation_id"],
            "preference": {"generation_b_id": b_other["generation_id"], "choice": "a"},
        }),
    ]  # fmt: skip
    for secret, method, path, body in calls:
        response = await client.request(method, path, json=body, headers=gateway.auth(secret))
        assert response.status_code == 404, (method, path, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        text = response.text
        # Nothing of B's leaks: not its tenant, task, output or adapter.
        assert brandb.tenant_id not in text
        assert b_generation["output"] not in text

    # Filters by another tenant's ids match nothing (no error that would confirm them).
    rater = gateway.auth(acme.rater)
    for path in ("/v1/feedback", "/v1/feedback/stats", "/v1/feedback/export"):
        response = await client.get(path, params={"generation_id": gid}, headers=rater)
        assert response.status_code == 200, response.text
        assert fid not in response.text
    listed = await client.get(
        "/v1/generations", params={"prompt_hash": b_generation["prompt_hash"]}, headers=rater
    )
    assert [g["generation_id"] for g in listed.json()["items"]] == [a_generation["generation_id"]]

    # ... and B's objects are as they were.
    unchanged = await client.get(f"/v1/feedback/{fid}", headers=gateway.auth(brandb.rater))
    assert unchanged.json() == b_feedback
    b_list = await client.get("/v1/feedback", headers=gateway.auth(brandb.rater))
    assert [f["feedback_id"] for f in b_list.json()["items"]] == [fid]


async def test_a_tenant_query_parameter_is_ignored(gateway: Any, make_tenant: MakeTenant) -> None:
    acme, brandb = await make_tenant("acme"), await make_tenant("brandb")
    await gateway.feedback(
        brandb.rater,
        generation_id=(await gateway.log_generation(brandb.integrator))["generation_id"],
        thumbs="up",
    )
    response = await gateway.client.get(
        "/v1/feedback", params={"tenant_id": brandb.tenant_id}, headers=gateway.auth(acme.rater)
    )
    assert response.status_code == 200
    assert response.json()["items"] == []


async def test_mass_assignment_is_rejected_naming_the_field(
    gateway: Any, make_tenant: MakeTenant
) -> None:
    acme, brandb = await make_tenant("acme"), await make_tenant("brandb")
    client = gateway.client
    generation = await gateway.log_generation(acme.integrator)
    feedback = await gateway.feedback(
        acme.rater, generation_id=generation["generation_id"], rating=3
    )
    fid = feedback["feedback_id"]
    cases: list[tuple[str, str, str, dict[str, Any], list[str]]] = [
        (acme.integrator, "POST", "/v1/generations",
         gateway.generation_body(tenant_id=brandb.tenant_id), ["tenant_id"]),
        (acme.integrator, "POST", "/v1/generations",
         gateway.generation_body(generation_id="mine", prompt_hash="0" * 64,
                                 created_at="2020-01-01T00:00:00Z"),
         ["created_at", "generation_id", "prompt_hash"]),
        (acme.integrator, "POST", "/v1/generations/batch",
         {"generations": [gateway.generation_body(tenant_id=brandb.tenant_id)]},
         ["generations.0.tenant_id"]),
        (acme.rater, "POST", "/v1/feedback",
         {"generation_id": generation["generation_id"], "rating": 5,
          "tenant_id": brandb.tenant_id, "role": "admin", "revision": 9, "feedback_id": "f"},
         ["feedback_id", "revision", "role", "tenant_id"]),
        (acme.rater, "PATCH", f"/v1/feedback/{fid}",
         {"rating": 5, "tenant_id": brandb.tenant_id, "generation_id": "g"},
         ["generation_id", "tenant_id"]),
        (acme.rater, "POST", f"/v1/feedback/{fid}/retract",
         {"tenant_id": brandb.tenant_id}, ["tenant_id"]),
        (acme.integrator, "POST", "/v1/users",
         {"external_id": "x", "tenant_id": brandb.tenant_id, "role": "admin"},
         ["role", "tenant_id"]),
        (acme.integrator, "POST", "/v1/task-types",
         {"name": "x", "tenant_id": brandb.tenant_id}, ["tenant_id"]),
        (gateway.admin_secret, "POST", f"/v1/tenants/{acme.tenant_id}/api-keys",
         {"role": "rater", "name": "k", "tenant_id": brandb.tenant_id, "secret": "chosen"},
         ["secret", "tenant_id"]),
    ]  # fmt: skip
    for secret, method, path, body, expected in cases:
        response = await client.request(method, path, json=body, headers=gateway.auth(secret))
        assert response.status_code == 422, (path, response.text)
        named = sorted(e["field"] for e in response.json()["errors"])
        assert named == expected, (path, named)
    # Nothing was written by any of them.
    unchanged = await client.get(f"/v1/feedback/{fid}", headers=gateway.auth(acme.rater))
    assert unchanged.json()["revision"] == 1
    assert unchanged.json()["retracted_at"] is None
    generations = await client.get("/v1/generations", headers=gateway.auth(acme.rater))
    assert len(generations.json()["items"]) == 1


async def test_admin_manages_keys_of_any_tenant(gateway: Any, make_tenant: MakeTenant) -> None:
    acme = await make_tenant("acme")
    admin = gateway.auth(gateway.admin_secret)
    client: httpx.AsyncClient = gateway.client
    created = await client.post(
        f"/v1/tenants/{acme.tenant_id}/api-keys",
        json={"role": "rater", "name": "rater ui"},
        headers=admin,
    )
    assert created.status_code == 201
    key = created.json()
    secret = key.pop("secret")
    assert secret.startswith(key["prefix"])
    listed = await client.get(f"/v1/tenants/{acme.tenant_id}/api-keys", headers=admin)
    assert listed.status_code == 200
    assert all("secret" not in k for k in listed.json()["items"])
    assert key["key_id"] in [k["key_id"] for k in listed.json()["items"]]
    tenant = await client.get(f"/v1/tenants/{acme.tenant_id}", headers=admin)
    assert tenant.json()["tenant_id"] == acme.tenant_id
    tenants = await client.get("/v1/tenants", headers=admin)
    assert acme.tenant_id in [t["tenant_id"] for t in tenants.json()["items"]]

    assert (await client.get("/v1/feedback", headers=gateway.auth(secret))).status_code == 200
    revoked = await client.delete(
        f"/v1/tenants/{acme.tenant_id}/api-keys/{key['key_id']}", headers=admin
    )
    assert revoked.status_code == 200
    assert revoked.json()["revoked_at"] is not None
    # Revoked through this gateway: refused at once, despite the key cache.
    assert (await client.get("/v1/feedback", headers=gateway.auth(secret))).status_code == 401
    # A key id of another tenant is not found under this one.
    brandb = await make_tenant("brandb")
    response = await client.delete(
        f"/v1/tenants/{brandb.tenant_id}/api-keys/{key['key_id']}", headers=admin
    )
    assert response.status_code == 404
