"""Wiring of the gateway: the shared runtime plus its REST server in the same event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import uvicorn

from flywheel.core.runtime import ServiceRuntime
from flywheel.gateway.config import GatewaySettings
from flywheel.gateway.http_api import create_app
from flywheel.gateway.state import MIGRATIONS_DIR


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the runtime owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def build() -> ServiceRuntime:
    """The gateway's runtime, configured from the environment."""
    settings = GatewaySettings()
    # The runtime migrates the gateway's database (idempotency keys) before serving.
    runtime = ServiceRuntime(settings, version_dirs=[MIGRATIONS_DIR])
    server = _EmbeddedUvicorn(
        uvicorn.Config(
            create_app(settings, sessions=runtime.sessions),
            host=settings.host,
            port=settings.http_port,
            log_config=None,  # keep the runtime's JSON logging
            access_log=False,
        )
    )

    async def serve_http(stop: asyncio.Event) -> None:
        serving = asyncio.create_task(server.serve())
        await asyncio.wait(
            [serving, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED
        )
        server.should_exit = True
        await serving

    runtime.add_task(serve_http)
    return runtime
