"""Every error is an RFC 9457 problem naming what is wrong, in REST terms."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

MakeTenant = Callable[..., Awaitable[Any]]
PROBLEM = "application/problem+json"


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """The problem body of ``response``, checked for shape and status."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["type"].startswith("urn:flywheel:problem:")
    assert body["title"]
    assert body["instance"] == response.request.url.path
    return body


def fields(response: httpx.Response) -> list[str]:
    """The fields a 422 names."""
    return [e["field"] for e in problem(response, 422)["errors"]]


async def test_401_without_or_with_a_bad_key(gateway: Any, make_tenant: MakeTenant) -> None:
    client = gateway.client
    for headers in (
        {},
        {"Authorization": "Bearer fw_not-a-key"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"X-API-Key": "nope"},
        {"Authorization": "Bearer " + "x" * 600},
    ):
        response = await client.get("/v1/feedback", headers=headers)
        body = problem(response, 401)
        assert body["type"] == "urn:flywheel:problem:unauthenticated"
        assert response.headers["www-authenticate"].startswith("Bearer")
    acme = await make_tenant("acme")
    assert (await client.get("/v1/feedback", headers={"X-API-Key": acme.rater})).status_code == 200
    # Auth comes first: a bad body from an unknown caller is still a 401.
    response = await client.post("/v1/feedback", content=b"\xff", headers={"X-API-Key": "nope"})
    problem(response, 401)


async def test_403_for_the_wrong_role(gateway: Any, make_tenant: MakeTenant) -> None:
    acme = await make_tenant("acme")
    client = gateway.client
    cases = [
        (acme.rater, "POST", "/v1/generations", gateway.generation_body()),
        (acme.integrator, "GET", "/v1/tenants", None),
        (acme.integrator, "POST", f"/v1/tenants/{acme.tenant_id}/api-keys", {"role": "admin"}),
        (acme.service, "GET", "/v1/feedback", None),
        (acme.rater, "GET", "/v1/task-types", None),
        (gateway.admin_secret, "GET", "/v1/generations", None),
        (gateway.admin_secret, "POST", "/v1/feedback", {"generation_id": "x", "rating": 1}),
    ]
    for secret, method, path, body in cases:
        response = await client.request(method, path, json=body, headers=gateway.auth(secret))
        assert problem(response, 403)["type"] == "urn:flywheel:problem:forbidden", path


async def test_404_for_unknown_ids_and_routes(gateway: Any, make_tenant: MakeTenant) -> None:
    acme = await make_tenant("acme")
    rater = gateway.auth(acme.rater)
    for path in ("/v1/generations/nope", "/v1/feedback/nope"):
        body = problem(await gateway.client.get(path, headers=rater), 404)
        assert body["type"] == "urn:flywheel:problem:not-found"
        assert "nope" in body["detail"]
    problem(await gateway.client.get("/v1/nothing-here", headers=rater), 404)
    admin = gateway.auth(gateway.admin_secret)
    problem(await gateway.client.get("/v1/tenants/no-such-tenant", headers=admin), 404)
    problem(await gateway.client.delete("/v1/feedback/x", headers=rater), 405)


