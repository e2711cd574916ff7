"""A real feedback service (gRPC, database, relay) per test, on SQLite or PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from flywheel.contracts.feedback.v1.service_pb2_grpc import FeedbackServiceStub
from flywheel.core.runtime import ServiceRuntime
from flywheel.core.testing.local_infra import free_port
from flywheel.core.testing.services import serving
from flywheel.feedback.server import build


@pytest.fixture(params=["sqlite", "postgres"])
async def feedback_runtime(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ServiceRuntime]:
    monkeypatch.setenv("FLYWHEEL_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("FLYWHEEL_GRPC_PORT", str(free_port()))
    monkeypatch.setenv("FLYWHEEL_METRICS_PORT", "0")
    if request.param == "postgres":
        monkeypatch.setenv("FLYWHEEL_DATABASE_URL", request.getfixturevalue("pg_url"))
    async with serving(build()) as runtime:
        yield runtime


@pytest.fixture
async def stub(feedback_runtime: ServiceRuntime) -> AsyncIterator[FeedbackServiceStub]:
    target = f"127.0.0.1:{feedback_runtime.settings.grpc_port}"
    async with grpc.aio.insecure_channel(target) as channel:
        yield FeedbackServiceStub(channel)
