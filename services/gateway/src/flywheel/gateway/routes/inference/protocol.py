"""OpenAI's error envelope, and the OpenAPI description of the bodies the gateway relays.

The gateway does not parse these bodies (the inference service does, and answers in
OpenAI's shapes); the schemas below only document them.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from fastapi.responses import Response
from pydantic import BaseModel, Field

from flywheel.gateway.problems import ProblemError

# The exception class names of the official client, as the inference service (and vLLM)
# put them in `type`.
ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    409: "ConflictError",
    429: "RateLimitError",
    500: "InternalServerError",
}
UNAVAILABLE = "ServiceUnavailableError"


class OpenAIErrorDetail(BaseModel):
    """What went wrong."""

    message: str
    type: str = Field(description="Error class, e.g. `BadRequestError`, `NotFoundError`.")
    param: str | None = Field(None, description="The request field at fault, when one is.")
    code: int | str | None = Field(None, description="The HTTP status.")


class OpenAIError(BaseModel):
    """An error of the OpenAI-compatible endpoints, in OpenAI's envelope."""

    error: OpenAIErrorDetail


def error_type(status: int) -> str:
    """The `type` of an error with HTTP ``status``."""
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    if status >= 502:
        return UNAVAILABLE
    return "BadRequestError" if status < 500 else "InternalServerError"


def error_body(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error envelope."""
    return {
        "error": {"message": message, "type": error_type(status), "param": param, "code": status}
    }


def error_response(error: ProblemError) -> Response:
    """The gateway's own ``error`` (bad key, role, rate limit, body, unreachable service) in
    OpenAI's envelope, its headers (`Retry-After`, `WWW-Authenticate`) kept. Invalid fields
    (a 422 elsewhere in `/v1`) are a 400 here, as OpenAI answers them."""
    status = 400 if error.status == 422 else error.status
    message = error.detail or error.title or HTTPStatus(status).phrase
    param = None
    if error.errors:
        first = error.errors[0]
        param = first.field
        message = "; ".join(f"{e.field}: {e.message}" for e in error.errors)
    return Response(
        json.dumps(error_body(message, status, param)),
        status_code=status,
        media_type="application/json",
        headers=error.headers,
    )


def is_error_envelope(body: bytes) -> bool:
    """Whether ``body`` is already an OpenAI error envelope."""
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return isinstance(parsed, dict) and isinstance(parsed.get("error"), dict)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries of errors in OpenAI's envelope."""
    descriptions = {
        400: "Invalid request: not JSON, an unsupported option, a bad field (`param`), or "
        "a `model` that is not a model name",
        401: "Missing, unknown, revoked or expired API key",
        403: "The key's role may not call the models",
        404: "No such adapter version or alias for this tenant",
        409: "The adapter version is not servable (e.g. rejected or retired)",
        413: "Request body too large (a problem+json answer, before routing)",
        415: "Body is not application/json",
        429: "Rate limit of the API key exceeded (see Retry-After)",
        502: "The inference service or its engine failed",
        503: "The inference service is unreachable (see Retry-After)",
        504: "The inference service did not answer in time",
    }
    return {
        status: {
            "description": descriptions.get(status, HTTPStatus(status).phrase),
            "model": OpenAIError,
        }
        for status in statuses
    }


# --- request and response bodies, for the OpenAPI description only ---------------------

_NUMBER = {"type": "number"}
_SAMPLING: dict[str, Any] = {
    "model": {
        "type": "string",
        "description": 'The base model id, an adapter version "name@version", or an alias '
        '("tenant/name", or a bare name under the caller\'s tenant).',
    },
    "n": {"type": "integer", "minimum": 1, "maximum": 16, "default": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": -1},
    "max_tokens": {"type": "integer", "minimum": 1},
    "stop": {
        "oneOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        ]
    },
    "seed": {"type": "integer"},
    "presence_penalty": {**_NUMBER, "minimum": -2, "maximum": 2, "default": 0},
    "frequency_penalty": {**_NUMBER, "minimum": -2, "maximum": 2, "default": 0},
    "repetition_penalty": {**_NUMBER, "exclusiveMinimum": 0, "maximum": 2, "default": 1},
    "stream": {"type": "boolean", "default": False},
    "stream_options": {
        "type": "object",
        "properties": {"include_usage": {"type": "boolean", "default": False}},
    },
    "response_format": {
        "type": "object",
        "description": '`{"type": "json_object"}` or `{"type": "json_schema", "json_schema": '
        '{"name", "schema", "strict"}}` (constrained decoding), or `{"type": "text"}`.',
    },
    "user": {
        "type": "string",
        "description": "The end user: logged with each generation, and keeps a user in one "
        "arm of a sticky A/B alias.",
    },
    "task": {
        "type": "string",
        "description": "Flywheel: the task type the generations are logged under.",
    },
    "metadata": {
        "type": "object",
        "description": "Flywheel: free JSON logged with each generation.",
    },
    "skip_logging": {
        "type": "boolean",
        "default": False,
        "description": "Flywheel: do not log these generations (no `generation_id`).",
    },
}

CHAT_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["model", "messages"],
    "additionalProperties": True,
    "properties": {
        **_SAMPLING,
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role"],
                "properties": {
                    "role": {
                        "type": "string",
                        "enum": ["system", "developer", "user", "assistant", "tool"],
                    },
                    "content": {
                        "description": "Text, or a list of `{type: text, text}` parts.",
                        "oneOf": [
                            {"type": "string"},
                            {"type": "array", "items": {"type": "object"}},
                            {"type": "null"},
                        ],
                    },
                },
            },
        },
        "max_completion_tokens": {"type": "integer", "minimum": 1},
    },
}

COMPLETION_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["model", "prompt"],
    "additionalProperties": True,
    "properties": {
        **_SAMPLING,
        "prompt": {
            "description": "One prompt: a string, a one-string list, or token ids.",
            "oneOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
                {"type": "array", "items": {"type": "integer"}},
            ],
        },
    },
}


def request_body(schema: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` documenting a relayed JSON request body."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema}},
        }
    }


def ok_response(description: str, *, streams: bool) -> dict[int | str, dict[str, Any]]:
    """The 200 of a relayed answer: JSON, or server-sent events when it streams."""
    content: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
    if streams:
        content["text/event-stream"] = {
            "schema": {
                "type": "string",
                "description": "`data: <chunk JSON>` events, ending with `data: [DONE]`.",
            }
        }
    return {200: {"description": description, "content": content}}
