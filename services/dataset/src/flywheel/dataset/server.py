"""Wiring of the dataset service: settings -> runtime -> domain -> gRPC + feedback consumer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from flywheel.contracts.dataset.v1 import service_pb2_grpc
from flywheel.core.events.bus import EventRecord
from flywheel.core.events.consumer import run_consumer
from flywheel.core.events.topics import Topic
from flywheel.core.runtime import ServiceRuntime
from flywheel.dataset.config import DatasetSettings
from flywheel.dataset.grpc_api import DatasetServicer
from flywheel.dataset.ledger import CONSUMER_GROUP
from flywheel.dataset.policy import PolicyDefaults
from flywheel.dataset.service import POLICY_FAILURES, DatasetService

MIGRATIONS = Path(__file__).parent / "migrations" / "versions"
SERVICE_NAME = "flywheel.contracts.dataset.v1.DatasetService"

log = logging.getLogger(__name__)


def build() -> ServiceRuntime:
    """The dataset service's runtime, configured from the environment."""
    settings = DatasetSettings()
    runtime = ServiceRuntime(settings, version_dirs=[MIGRATIONS])
    service = DatasetService(
        runtime.sessions,
        runtime.artifacts,
        build_defaults=settings.build_defaults(),
        policy_defaults=PolicyDefaults(
            enabled=settings.policy_enabled,
            min_new_examples=settings.policy_min_new_examples,
            max_interval_s=settings.policy_max_interval_s,
            cooldown_s=settings.policy_cooldown_s,
            min_preference_pairs=settings.policy_min_preference_pairs,
            base_model=settings.policy_base_model,
        ),
        tokenizer_roots=[*settings.dataset_tokenizer_dirs, settings.resolved_artifacts_dir],
        on_commit=runtime.relay.wake,
    )
    runtime.add_grpc_service(
        (service_pb2_grpc.add_DatasetServiceServicer_to_server, DatasetServicer(service)),
        SERVICE_NAME,
    )

    async def handle(records: list[EventRecord]) -> None:
        await service.apply(records)

    async def consume(stop: asyncio.Event) -> None:
        await run_consumer(runtime.bus, CONSUMER_GROUP, [Topic.FEEDBACK], handle, stop)

    async def tick(stop: asyncio.Event) -> None:
        # Policies that fire by time alone need a clock, not only arriving events.
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), settings.policy_tick_s)
            if stop.is_set():
                return
            for tenant_id, task in await service.scopes_with_intervals():
                try:
                    await service.evaluate_policy(tenant_id, task)
                except Exception:
                    POLICY_FAILURES.inc()
                    log.exception("trigger policy of %s/%s failed", tenant_id, task)

    runtime.add_task(consume)
    runtime.add_task(tick)
    return runtime
