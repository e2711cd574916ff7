"""gRPC helpers: a server with health checking and metrics, and health checks as a client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from flywheel.core.errors import DomainError, abort_with
from flywheel.core.telemetry import MetricsInterceptor, rewrap_handler

# A servicer and the generated ``add_<Name>Servicer_to_server`` that registers it.
Registration = tuple[Callable[[Any, Any], None], Any]


class DomainErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Turns a :class:`~flywheel.core.errors.DomainError` raised by a servicer into its status,
    so servicers just call the domain and never a caller-facing error becomes UNKNOWN."""

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], handler_call_details: Any
    ) -> Any:
        return rewrap_handler(
            await continuation(handler_call_details), _translate_unary, _translate_stream
        )


def _translate_unary(behaviour: Any) -> Any:
    async def wrapper(request: Any, context: Any) -> Any:
        try:
            return await behaviour(request, context)
        except DomainError as error:
            await abort_with(context, error)

    return wrapper


def _translate_stream(behaviour: Any) -> Any:
    async def wrapper(request: Any, context: Any) -> AsyncIterator[Any]:
        try:
            async for item in behaviour(request, context):
                yield item
        except DomainError as error:
            await abort_with(context, error)

    return wrapper


@dataclass
class GrpcServer:
    """A started gRPC server, its health servicer and the port it bound."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int

    async def stop(self, grace_s: float = 5.0) -> None:
        """Report NOT_SERVING, then finish in-flight RPCs for up to ``grace_s``."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


async def start_grpc_server(
    host: str, port: int, registrations: Sequence[Registration], service_names: Sequence[str]
) -> GrpcServer:
    """Start serving ``registrations`` on ``host:port`` (port 0 picks a free one).

    The standard ``grpc.health.v1.Health`` service reports SERVING for the server as a whole
    (service "") and for each name in ``service_names``.
    """
    # Metrics outermost, so they see the status the domain error became.
    server = grpc.aio.server(interceptors=[MetricsInterceptor(), DomainErrorInterceptor()])
    for add, servicer in registrations:
        add(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC port {host}:{port}")
    await server.start()
    for name in ("", *service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return GrpcServer(server, health_servicer, bound)


async def check_health(target: str, service: str = "", timeout_s: float = 2.0) -> str:
    """Ask ``target``'s health service; return SERVING, NOT_SERVING, ... or UNREACHABLE."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = await stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            return "UNREACHABLE"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
