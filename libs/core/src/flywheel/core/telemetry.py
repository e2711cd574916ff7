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
        if handler is None:
            return None
        _, service, method = handler_call_details.method.split("/", 2)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _timed(handler.unary_unary, service, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _timed(handler.stream_unary, service, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        # Streaming responses are counted when the stream ends.
        behaviour = handler.unary_stream or handler.stream_stream
        wrapped = _timed_stream(behaviour, service, method)
        factory = (
            grpc.unary_stream_rpc_method_handler
            if handler.unary_stream
            else grpc.stream_stream_rpc_method_handler
        )
        return factory(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


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
