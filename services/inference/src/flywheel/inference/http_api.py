"""The inference service's OpenAI-compatible HTTP API (what the gateway proxies).

Same paths and bodies as OpenAI's and vLLM's, so the official client, LangChain and
CrewAI work unchanged. The caller's tenant comes in the ``X-Flywheel-Tenant`` header,
which only the gateway sets (this API is not exposed directly); the end user is OpenAI's
``user`` field, and Flywheel's optional ``task`` and ``metadata`` fields are logged with
each generation. Every response adds ``served_by`` (base model, adapter version, alias,
traffic arm, replica) and a ``generation_id`` per choice, for attaching feedback.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from flywheel.core.errors import Conflict, DomainError, InvalidArgument, NotFound
from flywheel.inference.engine_client import EngineError
from flywheel.inference.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    now,
    validation_problem,
)
from flywheel.inference.service import Caller, InferenceService

TENANT_HEADER = "X-Flywheel-Tenant"
_STATUS = {NotFound: (404, "NotFoundError"), InvalidArgument: (400, "BadRequestError"),
           Conflict: (409, "ConflictError")}  # fmt: skip


def _error(message: str, status: int, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, status, param), status_code=status)


def _domain_error(error: DomainError) -> JSONResponse:
    status, kind = next(
        (v for cls, v in _STATUS.items() if isinstance(error, cls)), (400, "BadRequestError")
    )
    return _error(error.message, status, kind)


def _engine_error(error: EngineError) -> JSONResponse:
    if 400 <= error.status < 500:
        kind = "NotFoundError" if error.status == 404 else "BadRequestError"
        return _error(str(error), error.status, kind)
    return _error(f"the engine failed: {error}", 502, "ServiceUnavailableError")


def build_app(service: InferenceService) -> FastAPI:
    """The HTTP app over ``service``."""
    app = FastAPI(title="Flywheel inference", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return _validation_error(error.errors())

    @app.get("/health")
    async def health() -> Response:
        """200 once this replica restored its adapters and its engine answers; else 503."""
        if service.ready and await service.engine.healthy():
            return Response(status_code=200)
        return Response(status_code=503)

    @app.get("/v1/models")
    async def models(tenant: str = Header(alias=TENANT_HEADER)) -> dict[str, Any]:
        """The base model, the tenant's servable adapters ("name@version") and aliases."""
        return {"object": "list", "data": await service.model_cards(tenant, now())}

    async def serve(request: Request, path: str, model: type[BaseModel], tenant: str) -> Response:
        try:
            raw = await request.json()
        except ValueError:
            return _error("the body is not JSON", 400, "BadRequestError")
        try:
            parsed = model.model_validate(raw)
        except ValidationError as error:
            return _validation_error(error.errors())
        body: dict[str, Any] = raw
        caller = Caller(
            tenant_id=tenant,
            user_id=getattr(parsed, "user", None),
            task=body.get("task") if isinstance(body.get("task"), str) else None,
            metadata=body["metadata"] if isinstance(body.get("metadata"), dict) else {},
            skip_logging=body.get("skip_logging") is True,
        )
        try:
            if body.get("stream"):
                route, ids, payloads = await service.stream(caller, path, body)
                headers = _headers(route.served_by(service.replica), ids)
                return StreamingResponse(
                    _sse(payloads), media_type="text/event-stream", headers=headers
                )
            served = await service.complete(caller, path, body)
        except DomainError as error:
            return _domain_error(error)
        except EngineError as error:
            return _engine_error(error)
        headers = _headers(served.body["served_by"], served.generation_ids)
        return JSONResponse(served.body, headers=headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(
        request: Request, tenant: str = Header(alias=TENANT_HEADER)
    ) -> Response:
        """OpenAI chat completions (``stream``, ``n``, ``response_format``, ...)."""
        return await serve(request, "/v1/chat/completions", ChatCompletionRequest, tenant)

    @app.post("/v1/completions")
    async def completions(request: Request, tenant: str = Header(alias=TENANT_HEADER)) -> Response:
        """OpenAI text completions."""
        return await serve(request, "/v1/completions", CompletionRequest, tenant)

    return app


def _validation_error(errors: Any) -> JSONResponse:
    message, param, kind = validation_problem(errors)
    if kind == "missing" and (param or "").lower().endswith(TENANT_HEADER.lower()):
        return _error(f"{TENANT_HEADER} header is required", 401, "AuthenticationError")
    return _error(message, 400, "BadRequestError", param)


def _headers(served_by: dict[str, Any], ids: list[str]) -> dict[str, str]:
    adapter = served_by.get("adapter")
    headers = {"X-Flywheel-Generation-Ids": ",".join(ids)}
    if adapter:
        headers["X-Flywheel-Adapter"] = f"{adapter['name']}@{adapter['version']}"
    if served_by.get("alias"):
        headers["X-Flywheel-Alias"] = str(served_by["alias"])
        headers["X-Flywheel-Traffic-Arm"] = str(served_by.get("traffic_arm") or "")
    return headers


async def _sse(payloads: AsyncIterator[str]) -> AsyncIterator[str]:
    async for payload in payloads:
        yield f"data: {payload}\n\n"
