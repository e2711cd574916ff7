"""The OpenAI-compatible API of the caller's tenant: ``GET /v1/models``,
``POST /v1/chat/completions`` and ``POST /v1/completions``, relayed to the inference
service so that OpenAI's clients work against the gateway with a Flywheel API key."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute

from flywheel.gateway.deps import InferenceCallerDep, resolve_principal
from flywheel.gateway.problems import ProblemError, problem_for_exception
from flywheel.gateway.routes.inference.protocol import (
    CHAT_REQUEST,
    COMPLETION_REQUEST,
    error_response,
    error_responses,
    ok_response,
    request_body,
)
from flywheel.gateway.routes.inference.proxy import forward

# The gateway's check of JSON bodies (UTF-8, JSON, no NUL), shared with every /v1 route.
from flywheel.gateway.routing import _check_json_body as check_json_body

log = logging.getLogger(__name__)

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class InferenceRoute(APIRoute):
    """A route of the OpenAI-compatible API: authenticated and rate limited like every
    ``/v1`` route (401 first, then 429), its JSON body checked, but every error answered in
    OpenAI's envelope so OpenAI's clients raise the matching exception. No
    ``Idempotency-Key``: a completion is not replayed."""

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                await resolve_principal(request)
                if request.method == "POST":
                    await check_json_body(request)
                return await handler(request)
            except Exception as exc:
                error = problem_for_exception(exc)
                if error is None:
                    log.error(
                        "unexpected error serving %s %s",
                        request.method,
                        request.url.path,
                        exc_info=exc,
                    )
                    error = ProblemError(500, "internal-error", "An unexpected error occurred.")
                return error_response(error)

        return route


router = APIRouter(
    prefix="/v1",
    tags=["inference"],
    route_class=InferenceRoute,
    responses=error_responses(401, 403, 429, 502, 503, 504),
)

_ROLES = "Integrator or service keys (the key's own tenant)."
_MORE = "Fields, headers and errors: docs/api/inference.md."


@router.get(
    "/models",
    summary="List the models (OpenAI-compatible)",
    description=f"{_ROLES} What `model` may name for this tenant: the base model, each "
    'servable adapter version (`"name@version"`, with `parent` the base model and '
    '`parent_adapter` its parent version) and each alias (`"tenant/name"`). OpenAI\'s '
    "list shape (`object: list`, `data: [{id, object, created, owned_by, root, parent}]`).",
    responses=ok_response("The tenant's models", streams=False),
)
async def list_models(request: Request, caller: InferenceCallerDep) -> Response:
    return await forward(request, caller.tenant_id, "/v1/models")


@router.post(
    "/chat/completions",
    summary="Create a chat completion (OpenAI-compatible)",
    description=f"{_ROLES} OpenAI's chat completion, served by the base model, an adapter "
    "version or an alias (A/B arms, sticky per `user`); each choice is logged as a "
    "generation and carries its `generation_id`, and `served_by` says what answered. "
    "`stream: true` answers with server-sent events, relayed as they are generated. "
    f"Errors are OpenAI's envelope `{{error: {{message, type, param, code}}}}`. {_MORE}",
    openapi_extra=request_body(CHAT_REQUEST),
    responses=ok_response("The completion (or its event stream)", streams=True)
    | error_responses(400, 404, 409, 415),
)
async def chat_completions(request: Request, caller: InferenceCallerDep) -> Response:
    return await forward(request, caller.tenant_id, "/v1/chat/completions")


@router.post(
    "/completions",
    summary="Create a text completion (OpenAI-compatible)",
    description=f"{_ROLES} OpenAI's (legacy) text completion of one prompt, routed, logged "
    "and streamed like chat completions. "
    f"Errors are OpenAI's envelope `{{error: {{message, type, param, code}}}}`. {_MORE}",
    openapi_extra=request_body(COMPLETION_REQUEST),
    responses=ok_response("The completion (or its event stream)", streams=True)
    | error_responses(400, 404, 409, 415),
)
async def completions(request: Request, caller: InferenceCallerDep) -> Response:
    return await forward(request, caller.tenant_id, "/v1/completions")
