"""gRPC health checking and the Prometheus metrics every service exposes."""

from __future__ import annotations

import asyncio
import time
import urllib.request

from flywheel.core.rpc import check_health, start_grpc_server
from flywheel.core.telemetry import start_metrics_server


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


async def test_health_and_rpc_metrics() -> None:
    server = await start_grpc_server("127.0.0.1", 0, [], ["flywheel.contracts.x.v1.X"])
    metrics_port = start_metrics_server("127.0.0.1", 0)
    target = f"127.0.0.1:{server.port}"
    try:
        assert await check_health(target) == "SERVING"
        assert await check_health(target, "flywheel.contracts.x.v1.X") == "SERVING"
        assert await check_health(target, "no.such.Service") == "SERVICE_UNKNOWN"
        ok = (
            'flywheel_grpc_server_handled_total{code="OK",method="Check",'
            'service="grpc.health.v1.Health"}'
        )
        not_found = ok.replace('code="OK"', 'code="NOT_FOUND"')
        # The client may hold its answer before the server's interceptor has counted it.
        deadline = time.monotonic() + 5
        while not_found not in (text := _scrape(metrics_port)) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        assert ok in text
        assert not_found in text
        assert "flywheel_grpc_server_handling_seconds_bucket" in text

        await server.stop(grace_s=0.5)
        assert await check_health(target, timeout_s=0.5) == "UNREACHABLE"
    finally:
        await server.server.stop(0)