async def test_422_names_rest_fields(gateway: Any, make_tenant: MakeTenant) -> None:
    acme = await make_tenant("acme")
    client, rater = gateway.client, gateway.auth(acme.rater)
    generation = await gateway.log_generation(acme.integrator)
    gid = generation["generation_id"]

    async def post_feedback(body: dict[str, Any]) -> httpx.Response:
        response: httpx.Response = await client.post("/v1/feedback", json=body, headers=rater)
        return response

    assert fields(await post_feedback({"generation_id": gid, "rating": 6})) == ["rating"]
    assert fields(await post_feedback({"generation_id": gid, "rating": "5"})) == ["rating"]
    assert fields(await post_feedback({"generation_id": gid, "rating": True})) == ["rating"]
    assert fields(await post_feedback({"generation_id": gid, "thumbs": "sideways"})) == ["thumbs"]
    assert fields(await post_feedback({"rating": 3})) == ["generation_id"]
    assert fields(
        await post_feedback(
            {"generation_id": gid, "preference": {"generation_b_id": gid, "choice": "c"}}
        )
    ) == ["preference.choice"]
    assert sorted(fields(await post_feedback({"generation_id": gid, "rating": 3, "comment": "x"})))[
        :2
    ] == ["comment", "rating"]
    assert "thumbs" in fields(await post_feedback({"generation_id": gid}))
    assert fields(await post_feedback({"generation_id": gid, "source": "robot"})) == ["source"]
    # Checked by the feedback service, named in REST terms by the gateway:
    assert fields(await post_feedback({"generation_id": gid, "comment": "x" * 10_001})) == [
        "comment"
    ]
    assert fields(await post_feedback({"generation_id": gid, "comment": "   "})) == ["comment"]
    assert fields(
        await post_feedback(
            {"generation_id": gid, "preference": {"generation_b_id": gid, "choice": "a"}}
        )
    ) == ["preference.generation_b_id"]
    assert fields(
        await post_feedback({"generation_id": gid, "thumbs": "up", "metadata": {"x": "y" * 20_000}})
    ) == ["metadata"]

    response = await client.post(
        "/v1/feedback",
        content=b'{"generation_id": "g", "thumbs": "up", "metadata": {"n": [1e400, 1%s]}}'
        % (b"0" * 400),
        headers={**rater, "Content-Type": "application/json"},
    )
    assert fields(response) == ["metadata"]

    integrator = gateway.auth(acme.integrator)
    bad_task = gateway.generation_body(task="Bad Task")
    response = await client.post("/v1/generations", json=bad_task, headers=integrator)
    assert fields(response) == ["task"]
    bad_role = gateway.generation_body(prompt=[{"role": "robot", "content": "hi"}])
    response = await client.post("/v1/generations", json=bad_role, headers=integrator)
    assert fields(response) == ["prompt.0.role"]
    response = await client.post(
        "/v1/generations", json=gateway.generation_body(prompt=[]), headers=integrator
    )
    assert fields(response) == ["prompt"]
    response = await client.post(
        "/v1/generations/batch",
        json={"generations": [gateway.generation_body(), bad_task]},
        headers=integrator,
    )
    assert fields(response) == ["generations.1.task"]
    response = await client.post(
        "/v1/generations/batch", json={"generations": [bad_task]}, headers=integrator
    )
    assert fields(response) == ["generations.0.task"]
    response = await client.post(
        "/v1/generations", json=gateway.generation_body(latency_ms=-1), headers=integrator
    )
    assert fields(response) == ["latency_ms"]

    response = await client.get("/v1/generations", params={"cursor": "garbage!"}, headers=rater)
    assert fields(response) == ["cursor"]
    response = await client.get("/v1/generations", params={"limit": 0}, headers=rater)
    assert fields(response) == ["limit"]
    response = await client.get("/v1/feedback", params={"kind": "stars"}, headers=rater)
    assert fields(response) == ["kind.0"]
    response = await client.get("/v1/feedback/stats", params={"group_by": "x"}, headers=rater)
    assert fields(response) == ["group_by.0"]
    response = await client.get(
        "/v1/feedback", params={"created_after": "yesterday"}, headers=rater
    )
    assert fields(response) == ["created_after"]

    rating = await gateway.feedback(acme.rater, generation_id=gid, rating=3)
    response = await client.patch(
        f"/v1/feedback/{rating['feedback_id']}", json={"thumbs": "up"}, headers=rater
    )
    assert fields(response) == ["thumbs"]
    response = await client.patch(
        f"/v1/feedback/{rating['feedback_id']}",
        json={"rating": 2},
        headers={**rater, "If-Match": "yesterday"},
    )
    assert fields(response) == ["If-Match"]

    admin = gateway.auth(gateway.admin_secret)
    response = await client.post("/v1/tenants", json={"tenant_id": "Not A Slug"}, headers=admin)
    assert fields(response) == ["tenant_id"]
    response = await client.post(
        f"/v1/tenants/{acme.tenant_id}/api-keys", json={"role": "owner", "name": "k"}, headers=admin
    )
    assert fields(response) == ["role"]


