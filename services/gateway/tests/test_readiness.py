"""The gateway is ready only when every service behind it serves."""

from __future__ import annotations

import httpx

from flywheel.core.rpc import start_grpc_server
from flywheel.core.testing.local_infra import free_port
from flywheel.gateway.config import GatewaySettings
from flywheel.gateway.http_api import create_app


async def _get(settings: GatewaySettings, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=create_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        return await client.get(path)


async def test_ready_when_every_upstream_serves() -> None:
    servers = [await start_grpc_server("127.0.0.1", 0, [], []) for _ in range(2)]
    try:
        settings = GatewaySettings(
            upstreams={"feedback": f"127.0.0.1:{servers[0].port}",
                       "dataset": f"127.0.0.1:{servers[1].port}"}
        )  # fmt: skip
        response = await _get(settings, "/readyz")
        assert response.status_code == 200
        assert response.json() == {
            "status": "ready",
            "services": {"feedback": "SERVING", "dataset": "SERVING"},
        }
    finally:
        for server in servers:
            await server.server.stop(0)


async def test_not_ready_names_the_unreachable_service() -> None:
    server = await start_grpc_server("127.0.0.1", 0, [], [])
    try:
        settings = GatewaySettings(
            upstreams={"feedback": f"127.0.0.1:{server.port}",
                       "trainer": f"127.0.0.1:{free_port()}"}
        )  # fmt: skip
        response = await _get(settings, "/readyz")
        assert response.status_code == 503
        assert response.json()["services"] == {"feedback": "SERVING", "trainer": "UNREACHABLE"}
        assert (await _get(settings, "/healthz")).json() == {"status": "ok"}
    finally:
        await server.server.stop(0)
