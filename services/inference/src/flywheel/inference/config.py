"""Settings of the inference service (environment variables `FLYWHEEL_*`)."""

from __future__ import annotations

from flywheel.core.config import ServiceSettings


class InferenceSettings(ServiceSettings):
    """The inference service's settings; defaults give it its own ports on one machine."""

    service_name: str = "inference"
    grpc_port: int = 50055
    metrics_port: int = 9105