async def test_409_for_conflicts(gateway: Any, make_tenant: MakeTenant) -> None:
    acme = await make_tenant("acme")
    response = await gateway.client.post(
        "/v1/tenants",
        json={"tenant_id": acme.tenant_id},
        headers=gateway.auth(gateway.admin_secret),
    )
    assert problem(response, 409)["type"] == "urn:flywheel:problem:already-exists"


async def test_400_for_bodies_that_are_not_utf8_json(gateway: Any, make_tenant: MakeTenant) -> None:
    acme = await make_tenant("acme")
    headers = {**gateway.auth(acme.rater), "Content-Type": "application/json"}
    for content in (
        b'{"comment": "\xff\xfe"}',
        b'{"comment": ',
        b"not json",
        b'{"generation_id": "x", "rating": NaN}',
        b"[" * 10_000,
    ):
        response = await gateway.client.post("/v1/feedback", content=content, headers=headers)
        assert problem(response, 400)["type"] == "urn:flywheel:problem:malformed-body"
    response = await gateway.client.post(
        "/v1/feedback",
        content=b'{"generation_id": "x", "rating": 3}',
        headers={**gateway.auth(acme.rater), "Content-Type": "text/plain"},
    )
    problem(response, 415)


async def test_strings_no_database_can_store_are_422(gateway: Any, make_tenant: MakeTenant) -> None:
    acme = await make_tenant("acme")
    headers = {**gateway.auth(acme.rater), "Content-Type": "application/json"}
    response = await gateway.client.post(
        "/v1/feedback", content=b'{"generation_id": "x", "comment": "a\\u0000b"}', headers=headers
    )
    assert fields(response) == ["comment"]
    response = await gateway.client.post(
        "/v1/feedback",
        content=b'{"generation_id": "x", "comment": "\\ud800", "metadata": {"k": ["\\udfff"]}}',
        headers=headers,
    )
    assert fields(response) == ["comment", "metadata.k.0"]
    response = await gateway.client.get(
        "/v1/generations", params={"task": "a\x00"}, headers=gateway.auth(acme.rater)
    )
    assert fields(response) == ["task"]


async def test_413_for_bodies_over_the_limit(gateway: Any, make_tenant: MakeTenant) -> None:
    acme = await make_tenant("acme")
    limit = gateway.state.settings.max_body_bytes
    big = b'{"comment": "' + b"x" * limit + b'"}'
    headers = {**gateway.auth(acme.rater), "Content-Type": "application/json"}
    response = await gateway.client.post("/v1/feedback", content=big, headers=headers)
    assert problem(response, 413)["type"] == "urn:flywheel:problem:payload-too-large"

    async def chunks() -> AsyncIterator[bytes]:
        # Streamed without Content-Length: counted as it arrives.
        for _ in range(limit // 1024 + 2):
            yield b"x" * 1024

    response = await gateway.client.post("/v1/feedback", content=chunks(), headers=headers)
    assert "content-length" not in response.request.headers
    problem(response, 413)
    # Even unauthenticated: the body is refused before anything else.
    problem(await gateway.client.post("/v1/feedback", content=big), 413)


@pytest.mark.parametrize("header", ["Content-Length"])
async def test_413_when_content_length_lies_low(
    gateway: Any, make_tenant: MakeTenant, header: str
) -> None:
    acme = await make_tenant("acme")
    limit = gateway.state.settings.max_body_bytes

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(limit // 1024 + 2):
            yield b"x" * 1024

    response = await gateway.client.post(
        "/v1/feedback",
        content=chunks(),
        headers={**gateway.auth(acme.rater), header: "10", "Content-Type": "application/json"},
    )
    problem(response, 413)


async def test_unexpected_errors_are_500_problems(gateway: Any) -> None:
    async def boom() -> None:
        raise RuntimeError("bug")

    gateway.app.add_api_route("/boom", boom)
    transport = httpx.ASGITransport(app=gateway.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        response = await client.get("/boom")
    body = problem(response, 500)
    assert body["type"] == "urn:flywheel:problem:internal-error"
    assert "bug" not in response.text
