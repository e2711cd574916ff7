"""Settings of the inference service (environment variables `FLYWHEEL_*`)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import Field

from flywheel.core.config import ServiceSettings


class InferenceSettings(ServiceSettings):
    """The inference service's settings; defaults give it its own ports on one machine."""

    service_name: str = "inference"
    grpc_port: int = 50055
    metrics_port: int = 9105
    http_port: int = Field(8105, ge=0, le=65535, description="OpenAI-compatible HTTP API.")
    inference_engine_url: str | None = Field(
        None,
        description="URL of a running engine speaking vLLM's HTTP API (`vllm serve ... "
        "--enable-lora` with runtime LoRA updating). Unset: the service starts Flywheel's CPU "
        "engine itself on inference_base_model.",
    )
    inference_base_model: str | None = Field(
        None,
        description="Base model folder the engine serves (the CPU engine loads it; adapters "
        "are validated against its config.json). Required.",
    )
    inference_base_model_id: str | None = Field(
        None,
        description="Name of the base model in `model` fields and adapter manifests. "
        "Default: inference_base_model as given.",
    )
    inference_engine_port: int = Field(0, ge=0, le=65535, description="CPU engine port; 0: any.")
    inference_max_loras: int = Field(8, ge=1, description="Adapters in one engine batch.")
    inference_max_lora_rank: int = Field(64, ge=1, description="Largest adapter rank accepted.")
    inference_max_loaded_adapters: int = Field(
        32, ge=1, description="Adapters kept loaded per replica; least recently used unloaded."
    )
    inference_max_num_seqs: int = Field(16, ge=1, description="Sequences in one engine batch.")
    upstreams: dict[str, str] = Field(
        default_factory=lambda: {"feedback": "127.0.0.1:50052"},
        description='gRPC host:port per service, as JSON ({"feedback": "host:port"}): the '
        "feedback service receives the generation log.",
    )
    inference_replica_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        description="This replica's name: its own consumer group on the adapters topic, so "
        "every replica gets every adapter event.",
    )
    inference_cache_dir: Path | None = Field(
        None, description="Local copies of adapters for the engine. Default: data_dir/inference."
    )

    def resolved_cache_dir(self) -> Path:
        """Where adapter files are fetched to (the engine reads them from here)."""
        return self.inference_cache_dir or self.data_dir / "inference"

    def feedback_address(self) -> str:
        """Where the generation log goes."""
        return self.upstreams.get("feedback", "127.0.0.1:50052")

    def base_model_id(self) -> str:
        """The base model's public name."""
        return self.inference_base_model_id or self.inference_base_model or "base"
