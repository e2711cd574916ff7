"""The route class of every ``/v1`` endpoint: authenticate, check the body, honour
``Idempotency-Key``, then run the handler.

Order matters: an unauthenticated caller learns nothing about its body (401 first), and a
rate-limited one is stopped before anything is parsed or stored (429).
"""

from __future__ import annotations

import asyncio
import email.message
import hashlib
import json
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel

from flywheel.contracts.common.v1 import common_pb2
from flywheel.gateway.deps import resolve_principal
from flywheel.gateway.idempotency import REPLAYED_HEADERS, Claim, Fingerprint, Outcome
from flywheel.gateway.problems import (
    ProblemError,
    problem_for_exception,
    problem_response,
    problem_responses,
    renamer,
    validation_problem,
)
from flywheel.gateway.state import state_of

Handler = Callable[[Request], Coroutine[Any, Any, Response]]

IDEMPOTENCY_HEADER = "idempotency-key"
MAX_IDEMPOTENCY_KEY = 255


_IDEMPOTENCY_PARAMETER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Makes a retry safe: the same key with the same request replays the first "
    "response (`Idempotent-Replayed: true`) instead of running it again, for 24 hours per "
    "API key. Reused for a different request: 422; while the first still runs: 409.",
    "schema": {
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_IDEMPOTENCY_KEY,
        "pattern": "^[\\x20-\\x7e]+$",
    },
}


class GatewayRoute(APIRoute):
    """An authenticated route whose JSON bodies are checked before FastAPI parses them."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        if "POST" in (self.methods or ()):
            extra = dict(self.openapi_extra or {})
            extra["parameters"] = [*extra.get("parameters", []), _IDEMPOTENCY_PARAMETER]
            self.openapi_extra = extra

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()
        has_body = self.body_field is not None

        async def route(request: Request) -> Response:
            await resolve_principal(request)
            _check_parameters(request)
            if has_body:
                await _check_json_body(request)
            key = request.headers.get(IDEMPOTENCY_HEADER)
            if request.method == "POST" and key is not None:
                return await _idempotent(request, key, handler)
            return await handler(request)

        return route


def _check_parameters(request: Request) -> None:
    # PostgreSQL text cannot hold NUL; refuse it here rather than fail deep in a service.
    bad = [
        (name, "must not contain NUL characters")
        for name, value in [*request.query_params.multi_items(), *request.path_params.items()]
        if "\x00" in str(value)
    ]
    if bad:
        raise validation_problem(bad)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def _check_json_body(request: Request) -> None:
    """400 for a body that is not UTF-8 JSON, 415 for another media type, 422 for strings
    no service can store; the parsed body is left for FastAPI to validate."""
    body = await request.body()
    if not body:
        return
    content_type = request.headers.get("content-type")
    if not _is_json(content_type):
        raise ProblemError(
            415,
            "unsupported-media-type",
            f"Send the body as application/json (got {content_type or 'no Content-Type'}).",
        )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProblemError(
            400, "malformed-body", f"The body is not valid UTF-8 (byte {exc.start})."
        ) from exc
    try:
        parsed = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise ProblemError(400, "malformed-body", f"The body is not valid JSON: {exc}") from exc
    bad = list(_bad_strings(parsed, ""))
    if bad:
        raise validation_problem(bad)
    # FastAPI reads the body through Request.json(), which returns this cached value.
    request._json = parsed


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


def _bad_strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        if "\x00" in value:
            yield path or "body", "must not contain NUL characters"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            yield path or "body", "is not valid Unicode (unpaired surrogate escape)"
    elif isinstance(value, dict):
        for key, item in value.items():
            child = f"{path}.{key}" if path else str(key)
            yield from _bad_strings(key, child)
            yield from _bad_strings(item, child)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _bad_strings(item, f"{path}.{index}" if path else str(index))


def _check_key(key: str) -> None:
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY or not all(" " <= c <= "~" for c in key):
        raise validation_problem(
            [("Idempotency-Key", f"must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters")]
        )


async def _idempotent(request: Request, key: str, handler: Handler) -> Response:
    _check_key(key)
    principal = await resolve_principal(request)
    store = state_of(request).idempotency
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    fingerprint = Fingerprint(
        request.method, path, hashlib.sha256(await request.body()).hexdigest()
    )
    claim = await store.claim(principal.key_id, key, fingerprint)
    if claim.outcome is Outcome.REPLAY:
        return Response(
            claim.body,
            status_code=claim.status_code,
            headers={**claim.headers, "Idempotent-Replayed": "true"},
        )
    if claim.outcome is Outcome.MISMATCH:
        raise ProblemError(
            422,
            "idempotency-key-reused",
            "This Idempotency-Key was already used for a different request.",
            errors=validation_problem(
                [("Idempotency-Key", "already used with another method, path or body")]
            ).errors,
        )
    if claim.outcome is Outcome.IN_FLIGHT:
        raise ProblemError(
            409,
            "idempotency-key-in-flight",
            "A request with this Idempotency-Key is still being processed; retry later.",
            headers={"Retry-After": "1"},
        )
    return await _run_claimed(request, claim, handler)


async def _run_claimed(request: Request, claim: Claim, handler: Handler) -> Response:
    store = state_of(request).idempotency
    try:
        response = await handler(request)
    except Exception as exc:
        error = problem_for_exception(exc)
        if error is None or error.status >= 500:
            await asyncio.shield(store.release(claim))
            raise
        response = problem_response(request, error)
    except BaseException:
        await asyncio.shield(store.release(claim))
        raise
    body = getattr(response, "body", None)
    if response.status_code >= 500 or not isinstance(body, bytes):
        await asyncio.shield(store.release(claim))
        return response
    headers = {k: v for k, v in response.headers.items() if k in REPLAYED_HEADERS}
    await asyncio.shield(store.complete(claim, response.status_code, headers, body))
    return response


def v1_router(*, tags: list[str], extra_problems: tuple[int, ...] = ()) -> APIRouter:
    """A ``/v1`` router of :class:`GatewayRoute` routes, its common problems documented."""
    return APIRouter(
        prefix="/v1",
        tags=list(tags),
        route_class=GatewayRoute,
        responses=problem_responses(401, 403, 422, 429, 503, *extra_problems),
    )


def page_request(cursor: str | None, limit: int) -> common_pb2.PageRequest:
    """The protobuf page request of ``?cursor=&limit=``."""
    return common_pb2.PageRequest(page_size=limit, cursor=cursor or "")


def next_cursor(page: Any) -> str | None:
    """The REST ``next_cursor`` of a ``PageResponse`` (None on the last page)."""
    return page.next_cursor or None


page_fields = renamer({"page.cursor": "cursor", "page.page_size": "limit"})
"""Field renamer of list requests: the page's protobuf fields are query parameters."""


def json_response(
    model: BaseModel, *, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """``model`` as a JSON response, serialised once (FastAPI's response_model pass skipped:
    the model was validated when it was built)."""
    return Response(
        model.model_dump_json(),
        status_code=status_code,
        media_type="application/json",
        headers=headers,
    )
