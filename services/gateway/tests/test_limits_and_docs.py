"""Rate limits, the key cache, CORS, HTTP metrics and the OpenAPI description."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import REGISTRY

from flywheel.contracts.feedback.v1 import service_pb2
from flywheel.gateway.config import GatewaySettings

MakeTenant = Callable[..., Awaitable[Any]]


@pytest.fixture
def gateway_settings(gateway_settings: GatewaySettings) -> GatewaySettings:
    gateway_settings.rate_limit_per_s = 0.5
    gateway_settings.rate_limit_burst = 20
    gateway_settings.cors_allowed_origins = ["https://rater.example"]
    return gateway_settings


async def test_rate_limit_is_per_key_with_retry_after(
    gateway: Any, make_tenant: MakeTenant
) -> None:
    acme = await make_tenant("acme")  # the admin spent 4 of its 20 tokens on this
    rater = gateway.auth(acme.rater)
    statuses = [
        (await gateway.client.get("/v1/feedback", headers=rater)).status_code for _ in range(20)
    ]
    assert statuses == [200] * 20
    limited = await gateway.client.get("/v1/feedback", headers=rater)
    assert limited.status_code == 429
    assert limited.headers["content-type"] == "application/problem+json"
    assert limited.json()["type"] == "urn:flywheel:problem:rate-limited"
    assert int(limited.headers["retry-after"]) == 2  # one token per 2 s
    # Other keys have buckets of their own.
    other = await gateway.client.get("/v1/feedback", headers=gateway.auth(acme.integrator))
    assert other.status_code == 200


async def test_cached_key_outlives_revocation_elsewhere_until_ttl(
    gateway: Any, make_tenant: MakeTenant
) -> None:
    acme = await make_tenant("acme")
    headers = gateway.auth(acme.rater)
    assert (await gateway.client.get("/v1/feedback", headers=headers)).status_code == 200
    principal = await gateway.state.authenticator.authenticate(acme.rater)
    # Revoked behind this gateway's back (another replica, or the service directly).
    await gateway.stub.RevokeApiKey(
        service_pb2.RevokeApiKeyRequest(tenant_id=acme.tenant_id, key_id=principal.key_id)
    )
    assert (await gateway.client.get("/v1/feedback", headers=headers)).status_code == 200
    authenticator = gateway.state.authenticator
    clock = authenticator.clock
    authenticator.clock = lambda: clock() + authenticator.ttl_s + 1
    response = await gateway.client.get("/v1/feedback", headers=headers)
    assert response.status_code == 401


async def test_cors_for_allowed_origins_only(gateway: Any, make_tenant: MakeTenant) -> None:
    preflight = await gateway.client.options(
        "/v1/feedback",
        headers={
            "Origin": "https://rater.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://rater.example"
    assert "idempotency-key" in preflight.headers["access-control-allow-headers"].lower()
    # Errors carry CORS headers too, so a browser can read them.
    error = await gateway.client.get("/v1/feedback", headers={"Origin": "https://rater.example"})
    assert error.status_code == 401
    assert error.headers["access-control-allow-origin"] == "https://rater.example"
    assert "retry-after" in error.headers["access-control-expose-headers"].lower()
    denied = await gateway.client.get("/v1/feedback", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in denied.headers


def _count(route: str, status: str, method: str = "GET") -> float:
    value = REGISTRY.get_sample_value(
        "flywheel_http_requests_total", {"method": method, "route": route, "status": status}
    )
    return value or 0.0


async def test_metrics_by_route_template_and_status(gateway: Any, make_tenant: MakeTenant) -> None:
    acme = await make_tenant("acme")
    route = "/v1/generations/{generation_id}"
    before_404, before_401 = _count(route, "404"), _count(route, "401")
    before_413 = _count("/v1/feedback", "413", "POST")
    await gateway.client.get("/v1/generations/a", headers=gateway.auth(acme.rater))
    await gateway.client.get("/v1/generations/b", headers=gateway.auth(acme.rater))
    await gateway.client.get("/v1/generations/c")
    await gateway.client.post("/v1/feedback", content=b"x" * (64 * 1024 + 1))
    assert _count(route, "404") == before_404 + 2
    assert _count(route, "401") == before_401 + 1
    assert _count("/v1/feedback", "413", "POST") == before_413 + 1
    latency = REGISTRY.get_sample_value(
        "flywheel_http_request_duration_seconds_count", {"method": "GET", "route": route}
    )
    assert latency is not None
    assert latency >= 3


async def test_openapi_documents_every_operation(gateway: Any) -> None:
    response = await gateway.client.get("/openapi.json")
    assert response.status_code == 200
    schema = response.json()
    assert "Problem" in schema["components"]["schemas"]
    assert {"bearer", "apiKey"} <= set(schema["components"]["securitySchemes"])
    operations = [
        (path, method, op)
        for path, item in schema["paths"].items()
        if path.startswith("/v1/")
        for method, op in item.items()
    ]
    assert len(operations) == 41
    # The OpenAI-compatible API answers errors in OpenAI's envelope and replays nothing.
    openai_compatible = {"/v1/models", "/v1/chat/completions", "/v1/completions"}
    for path, method, op in operations:
        where = f"{method.upper()} {path}"
        assert op.get("summary"), where
        assert op.get("description"), where
        assert op.get("security"), where
        ok = [code for code in op["responses"] if code.startswith("2")]
        assert ok, where
        content = op["responses"][ok[0]].get("content", {})
        assert content, where
        if path in openai_compatible:
            error = op["responses"]["401"]["content"]["application/json"]["schema"]
            assert error == {"$ref": "#/components/schemas/OpenAIError"}, where
            continue
        assert op["responses"]["401"]["content"]["application/problem+json"], where
        if method == "post":
            names = [p["name"] for p in op.get("parameters", [])]
            assert "Idempotency-Key" in names, where
    feedback_body = schema["paths"]["/v1/feedback"]["post"]["requestBody"]
    ref = feedback_body["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    create = schema["components"]["schemas"][ref]
    assert create["additionalProperties"] is False
    assert len(create["oneOf"]) == 5
