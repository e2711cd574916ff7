"""Settings of the trainer service (environment variables `FLYWHEEL_*`)."""

from __future__ import annotations

from flywheel.core.config import ServiceSettings


class TrainerSettings(ServiceSettings):
    """The trainer service's settings; defaults give it its own ports on one machine."""

    service_name: str = "trainer"
    grpc_port: int = 50054
    metrics_port: int = 9104
