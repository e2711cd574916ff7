"""Idempotency-Key: a retried POST replays the first response and never writes twice."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

from flywheel.core.runtime import ServiceRuntime
from flywheel.gateway.idempotency import Fingerprint, Outcome

MakeTenant = Callable[..., Awaitable[Any]]


async def _count(gateway: Any, secret: str, path: str) -> int:
    response = await gateway.client.get(path, params={"limit": 500}, headers=gateway.auth(secret))
    return len(response.json()["items"])


async def test_same_key_same_request_replays(gateway: Any, make_tenant: MakeTenant) -> None:
    acme = await make_tenant("acme")
    generation = await gateway.log_generation(acme.integrator)
    headers = {**gateway.auth(acme.rater), "Idempotency-Key": "retry-1"}
    body = {"generation_id": generation["generation_id"], "thumbs": "down"}
    first = await gateway.client.post("/v1/feedback", json=body, headers=headers)
    again = await gateway.client.post("/v1/feedback", json=body, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["etag"] == first.headers["etag"]
    assert await _count(gateway, acme.rater, "/v1/feedback") == 1

    # Another key of the same tenant has its own idempotency keys.
    other = {**gateway.auth(acme.integrator), "Idempotency-Key": "retry-1"}
    third = await gateway.client.post("/v1/feedback", json=body, headers=other)
    assert third.status_code == 201
    assert "idempotent-replayed" not in third.headers
    assert await _count(gateway, acme.rater, "/v1/feedback") == 2


async def test_same_key_different_request_is_422(gateway: Any, make_tenant: MakeTenant) -> None:
    acme = await make_tenant("acme")
    headers = {**gateway.auth(acme.integrator), "Idempotency-Key": "k"}
    first = await gateway.client.post(
        "/v1/generations", json=gateway.generation_body(), headers=headers
    )
    assert first.status_code == 201
    for path, body in (
        ("/v1/generations", gateway.generation_body(output="different")),
        ("/v1/generations/batch", {"generations": [gateway.generation_body()]}),
    ):
        response = await gateway.client.post(path, json=body, headers=headers)
        assert response.status_code == 422, response.text
        problem = response.json()
        assert problem["type"] == "urn:flywheel:problem:idempotency-key-reused"
        assert [e["field"] for e in problem["errors"]] == ["Idempotency-Key"]
    assert await _count(gateway, acme.integrator, "/v1/generations") == 1

    response = await gateway.client.post(
        "/v1/generations",
        json=gateway.generation_body(),
        headers={**gateway.auth(acme.integrator), "Idempotency-Key": "x" * 256},
    )
    assert response.status_code == 422
    assert [e["field"] for e in response.json()["errors"]] == ["Idempotency-Key"]


async def test_in_flight_duplicate_is_409(gateway: Any, make_tenant: MakeTenant) -> None:
    acme = await make_tenant("acme")
    body = gateway.generation_body()
    raw = json.dumps(body).encode()
    principal = await gateway.state.authenticator.authenticate(acme.integrator)
    # Hold the key as a first, still-running request would.
    claim = await gateway.state.idempotency.claim(
        principal.key_id,
        "slow",
        Fingerprint("POST", "/v1/generations", hashlib.sha256(raw).hexdigest()),
    )
    assert claim.outcome is Outcome.CLAIMED
    response = await gateway.client.post(
        "/v1/generations",
        content=raw,
        headers={
            **gateway.auth(acme.integrator),
            "Idempotency-Key": "slow",
            "Content-Type": "application/json",
        },
    )
    assert response.status_code == 409, response.text
    assert response.json()["type"] == "urn:flywheel:problem:idempotency-key-in-flight"
    assert response.headers["retry-after"] == "1"
    assert await _count(gateway, acme.integrator, "/v1/generations") == 0


async def test_concurrent_retries_write_once(gateway: Any, make_tenant: MakeTenant) -> None:
    acme = await make_tenant("acme")
    headers = {**gateway.auth(acme.integrator), "Idempotency-Key": "burst"}
    body = gateway.generation_body()  # no client_generation_id: only the key deduplicates
    responses = await asyncio.gather(
        *(gateway.client.post("/v1/generations", json=body, headers=headers) for _ in range(8))
    )
    fresh = [
        r for r in responses if r.status_code == 201 and "idempotent-replayed" not in r.headers
    ]
    assert len(fresh) == 1
    for response in responses:
        assert response.status_code in (201, 409), response.text
        if response.status_code == 201:
            assert response.json() == fresh[0].json()
    assert await _count(gateway, acme.integrator, "/v1/generations") == 1


async def test_client_errors_are_replayed_too(gateway: Any, make_tenant: MakeTenant) -> None:
    acme = await make_tenant("acme")
    headers = {**gateway.auth(acme.rater), "Idempotency-Key": "bad"}
    body = {"generation_id": "nope", "rating": 3}
    first = await gateway.client.post("/v1/feedback", json=body, headers=headers)
    again = await gateway.client.post("/v1/feedback", json=body, headers=headers)
    assert first.status_code == again.status_code == 404
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["content-type"] == "application/problem+json"


async def test_a_failed_upstream_gives_the_key_back(
    gateway: Any, make_tenant: MakeTenant, feedback_runtime: ServiceRuntime
) -> None:
    acme = await make_tenant("acme")
    headers = {**gateway.auth(acme.integrator), "Idempotency-Key": "outage"}
    # The key is cached now, so the gateway gets as far as the write.
    assert (await gateway.client.get("/v1/generations", headers=headers)).status_code == 200
    feedback_runtime.stop.set()
    for _ in range(100):
        if feedback_runtime.grpc is None:
            break
        response = await gateway.client.post(
            "/v1/generations", json=gateway.generation_body(), headers=headers
        )
        if response.status_code == 503:
            break
        await asyncio.sleep(0.05)
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    assert response.json()["type"] == "urn:flywheel:problem:service-unavailable"
    principal = await gateway.state.authenticator.authenticate(acme.integrator)
    # The key is free again: a retry would run, not replay the 503.
    claim = await gateway.state.idempotency.claim(
        principal.key_id, "outage", Fingerprint("POST", "/v1/generations", "x")
    )
    assert claim.outcome is Outcome.CLAIMED
