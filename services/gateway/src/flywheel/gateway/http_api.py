"""The gateway's REST surface (FastAPI): liveness and readiness for now."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from flywheel.core.rpc import check_health
from flywheel.gateway.config import GatewaySettings


def create_app(settings: GatewaySettings) -> FastAPI:
    """The gateway's ASGI app."""
    app = FastAPI(
        title="Flywheel gateway",
        version="0.1.0",
        description="REST API of Flywheel, the closed-loop RLHF platform.",
    )
    app.state.settings = settings

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

    return app
