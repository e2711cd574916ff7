"""Domain errors every service raises, and how they travel over gRPC.

Domain code raises these; the transport layer maps them to a status code (gRPC here, HTTP in
the gateway). Field-level validation errors travel in the trailing metadata key
``flywheel-field-errors`` as JSON, so the gateway can name the offending field.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

FIELD_ERRORS_KEY = "flywheel-field-errors"


@dataclass(frozen=True, slots=True)
class FieldError:
    """One invalid field: a dotted path into the request (``value.rating``) and why."""

    field: str
    message: str


class DomainError(Exception):
    """Base of the errors a caller can act on; never a 500."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(DomainError):
    """The object does not exist for this tenant (also what another tenant's ids get)."""

    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, kind: str, ident: str) -> None:
        super().__init__(f"{kind} {ident!r} not found")
        self.kind = kind
        self.ident = ident


class InvalidArgument(DomainError):
    """The request is malformed; ``errors`` names each bad field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, errors: Sequence[FieldError] | FieldError) -> None:
        self.errors = [errors] if isinstance(errors, FieldError) else list(errors)
        super().__init__("; ".join(f"{e.field}: {e.message}" for e in self.errors))


class AlreadyExists(DomainError):
    """An object with this identity already exists."""

    code = grpc.StatusCode.ALREADY_EXISTS


class Conflict(DomainError):
    """The object's state does not allow this (e.g. editing a retracted feedback)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(DomainError):
    """The caller's role may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(DomainError):
    """No valid credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED


async def abort_with(context: Any, error: DomainError) -> None:
    """End the current RPC with ``error``'s status, message and field errors."""
    if isinstance(error, InvalidArgument):
        payload = json.dumps([{"field": e.field, "message": e.message} for e in error.errors])
        context.set_trailing_metadata(((FIELD_ERRORS_KEY, payload),))
    await context.abort(error.code, error.message)


def field_errors_of(error: grpc.aio.AioRpcError) -> list[FieldError]:
    """The field errors an INVALID_ARGUMENT status carries (empty if none)."""
    for key, value in error.trailing_metadata() or ():
        if key == FIELD_ERRORS_KEY:
            return [FieldError(e["field"], e["message"]) for e in json.loads(value)]
    return []
