"""What the gateway holds while it runs, reached from handlers through ``app.state``."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncEngine

from flywheel.core.db import SessionFactory, create_engine, session_factory
from flywheel.core.migrations import upgrade
from flywheel.gateway.auth import Authenticator
from flywheel.gateway.batching import FeedbackRecorder
from flywheel.gateway.config import GatewaySettings
from flywheel.gateway.idempotency import IdempotencyStore
from flywheel.gateway.ratelimit import TokenBuckets
from flywheel.gateway.upstream import Upstreams

MIGRATIONS_DIR = Path(__file__).parent / "migrations" / "versions"

# Connections to the inference service: a streamed completion holds one for its whole
# length, so many may be open at once; past the cap, requests wait (up to the connect
# deadline) for one to free up, then get 503.
INFERENCE_MAX_CONNECTIONS = 1024
INFERENCE_KEEPALIVE_CONNECTIONS = 128


def inference_client(settings: GatewaySettings) -> httpx.AsyncClient:
    """The HTTP client of the inference service's OpenAI API, shared by every request."""
    return httpx.AsyncClient(
        base_url=settings.inference_url,
        timeout=httpx.Timeout(
            settings.inference_timeout_s,
            connect=settings.upstream_timeout_s,
            pool=settings.upstream_timeout_s,
        ),
        limits=httpx.Limits(
            max_connections=INFERENCE_MAX_CONNECTIONS,
            max_keepalive_connections=INFERENCE_KEEPALIVE_CONNECTIONS,
        ),
        # An internal address: never through the environment's HTTP proxy.
        trust_env=False,
    )


@dataclass
class GatewayState:
    """Channels to the services, key cache, rate limits, the idempotency store and the
    HTTP client of the inference service's OpenAI API."""

    settings: GatewaySettings
    upstreams: Upstreams
    authenticator: Authenticator
    limits: TokenBuckets
    idempotency: IdempotencyStore
    recorder: FeedbackRecorder
    inference_http: httpx.AsyncClient
    _engine: AsyncEngine | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    async def start(
        cls, settings: GatewaySettings, sessions: SessionFactory | None = None
    ) -> GatewayState:
        """Open the channels and, unless ``sessions`` is given, the database (migrated)."""
        engine = None
        if sessions is None:
            engine = create_engine(settings.resolved_database_url, schema=settings.resolved_schema)
            await upgrade(engine, settings.resolved_schema, [MIGRATIONS_DIR])
            sessions = session_factory(engine)
        upstreams = Upstreams(settings.upstreams)
        state = cls(
            settings=settings,
            upstreams=upstreams,
            authenticator=Authenticator(
                upstreams.stub("feedback"),
                ttl_s=settings.auth_cache_ttl_s,
                max_entries=settings.auth_cache_size,
                timeout_s=settings.upstream_timeout_s,
            ),
            limits=TokenBuckets(settings.rate_limit_per_s, settings.rate_limit_burst),
            idempotency=IdempotencyStore(
                sessions,
                ttl_s=settings.idempotency_ttl_s,
                lock_timeout_s=settings.idempotency_lock_timeout_s,
            ),
            recorder=FeedbackRecorder(
                upstreams.stub("feedback"),
                timeout_s=settings.upstream_timeout_s,
                max_items=settings.feedback_batch_max_items,
                concurrency=settings.feedback_batch_concurrency,
            ),
            inference_http=inference_client(settings),
            _engine=engine,
        )
        state._tasks.append(asyncio.create_task(state.idempotency.prune_forever(state._stop)))
        return state

    async def close(self) -> None:
        """Stop background work, close the channels, the inference client and any database
        this state opened."""
        self._stop.set()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.recorder.close()
        await self.upstreams.close()
        await self.inference_http.aclose()
        if self._engine is not None:
            await self._engine.dispose()


def state_of(request: Request) -> GatewayState:
    """The running gateway's state."""
    state: GatewayState = request.app.state.gateway
    return state
