"""The gateway in-process over a real feedback service (gRPC, SQLite, outbox) per test,
and, for the tests that ask for them, a real dataset service on the same event log and a
real trainer service."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from fastapi import FastAPI

from flywheel.contracts.feedback.v1 import resources_pb2, service_pb2
from flywheel.contracts.feedback.v1.service_pb2_grpc import FeedbackServiceStub
from flywheel.core.runtime import ServiceRuntime
from flywheel.core.testing.local_infra import free_port
from flywheel.core.testing.services import serving
from flywheel.feedback.server import build
from flywheel.gateway.config import GatewaySettings
from flywheel.gateway.http_api import create_app
from flywheel.gateway.state import GatewayState


@pytest.fixture
async def feedback_runtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ServiceRuntime]:
    """The real feedback service, serving gRPC on a free loopback port."""
    monkeypatch.setenv("FLYWHEEL_DATA_DIR", str(tmp_path / "feedback"))
    monkeypatch.setenv("FLYWHEEL_GRPC_PORT", str(free_port()))
    monkeypatch.setenv("FLYWHEEL_METRICS_PORT", "0")
    async with serving(build()) as runtime:
        yield runtime


@pytest.fixture
def feedback_target(feedback_runtime: ServiceRuntime) -> str:
    return f"127.0.0.1:{feedback_runtime.settings.grpc_port}"


@pytest.fixture
async def dataset_runtime(
    feedback_runtime: ServiceRuntime, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ServiceRuntime]:
    """The real dataset service, in the feedback service's data dir: its own SQLite file,
    the same embedded event log, so its consumer sees the feedback events."""
    monkeypatch.setenv("FLYWHEEL_DATA_DIR", str(feedback_runtime.settings.data_dir))
    monkeypatch.setenv("FLYWHEEL_GRPC_PORT", str(free_port()))
    monkeypatch.setenv("FLYWHEEL_METRICS_PORT", "0")
    # Tests build snapshots themselves; a policy firing meanwhile would add its own.
    monkeypatch.setenv("FLYWHEEL_POLICY_ENABLED", "false")
    # Imported here: only the tests that start a dataset service depend on it.
    from flywheel.dataset.server import build as build_dataset

    async with serving(build_dataset()) as runtime:
        yield runtime


@pytest.fixture
def dataset_target(dataset_runtime: ServiceRuntime) -> str:
    return f"127.0.0.1:{dataset_runtime.settings.grpc_port}"


@pytest.fixture
def trainer_schedules() -> bool:
    """Whether the trainer's scheduler starts queued jobs. Off by default: jobs stay
    queued, so tests see them (and cancel them) deterministically and nothing trains."""
    return False


@pytest.fixture
async def trainer_runtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trainer_schedules: bool
) -> AsyncIterator[ServiceRuntime]:
    """The real trainer service on SQLite in its own data dir, one CPU device."""
    monkeypatch.setenv("FLYWHEEL_DATA_DIR", str(tmp_path / "trainer"))
    monkeypatch.setenv("FLYWHEEL_GRPC_PORT", str(free_port()))
    monkeypatch.setenv("FLYWHEEL_METRICS_PORT", "0")
    monkeypatch.setenv("FLYWHEEL_TRAINER_POLL_S", "0.2")
    monkeypatch.setenv("FLYWHEEL_TRAINER_DEVICES", '["cpu"]')
    # Imported here: only the tests that start a trainer service depend on it.
    from flywheel.trainer.scheduler import Scheduler
    from flywheel.trainer.server import build as build_trainer

    if not trainer_schedules:
        # The service runs in this process: its scheduler's rounds become no-ops.
        async def idle_round(self: Scheduler) -> None:
            return None

        monkeypatch.setattr(Scheduler, "round", idle_round)
    async with serving(build_trainer()) as runtime:
        yield runtime


@pytest.fixture
def trainer_target(trainer_runtime: ServiceRuntime) -> str:
    return f"127.0.0.1:{trainer_runtime.settings.grpc_port}"


@pytest.fixture
async def feedback_stub(feedback_target: str) -> AsyncIterator[FeedbackServiceStub]:
    """A direct gRPC client of the feedback service (the trusted, internal side)."""
    async with grpc.aio.insecure_channel(feedback_target) as channel:
        yield FeedbackServiceStub(channel)


@pytest.fixture
def gateway_settings(tmp_path: Path, feedback_target: str) -> GatewaySettings:
    """Gateway settings; tests may change them before asking for ``gateway``."""
    return GatewaySettings(
        data_dir=tmp_path / "gateway",
        metrics_port=0,
        upstreams={"feedback": feedback_target},
        rate_limit_per_s=1000.0,
        rate_limit_burst=1000,
        max_body_bytes=64 * 1024,
    )


@dataclass
class Gateway:
    """The running gateway app, an HTTP client for it, and ways to get API keys."""

    app: FastAPI
    client: httpx.AsyncClient
    admin_secret: str
    stub: FeedbackServiceStub
    _keys: dict[tuple[str, str], str] = field(default_factory=dict)

    @property
    def state(self) -> GatewayState:
        state: GatewayState = self.app.state.gateway
        return state

    async def tenant(self, prefix: str = "t") -> str:
        """A new tenant, created through the admin endpoint."""
        tenant_id = f"{prefix}-{uuid.uuid4().hex[:8]}"
        response = await self.client.post(
            "/v1/tenants",
            json={"tenant_id": tenant_id, "display_name": tenant_id.upper()},
            headers=auth(self.admin_secret),
        )
        assert response.status_code == 201, response.text
        return tenant_id

    async def key(self, tenant_id: str, role: str, **extra: Any) -> str:
        """The secret of a new key of ``role`` for ``tenant_id``, issued by the admin."""
        response = await self.client.post(
            f"/v1/tenants/{tenant_id}/api-keys",
            json={"role": role, "name": f"{role} key", **extra},
            headers=auth(self.admin_secret),
        )
        assert response.status_code == 201, response.text
        secret: str = response.json()["secret"]
        return secret

    async def log_generation(self, secret: str, **overrides: Any) -> dict[str, Any]:
        """Log a generation through REST; return it."""
        response = await self.client.post(
            "/v1/generations", json=generation_body(**overrides), headers=auth(secret)
        )
        assert response.status_code == 201, response.text
        result: dict[str, Any] = response.json()
        return result

    async def feedback(self, secret: str, **body: Any) -> dict[str, Any]:
        """Record feedback through REST; return it."""
        response = await self.client.post("/v1/feedback", json=body, headers=auth(secret))
        assert response.status_code == 201, response.text
        result: dict[str, Any] = response.json()
        return result

    @staticmethod
    def auth(secret: str) -> dict[str, str]:
        """The Authorization header of an API key."""
        return auth(secret)

    @staticmethod
    def generation_body(**overrides: Any) -> dict[str, Any]:
        """A valid generation to log, with ``overrides``."""
        return generation_body(**overrides)


def auth(secret: str) -> dict[str, str]:
    """The Authorization header of an API key."""
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
async def gateway(
    gateway_settings: GatewaySettings, feedback_stub: FeedbackServiceStub
) -> AsyncIterator[Gateway]:
    """The gateway app (lifespan run) and an admin key made through the feedback service."""
    await feedback_stub.CreateTenant(
        service_pb2.CreateTenantRequest(tenant_id="platform", display_name="Platform")
    )
    created = await feedback_stub.CreateApiKey(
        service_pb2.CreateApiKeyRequest(
            tenant_id="platform", role=resources_pb2.ROLE_ADMIN, name="bootstrap"
        )
    )
    app = create_app(gateway_settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield Gateway(app, client, created.secret, feedback_stub)


@dataclass
class Tenant:
    """A tenant with a key of each tenant role."""

    tenant_id: str
    integrator: str
    rater: str
    service: str


@pytest.fixture
def make_tenant(gateway: Gateway) -> Callable[[str], Awaitable[Tenant]]:
    async def make(prefix: str = "t") -> Tenant:
        tenant_id = await gateway.tenant(prefix)
        return Tenant(
            tenant_id,
            integrator=await gateway.key(tenant_id, "integrator"),
            rater=await gateway.key(tenant_id, "rater"),
            service=await gateway.key(tenant_id, "service"),
        )

    return make


def generation_body(**overrides: Any) -> dict[str, Any]:
    """A valid generation to log."""
    body: dict[str, Any] = {
        "task": "budgeting",
        "prompt": "Split 1000 EUR across retailers A and B.",
        "output": "A: 600, B: 400",
        "model": "acme/budgeting",
        "base_model": "tiny-llama",
        "adapter": {"name": "acme-budgeting", "version": "v1"},
        "latency_ms": 12.0,
        "prompt_tokens": 9,
        "completion_tokens": 7,
        "metadata": {"page": "checkout"},
    }
    body.update(overrides)
    return body
