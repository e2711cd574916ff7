"""Wiring of the trainer service: settings -> runtime -> jobs, scheduler -> gRPC + consumer."""

from __future__ import annotations

import asyncio
from pathlib import Path

from flywheel.contracts.trainer.v1 import service_pb2_grpc
from flywheel.core.events.bus import EventRecord
from flywheel.core.events.consumer import run_consumer
from flywheel.core.events.topics import Topic
from flywheel.core.runtime import ServiceRuntime
from flywheel.trainer.config import TrainerSettings
from flywheel.trainer.grpc_api import TrainerServicer
from flywheel.trainer.jobs import AdapterStore, JobStore
from flywheel.trainer.scheduler import Scheduler
from flywheel.trainer.service import TrainerService

MIGRATIONS = Path(__file__).parent / "migrations" / "versions"
SERVICE_NAME = "flywheel.contracts.trainer.v1.TrainerService"
CONSUMER_GROUP = "trainer"


def build() -> ServiceRuntime:
    """The trainer service's runtime, configured from the environment."""
    settings = TrainerSettings()
    runtime = ServiceRuntime(settings, version_dirs=[MIGRATIONS])
    work_root = settings.resolved_work_dir()
    work_root.mkdir(parents=True, exist_ok=True)
    jobs = JobStore(runtime.sessions, on_commit=runtime.relay.wake)
    adapters = AdapterStore(runtime.sessions)
    scheduler = Scheduler(
        jobs, adapters, runtime.artifacts,
        work_root=work_root, artifacts_dir=settings.resolved_artifacts_dir,
        devices=settings.trainer_devices, checkpoint_every=settings.trainer_checkpoint_every_steps,
        poll_s=settings.trainer_poll_s,
        progress_event_interval_s=settings.trainer_progress_event_interval_s,
    )  # fmt: skip
    service = TrainerService(
        jobs, adapters, work_root=work_root,
        default_base_model=settings.trainer_default_base_model, wake_scheduler=scheduler.wake,
    )  # fmt: skip
    runtime.add_grpc_service(
        (service_pb2_grpc.add_TrainerServiceServicer_to_server, TrainerServicer(service)),
        SERVICE_NAME,
    )

    async def handle(records: list[EventRecord]) -> None:
        await service.apply(records)

    async def consume(stop: asyncio.Event) -> None:
        await run_consumer(runtime.bus, CONSUMER_GROUP, [Topic.TRAINING], handle, stop)

    runtime.add_task(consume)
    runtime.add_task(scheduler.run)
    return runtime
