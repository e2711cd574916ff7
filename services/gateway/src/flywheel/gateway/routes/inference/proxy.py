"""Forwarding to the inference service's OpenAI API, under the caller's tenant.

The request body goes on byte for byte; the only headers sent are the caller's tenant
(``X-Flywheel-Tenant``, never the client's own), the body's media type and ``Accept``; the
API key stays at the gateway. The answer comes back with its status, body, media type and
``X-Flywheel-*`` headers; a ``text/event-stream`` answer is relayed chunk by chunk as it
arrives, and the call to the inference service is closed when the client goes away.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import httpx
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from flywheel.gateway.problems import ProblemError
from flywheel.gateway.routes.inference.protocol import error_body, is_error_envelope
from flywheel.gateway.state import state_of

log = logging.getLogger(__name__)

TENANT_HEADER = "X-Flywheel-Tenant"
EVENT_STREAM = "text/event-stream"
# Response headers of the inference service that reach the client (lower case).
_FLYWHEEL_PREFIX = "x-flywheel-"
_COPIED = ("content-type", "retry-after")


async def forward(request: Request, tenant_id: str, path: str) -> Response:
    """``request`` sent to the inference service's ``path`` for ``tenant_id``; its answer.

    An inference service that cannot be reached is a 503 problem (``Retry-After: 1``), one
    that does not answer within ``inference_timeout_s`` a 504, one that breaks off a 502.
    """
    state = state_of(request)
    client = state.inference_http
    headers = {TENANT_HEADER: tenant_id, "Accept": f"application/json, {EVENT_STREAM}"}
    content = None
    if request.method == "POST":
        content = await request.body()
        headers["Content-Type"] = request.headers.get("content-type") or "application/json"
    outgoing = client.build_request(request.method, path, content=content, headers=headers)
    try:
        upstream = await client.send(outgoing, stream=True)
    except httpx.HTTPError as exc:
        raise _problem(exc, state.settings.inference_timeout_s) from exc
    answer_headers = _answer_headers(upstream)
    if _media_type(upstream) == EVENT_STREAM:
        # The relay closes the call when it ends, fails or is cancelled (the client went
        # away); the background task covers a relay that never started.
        return StreamingResponse(
            _relay(upstream, state.settings.inference_timeout_s),
            status_code=upstream.status_code,
            headers=answer_headers,
            background=BackgroundTask(upstream.aclose),
        )
    try:
        body = await upstream.aread()
    except httpx.HTTPError as exc:
        raise _problem(exc, state.settings.inference_timeout_s) from exc
    finally:
        await upstream.aclose()
    if upstream.status_code >= 400 and not is_error_envelope(body):
        # Not the inference service's own answer (a crash page, a proxy in between): keep
        # the status, in OpenAI's envelope so clients raise the right error.
        log.warning("inference service answered %s without an error body", upstream.status_code)
        message = f"The inference service failed (HTTP {upstream.status_code})."
        body = json.dumps(error_body(message, upstream.status_code)).encode()
        answer_headers["content-type"] = "application/json"
    return Response(body, status_code=upstream.status_code, headers=answer_headers)


def _media_type(response: httpx.Response) -> str:
    content_type: str = response.headers.get("content-type", "")
    return content_type.split(";", 1)[0].strip().lower()


def _answer_headers(upstream: httpx.Response) -> dict[str, str]:
    return {
        name: value
        for name, value in upstream.headers.items()
        if name in _COPIED or (name.startswith(_FLYWHEEL_PREFIX) and name != TENANT_HEADER.lower())
    }


def _problem(exc: httpx.HTTPError, timeout_s: float) -> ProblemError:
    """The problem of a call to the inference service that got no (whole) answer."""
    log.warning("call to the inference service failed: %r", exc)
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return ProblemError(
            503,
            "service-unavailable",
            "The inference service is unavailable; try again.",
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, httpx.TimeoutException):
        return ProblemError(
            504, "upstream-timeout", f"The inference service did not answer within {timeout_s:g} s."
        )
    return ProblemError(502, "upstream-error", "The inference service broke off its answer.")


async def _relay(upstream: httpx.Response, timeout_s: float) -> AsyncIterator[bytes]:
    """The event stream's bytes as they arrive. If the inference service breaks off or
    stalls, the stream ends with an error event (``data: {"error": ...}``), which OpenAI's
    clients raise as an ``APIError``."""
    tail = b"\n\n"  # the last bytes relayed: is the stream between two events?
    try:
        async for chunk in upstream.aiter_bytes():
            if chunk:
                tail = (tail + chunk)[-4:]
                yield chunk
    except httpx.HTTPError as exc:
        problem = _problem(exc, timeout_s)
        status = 502 if problem.status == 503 else problem.status
        event = json.dumps(error_body(problem.detail or "The stream broke off.", status))
        # An event cut in the middle is ended first, so the error is an event of its own.
        between = tail.endswith((b"\n\n", b"\r\n\r\n"))
        separator = b"" if between else b"\n\n"
        yield separator + f"data: {event}\n\n".encode()
    finally:
        # Shielded: when the client went away this task is being cancelled, and the
        # inference service must still see the connection close.
        await asyncio.shield(upstream.aclose())
