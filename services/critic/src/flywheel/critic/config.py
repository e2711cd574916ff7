"""Settings of the critic service (environment variables `FLYWHEEL_*`)."""

from __future__ import annotations

from flywheel.core.config import ServiceSettings


class CriticSettings(ServiceSettings):
    """The critic service's settings; defaults give it its own ports on one machine."""

    service_name: str = "critic"
    grpc_port: int = 50056
    metrics_port: int = 9106
