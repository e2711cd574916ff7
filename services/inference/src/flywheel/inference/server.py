"""Wiring of the inference service: settings -> engine, stores, loader -> HTTP + gRPC + events.

Start-up order matters: the engine must answer, then the registry's routable adapters are
restored onto it, and only then does ``/health`` report ready and the adapter events of
this replica's own consumer group (every replica gets every event) start to apply.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import uvicorn

from flywheel.contracts.inference.v1 import service_pb2_grpc
from flywheel.core.events.bus import EventRecord
from flywheel.core.events.consumer import run_consumer
from flywheel.core.events.topics import Topic
from flywheel.core.runtime import ServiceRuntime
from flywheel.inference.aliases import AliasStore
from flywheel.inference.config import InferenceSettings
from flywheel.inference.engine_client import EngineClient
from flywheel.inference.engine_process import engine_command, free_port, run_engine, wait_healthy
from flywheel.inference.generation_log import GenerationLog, GenerationRelay, feedback_sender
from flywheel.inference.grpc_api import SERVICE_NAME, InferenceServicer
from flywheel.inference.hotload import AdapterLoader
from flywheel.inference.http_api import build_app
from flywheel.inference.registry import AdapterRegistry
from flywheel.inference.service import InferenceService
from flywheel.inference.validation import BaseModelFacts

MIGRATIONS = Path(__file__).parent / "migrations" / "versions"
ENGINE_START_S = 600.0


def build() -> ServiceRuntime:
    """The inference service's runtime, configured from the environment."""
    # One line per engine call at INFO would drown the service's own log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = InferenceSettings()
    if not settings.inference_base_model:
        raise SystemExit("FLYWHEEL_INFERENCE_BASE_MODEL is required (the base model folder)")
    runtime = ServiceRuntime(settings, version_dirs=[MIGRATIONS])
    runtime.defer_readiness()  # SERVING once the engine runs and adapters are restored
    base_id = settings.base_model_id()
    cache_dir = settings.resolved_cache_dir()
    engine_port = settings.inference_engine_port or free_port()
    engine_url = settings.inference_engine_url or f"http://127.0.0.1:{engine_port}"
    engine = EngineClient(engine_url)
    registry = AdapterRegistry(runtime.sessions, on_commit=runtime.relay.wake)
    aliases = AliasStore(runtime.sessions, on_commit=runtime.relay.wake)
    base = BaseModelFacts.from_model_folder(Path(settings.inference_base_model), base_id)
    loader = AdapterLoader(
        engine, runtime.artifacts, registry, base, cache_dir,
        max_rank=settings.inference_max_lora_rank,
        max_loaded=settings.inference_max_loaded_adapters,
    )  # fmt: skip
    # Reconnect within seconds of the feedback service coming back (gRPC waits up to 2 min).
    feedback = grpc.aio.insecure_channel(
        settings.feedback_address(), options=[("grpc.max_reconnect_backoff_ms", 5000)]
    )
    relay = GenerationRelay(runtime.sessions, feedback_sender(feedback))
    generation_log = GenerationLog(runtime.sessions, on_commit=relay.wake)
    service = InferenceService(
        engine, loader, registry, aliases, generation_log,
        base_model=base_id, replica=settings.inference_replica_id,
    )  # fmt: skip
    runtime.add_task(relay.run)
    runtime.add_grpc_service(
        (service_pb2_grpc.add_InferenceServiceServicer_to_server, InferenceServicer(service)),
        SERVICE_NAME,
    )

    if not settings.inference_engine_url:
        command = engine_command(
            settings.inference_base_model, base_id, engine_port,
            max_loras=settings.inference_max_loras,
            max_lora_rank=settings.inference_max_lora_rank,
            max_num_seqs=settings.inference_max_num_seqs,
        )  # fmt: skip
        log_path = cache_dir / "engine.log"

        async def engine_task(stop: asyncio.Event) -> None:
            await run_engine(command, log_path, stop)

        runtime.add_task(engine_task)

    async def handle(records: list[EventRecord]) -> None:
        await service.apply(records)

    async def serve(stop: asyncio.Event) -> None:
        server = uvicorn.Server(
            uvicorn.Config(
                build_app(service), host=settings.host, port=settings.http_port,
                log_level="warning", lifespan="off",
            )
        )  # fmt: skip
        http = asyncio.create_task(server.serve())
        try:
            await wait_healthy(engine, ENGINE_START_S)
            await service.start()
            await runtime.mark_ready()
            group = f"inference-{settings.inference_replica_id}"
            await run_consumer(runtime.bus, group, [Topic.ADAPTERS], handle, stop)
        finally:
            server.should_exit = True
            await http
            await engine.close()
            await feedback.close()

    runtime.add_task(serve)
    return runtime
