"""Settings of the feedback service (environment variables `FLYWHEEL_*`)."""

from __future__ import annotations

from flywheel.core.config import ServiceSettings


class FeedbackSettings(ServiceSettings):
    """The feedback service's settings; defaults give it its own ports on one machine."""

    service_name: str = "feedback"
    grpc_port: int = 50052
    metrics_port: int = 9102
