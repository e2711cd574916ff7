"""Errors as RFC 9457 problem details (``application/problem+json``).

Every error the gateway answers with, whatever raised it (a handler, request validation,
Starlette's router, a service behind the gateway, an unexpected exception), leaves as one
:class:`Problem`. Field-level errors name the REST field, never the protobuf path.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from flywheel.core.errors import field_errors_of

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
# Problem types are URNs: stable identifiers that do not pretend to be a web page.
TYPE_PREFIX = "urn:flywheel:problem:"


class FieldProblem(BaseModel):
    """One invalid field of a request and what is wrong with it."""

    field: str = Field(
        description="Dotted path of the field in the request body (`preference.choice`, "
        "`generations.3.output`), or the name of a query parameter, path parameter or header."
    )
    message: str


class Problem(BaseModel):
    """An error response (RFC 9457)."""

    type: str = Field(description="URN naming the kind of problem, e.g. `urn:flywheel:problem:…`")
    title: str = Field(description="Short summary of the problem type.")
    status: int = Field(description="The HTTP status code.")
    detail: str | None = Field(None, description="What went wrong with this request.")
    instance: str | None = Field(None, description="The request path.")
    errors: list[FieldProblem] | None = Field(
        None, description="Each invalid field, for validation problems."
    )


@dataclass
class ProblemError(Exception):
    """Raised anywhere while serving a request; answered as a problem response."""

    status: int
    kind: str
    detail: str | None = None
    errors: list[FieldProblem] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    title: str | None = None

    def __str__(self) -> str:
        return f"{self.status} {self.kind}: {self.detail or ''}"


def validation_problem(
    errors: Iterable[tuple[str, str]], detail: str | None = None
) -> ProblemError:
    """A 422 naming each bad field."""
    items = [FieldProblem(field=f, message=m) for f, m in errors]
    return ProblemError(
        422, "validation-error", detail or "The request has invalid fields.", errors=items
    )


def problem_response(request: Request | None, error: ProblemError) -> Response:
    """The problem+json response of ``error``."""
    title = error.title or HTTPStatus(error.status).phrase
    problem = Problem(
        type=TYPE_PREFIX + error.kind,
        title=title,
        status=error.status,
        detail=error.detail,
        instance=request.url.path if request is not None else None,
        errors=error.errors or None,
    )
    return Response(
        problem.model_dump_json(exclude_none=True),
        status_code=error.status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=error.headers,
    )


def problem_bytes(status: int, kind: str, detail: str, instance: str) -> bytes:
    """A problem body for raw ASGI middleware, which has no Request."""
    problem = Problem(
        type=TYPE_PREFIX + kind,
        title=HTTPStatus(status).phrase,
        status=status,
        detail=detail,
        instance=instance,
    )
    return problem.model_dump_json(exclude_none=True).encode()


# --- request validation ---------------------------------------------------------------

_HEADER_NAMES = {"idempotency-key": "Idempotency-Key", "if-match": "If-Match"}


def _field_of(loc: Sequence[Any]) -> str:
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        where = parts.pop(0)
        if where == "header" and parts:
            return _HEADER_NAMES.get(str(parts[0]).lower(), str(parts[0]))
    if not parts:
        return "body"
    return ".".join(str(p) for p in parts)


def _validation_error(exc: RequestValidationError) -> ProblemError:
    raw = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in raw):
        return ProblemError(400, "malformed-body", "The request body is not valid JSON.")
    errors = []
    for error in raw:
        message = str(error.get("msg", "invalid"))
        if error.get("type") == "extra_forbidden":
            message = "This field is not allowed here (it is not part of the request)."
        errors.append((_field_of(error.get("loc", ())), message))
    return validation_problem(errors)


# --- gRPC statuses ----------------------------------------------------------------------

_GRPC_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.NOT_FOUND: (404, "not-found"),
    grpc.StatusCode.INVALID_ARGUMENT: (422, "validation-error"),
    grpc.StatusCode.OUT_OF_RANGE: (422, "validation-error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "already-exists"),
    grpc.StatusCode.FAILED_PRECONDITION: (409, "conflict"),
    grpc.StatusCode.ABORTED: (409, "conflict"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "forbidden"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "unauthenticated"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate-limited"),
    grpc.StatusCode.UNAVAILABLE: (503, "service-unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (503, "service-unavailable"),
    grpc.StatusCode.CANCELLED: (503, "service-unavailable"),
}

FieldRenamer = Callable[[str], str]

_INDEX = re.compile(r"\[(\d+)\]")


def normalise_path(path: str) -> str:
    """``generations[3].prompt`` -> ``generations.3.prompt``."""
    return _INDEX.sub(r".\1", path).strip(".")


def renamer(rules: Mapping[str, str], *, strip: str = "") -> FieldRenamer:
    """A field renamer from protobuf paths to REST paths.

    ``strip`` removes a leading protobuf component (``generation.``); then the longest rule
    whose key equals the path or a dotted prefix of it replaces that prefix (an empty
    replacement drops it).
    """
    ordered = sorted(rules.items(), key=lambda kv: -len(kv[0]))

    def rename(path: str) -> str:
        path = normalise_path(path)
        if strip and (path == strip or path.startswith(strip + ".")):
            path = path[len(strip) :].lstrip(".") or path
        for old, new in ordered:
            if path == old or path.startswith(old + "."):
                rest = path[len(old) :].lstrip(".")
                return ".".join(p for p in (new, rest) if p) or path
        return path

    return rename


def identity(path: str) -> str:
    """The default renamer: protobuf path and REST field agree, once indices are dotted."""
    return normalise_path(path)


def problem_from_rpc(error: grpc.aio.AioRpcError, rename: FieldRenamer = identity) -> ProblemError:
    """The problem a failed gRPC call becomes."""
    violations = [(e.field, e.message) for e in field_errors_of(error)]
    return problem_from_status(error.code(), error.details() or None, violations, rename)


def problem_from_status(
    code: grpc.StatusCode,
    detail: str | None,
    violations: Iterable[tuple[str, str]] = (),
    rename: FieldRenamer = identity,
) -> ProblemError:
    """The problem of a gRPC status (of a call, or of one item of a batch call)."""
    status, kind = _GRPC_STATUS.get(code, (502, "upstream-error"))
    if status == 422:
        errors = [(rename(f), m) for f, m in violations]
        if not errors:
            errors = [("body", detail or "invalid request")]
        return validation_problem(errors, detail)
    if status == 502:
        log.error("service behind the gateway failed: %s %s", code, detail)
        return ProblemError(502, kind, "A service behind the gateway failed.")
    if status == 503:
        return ProblemError(
            503,
            kind,
            "A service behind the gateway is unavailable; try again.",
            headers={"Retry-After": "1"},
        )
    return ProblemError(status, kind, detail)


# --- exception handlers -----------------------------------------------------------------


def problem_for_exception(exc: BaseException) -> ProblemError | None:
    """The problem an exception raised while serving a request maps to (None: unexpected)."""
    if isinstance(exc, ProblemError):
        return exc
    if isinstance(exc, RequestValidationError):
        return _validation_error(exc)
    if isinstance(exc, StarletteHTTPException):
        kinds = {404: "not-found", 405: "method-not-allowed", 400: "malformed-body"}
        detail = exc.detail if isinstance(exc.detail, str) else None
        return ProblemError(
            exc.status_code,
            kinds.get(exc.status_code, "http-error"),
            detail,
            headers=dict(exc.headers or {}),
        )
    if isinstance(exc, grpc.aio.AioRpcError):
        return problem_from_rpc(exc)
    return None


def install_problem_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` as problem+json."""

    async def known(request: Request, exc: Exception) -> Response:
        error = problem_for_exception(exc)
        if error is None:  # pragma: no cover - registered only for known types
            return await unexpected(request, exc)
        return problem_response(request, error)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.error("unexpected error serving %s %s", request.method, request.url.path, exc_info=exc)
        return problem_response(
            request, ProblemError(500, "internal-error", "An unexpected error occurred.")
        )

    for exc_type in (
        ProblemError,
        RequestValidationError,
        StarletteHTTPException,
        grpc.aio.AioRpcError,
    ):
        app.add_exception_handler(exc_type, known)
    app.add_exception_handler(Exception, unexpected)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries documenting problem+json answers."""
    descriptions = {
        400: "Malformed body: not UTF-8, not JSON",
        401: "Missing, unknown, revoked or expired API key",
        403: "The key's role may not do this",
        404: "No such object for this tenant",
        409: "Conflict with the object's state, or a request with this Idempotency-Key "
        "is still in flight",
        413: "Request body too large",
        415: "Body is not application/json",
        422: "Invalid fields (each named in `errors`), or an Idempotency-Key reused "
        "for a different request",
        429: "Rate limit of the API key exceeded (see Retry-After)",
        503: "A service behind the gateway is unavailable (see Retry-After)",
    }
    return {
        status: {
            "description": descriptions.get(status, HTTPStatus(status).phrase),
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for status in statuses
    }
