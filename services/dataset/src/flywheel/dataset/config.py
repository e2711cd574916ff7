"""Settings of the dataset service (environment variables `FLYWHEEL_*`)."""

from __future__ import annotations

from flywheel.core.config import ServiceSettings


class DatasetSettings(ServiceSettings):
    """The dataset service's settings; defaults give it its own ports on one machine."""

    service_name: str = "dataset"
    grpc_port: int = 50053
    metrics_port: int = 9103
