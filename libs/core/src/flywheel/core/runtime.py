"""Service runtime: settings -> database -> event bus + outbox relay -> gRPC -> serve.

Every service's ``server.py`` builds a :class:`ServiceRuntime`, registers its servicers and
background tasks, and calls :func:`run`. SIGTERM and SIGINT stop it gracefully: health turns
NOT_SERVING, in-flight RPCs finish, background tasks stop, the relay publishes what it can.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import uvloop
from grpc_health.v1 import health_pb2

from flywheel.core.artifacts import LocalArtifactStore
from flywheel.core.config import ServiceSettings
from flywheel.core.db import SessionFactory, create_engine, session_factory
from flywheel.core.events.bus import EventBus
from flywheel.core.events.factory import create_bus
from flywheel.core.events.relay import OutboxRelay
from flywheel.core.logs import configure_logging
from flywheel.core.migrations import upgrade
from flywheel.core.rpc import GrpcServer, Registration, start_grpc_server
from flywheel.core.telemetry import start_metrics_server

log = logging.getLogger(__name__)

# A long-running job of the service (a consumer loop, an HTTP server) that ends when the
# event it is given is set.
BackgroundTask = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


class ServiceRuntime:
    """The parts every service process has, started in order and stopped in reverse."""

    def __init__(self, settings: ServiceSettings, *, version_dirs: Sequence[Path] = ()) -> None:
        self.settings = settings
        self.version_dirs = list(version_dirs)
        self.engine = create_engine(settings.resolved_database_url, schema=settings.resolved_schema)
        self.sessions: SessionFactory = session_factory(self.engine)
        self.bus: EventBus = create_bus(settings)
        self.relay = OutboxRelay(
            self.sessions,
            self.bus,
            batch_size=settings.outbox_batch_size,
            retention_s=settings.outbox_retention_s,
        )
        self.artifacts = LocalArtifactStore(settings.resolved_artifacts_dir)
        self.stop = asyncio.Event()
        self.grpc: GrpcServer | None = None
        self.metrics_port: int | None = None
        self._registrations: list[Registration] = []
        self._service_names: list[str] = []
        self._tasks: list[BackgroundTask] = [self.relay.run]
        # False: health reports NOT_SERVING until a task calls ``mark_ready``.
        self.ready_at_start = True

    def add_grpc_service(self, registration: Registration, full_name: str) -> None:
        """Serve a gRPC servicer; ``full_name`` (e.g. flywheel.contracts.x.v1.X) gets health."""
        self._registrations.append(registration)
        self._service_names.append(full_name)

    def defer_readiness(self) -> None:
        """Report NOT_SERVING after start-up until ``mark_ready`` (for services that must
        prepare before taking traffic, such as an inference replica restoring adapters)."""
        self.ready_at_start = False

    async def mark_ready(self) -> None:
        """Report SERVING for the server and every registered service."""
        if self.grpc is not None:
            for name in ("", *self._service_names):
                await self.grpc.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def add_task(self, task: BackgroundTask) -> None:
        """Run ``task`` alongside the server until shutdown."""
        self._tasks.append(task)

    async def serve(self) -> None:
        """Migrate, start everything, wait for ``stop``, then shut down in reverse order."""
        s = self.settings
        await upgrade(self.engine, s.resolved_schema, self.version_dirs)
        if s.metrics_port:
            self.metrics_port = start_metrics_server(s.host, s.metrics_port)
        self.grpc = await start_grpc_server(
            s.host, s.grpc_port, self._registrations, self._service_names
        )
        if not self.ready_at_start:
            for name in ("", *self._service_names):
                await self.grpc.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info(
            "%s serving",
            s.service_name,
            extra={"grpc_port": self.grpc.port, "metrics_port": self.metrics_port},
        )
        running = [asyncio.create_task(task(self.stop)) for task in self._tasks]
        stopped = asyncio.create_task(self.stop.wait())
        try:
            # A background task that dies takes the service down, so the supervisor
            # restarts it rather than leaving a half-working process.
            done, _ = await asyncio.wait([stopped, *running], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopped and task.exception() is not None:
                    log.error("background task failed", exc_info=task.exception())
        finally:
            self.stop.set()
            await self.grpc.stop()
            await asyncio.wait(running, timeout=10)
            for task in running:
                task.cancel()
            await self.bus.close()
            await self.engine.dispose()
            log.info("%s stopped", s.service_name)


def run(build: Callable[[], ServiceRuntime]) -> None:
    """Entry point of ``python -m flywheel.<service>``: build the runtime and serve it."""

    async def main() -> None:
        runtime = build()
        s = runtime.settings
        configure_logging(s.service_name, s.log_level, s.log_format)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, runtime.stop.set)
        await runtime.serve()

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(main())
