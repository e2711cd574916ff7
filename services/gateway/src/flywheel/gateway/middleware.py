"""ASGI middleware of the gateway: request-size limit and HTTP metrics."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from prometheus_client import Counter, Histogram
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flywheel.gateway.problems import PROBLEM_MEDIA_TYPE, problem_bytes

HTTP_REQUESTS = Counter(
    "flywheel_http_requests_total",
    "HTTP requests answered by the gateway",
    ["method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "flywheel_http_request_duration_seconds",
    "HTTP request latency at the gateway, until the response ends",
    ["method", "route"],
)
UNMATCHED_ROUTE = "<unmatched>"


async def _send_problem(send: Send, status: int, kind: str, detail: str, path: str) -> None:
    body = problem_bytes(status, kind, detail, path)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Reads the whole body up front, refusing it (413) once it grows past ``max_bytes``.

    The bytes are counted as they arrive, so a missing or false Content-Length does not
    get a larger body in; a Content-Length over the limit is refused before reading.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        too_large = f"The request body exceeds {self.max_bytes} bytes."
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    await _send_problem(send, 413, "payload-too-large", too_large, path)
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _send_problem(send, 413, "payload-too-large", too_large, path)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        buffered: Message | None = {
            "type": "http.request",
            "body": b"".join(chunks),
            "more_body": False,
        }

        async def replay() -> Message:
            nonlocal buffered
            if buffered is not None:
                message, buffered = buffered, None
                return message
            return await receive()

        await self.app(scope, replay, send)


class MetricsMiddleware:
    """Counts requests by method, route template and status, and times them.

    ``routes`` name the template of requests answered before routing (e.g. a 413), so
    they are not lumped together as unmatched.
    """

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        # Included routers have no template of their own; their routes are listed too.
        self.routes = [r for r in routes if isinstance(getattr(r, "path", None), str)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except BaseException:
            status = 500
            raise
        finally:
            route = self._route_of(scope)
            method = str(scope.get("method", ""))
            HTTP_REQUESTS.labels(method, route, str(status)).inc()
            HTTP_LATENCY.labels(method, route).observe(time.perf_counter() - start)

    def _route_of(self, scope: Scope) -> str:
        route: Any = scope.get("route")
        if route is not None and hasattr(route, "path"):
            return str(route.path)
        partial = None
        candidate: Any
        for candidate in self.routes:
            match, _ = candidate.matches(scope)
            if match is Match.FULL:
                return str(candidate.path)
            if match is Match.PARTIAL and partial is None:
                partial = str(candidate.path)
        return partial or UNMATCHED_ROUTE
