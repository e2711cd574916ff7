"""The gateway's REST surface (FastAPI): `/v1` over gRPC, liveness and readiness."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.middleware.cors import CORSMiddleware

from flywheel.core.db import SessionFactory
from flywheel.core.rpc import check_health
from flywheel.gateway.config import GatewaySettings
from flywheel.gateway.deps import ROLES_TABLE
from flywheel.gateway.middleware import BodyLimitMiddleware, MetricsMiddleware
from flywheel.gateway.problems import Problem, install_problem_handlers
from flywheel.gateway.routes.admin.router import router as admin_router
from flywheel.gateway.routes.catalog.router import router as catalog_router
from flywheel.gateway.routes.datasets.router import router as datasets_router
from flywheel.gateway.routes.feedback.router import router as feedback_router
from flywheel.gateway.routes.generations.router import router as generations_router
from flywheel.gateway.routes.inference.router import router as inference_router
from flywheel.gateway.routes.training.router import router as training_router
from flywheel.gateway.state import GatewayState

DESCRIPTION = f"""REST API of Flywheel, the closed-loop RLHF platform.

**Authentication.** Every `/v1` endpoint takes an API key, as `Authorization: Bearer <key>`
or `X-API-Key: <key>`. The key decides the tenant: no request names its tenant, and
another tenant's ids answer 404 exactly like ids that do not exist. A verified key is
cached for `FLYWHEEL_AUTH_CACHE_TTL_S` (30 s), so a revoked key may keep working on a
gateway replica for up to that long.

**Roles.** A key has exactly one.

{ROLES_TABLE}

**Errors** are RFC 9457 problem details (`application/problem+json`) with `type`, `title`,
`status`, `detail`, `instance` and, for invalid fields, `errors: [{{field, message}}]`.
Unknown body fields (`tenant_id`, `role`, server-assigned ids) are rejected, naming the field.

**Models (OpenAI-compatible).** `GET /v1/models`, `POST /v1/chat/completions` and
`POST /v1/completions` relay the inference service's OpenAI API under the key's tenant, so
OpenAI's clients work with `base_url` set to the gateway's `/v1` and a Flywheel API key as
`api_key`. Their bodies and errors are OpenAI's (`{{"error": {{message, type, param, code}}}}`),
and they ignore `Idempotency-Key`.

**Retries.** Send `Idempotency-Key: <unique string>` with any POST (but the models'):
retrying with the same key and request replays the first response (header
`Idempotent-Replayed: true`) without doing it twice; the same key with a different
request is a 422, and a retry while the first is still running a 409. Keys are kept
24 hours, per API key.

**Limits.** Bodies over `FLYWHEEL_MAX_BODY_BYTES` (1 MiB) get 413; each API key may make
`FLYWHEEL_RATE_LIMIT_BURST` requests at once and `FLYWHEEL_RATE_LIMIT_PER_S` per second
sustained, beyond which it gets 429 with `Retry-After`.
"""


def create_app(settings: GatewaySettings, *, sessions: SessionFactory | None = None) -> FastAPI:
    """The gateway's ASGI app.

    ``sessions`` is the gateway's database (the runtime's, already migrated); without it
    the app opens and migrates the database of ``settings`` itself when it starts.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await GatewayState.start(settings, sessions)
        app.state.gateway = state
        try:
            yield
        finally:
            await state.close()

    app = FastAPI(
        title="Flywheel gateway",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_problem_handlers(app)

    @app.get("/healthz", tags=["health"], summary="Liveness: the gateway process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        summary="Readiness: every service behind the gateway reports SERVING",
        responses={503: {"description": "At least one service is not serving"}},
    )
    async def readyz() -> JSONResponse:
        names = list(settings.upstreams)
        statuses = await asyncio.gather(*(check_health(settings.upstreams[n]) for n in names))
        services: dict[str, Any] = dict(zip(names, statuses, strict=True))
        ready = all(status == "SERVING" for status in statuses)
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "services": services},
            status_code=200 if ready else 503,
        )

    routers = (
        admin_router,
        catalog_router,
        generations_router,
        inference_router,
        feedback_router,
        datasets_router,
        training_router,
    )
    for router in routers:
        app.include_router(router)
    routes = [*app.routes, *(route for router in routers for route in router.routes)]

    # Added innermost first: metrics see every answer, CORS headers go on errors too.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.cors_allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_allowed_origins,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=[
                "Authorization",
                "X-API-Key",
                "Content-Type",
                "Idempotency-Key",
                "If-Match",
            ],
            expose_headers=[
                "ETag",
                "Location",
                "Retry-After",
                "Idempotent-Replayed",
                "X-Content-SHA256",
                "X-Row-Count",
                "Content-Disposition",
                "X-Flywheel-Generation-Ids",
                "X-Flywheel-Adapter",
                "X-Flywheel-Alias",
                "X-Flywheel-Traffic-Arm",
            ],
            max_age=600,
        )
    app.add_middleware(MetricsMiddleware, routes=routes)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
                tags=app.openapi_tags,
            )
            # Problem is referenced by every error response but is no route's model.
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components["Problem"] = Problem.model_json_schema(
                ref_template="#/components/schemas/{model}"
            )
            for name, sub in components["Problem"].pop("$defs", {}).items():
                components.setdefault(name, sub)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
