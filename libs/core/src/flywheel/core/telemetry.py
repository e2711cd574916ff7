"""Prometheus metrics: the /metrics endpoint and gRPC server metrics every service exposes."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import Counter, Histogram, start_http_server

RPC_HANDLED = Counter(
    "flywheel_grpc_server_handled_total", "RPCs completed", ["service", "method", "code"]
)
RPC_LATENCY = Histogram(
    "flywheel_grpc_server_handling_seconds", "RPC latency", ["service", "method"]
)


def start_metrics_server(host: str, port: int) -> int:
    """Serve /metrics on ``host:port`` in a background thread; return the bound port."""
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_address[1])


class MetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts every RPC by status code and times it."""

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        handler = await continuation(handler_call_details)
        _, service, method = handler_call_details.method.split("/", 2)
        return rewrap_handler(
            handler,
            lambda behaviour: _timed(behaviour, service, method),
            lambda behaviour: _timed_stream(behaviour, service, method),
        )


def rewrap_handler(
    handler: Any,
    wrap_unary_response: Callable[[Any], Any],
    wrap_stream_response: Callable[[Any], Any],
) -> Any:
    """The same RPC handler with its behaviour wrapped (for unary or streaming responses)."""
    if handler is None:
        return None
    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler, wrap_unary_response),
        ("stream_unary", grpc.stream_unary_rpc_method_handler, wrap_unary_response),
        ("unary_stream", grpc.unary_stream_rpc_method_handler, wrap_stream_response),
        ("stream_stream", grpc.stream_stream_rpc_method_handler, wrap_stream_response),
    )
    for attribute, factory, wrap in kinds:
        behaviour = getattr(handler, attribute)
        if behaviour is not None:
            return factory(
                wrap(behaviour),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


def _code_of(context: Any, error: BaseException | None) -> str:
    if isinstance(error, grpc.aio.AbortError | grpc.RpcError) or error is None:
        code = context.code()
        if code is None:
            return "OK" if error is None else "UNKNOWN"
        return str(code.name)
    return "UNKNOWN"


def _timed(behaviour: Any, service: str, method: str) -> Any:
    async def wrapper(request: Any, context: Any) -> Any:
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            return await behaviour(request, context)
        except BaseException as exc:
            error = exc
            raise
        finally:
            RPC_LATENCY.labels(service, method).observe(time.perf_counter() - start)
            RPC_HANDLED.labels(service, method, _code_of(context, error)).inc()

    return wrapper


def _timed_stream(behaviour: Any, service: str, method: str) -> Any:
    async def wrapper(request: Any, context: Any) -> Any:
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            async for item in behaviour(request, context):
                yield item
        except BaseException as exc:
            error = exc
            raise
        finally:
            RPC_LATENCY.labels(service, method).observe(time.perf_counter() - start)
            RPC_HANDLED.labels(service, method, _code_of(context, error)).inc()

    return wrapper
