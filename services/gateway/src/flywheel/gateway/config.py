"""Settings of the gateway (environment variables `FLYWHEEL_*`)."""

from __future__ import annotations

from pydantic import Field

from flywheel.core.config import ServiceSettings

DEFAULT_UPSTREAMS = {
    "feedback": "127.0.0.1:50052",
    "dataset": "127.0.0.1:50053",
    "trainer": "127.0.0.1:50054",
    "inference": "127.0.0.1:50055",
    "critic": "127.0.0.1:50056",
}


class GatewaySettings(ServiceSettings):
    """The gateway's settings: its REST port and the gRPC address of each service behind it."""

    service_name: str = "gateway"
    grpc_port: int = 50051
    metrics_port: int = 9101
    http_port: int = 8080
    upstreams: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_UPSTREAMS),
        description='gRPC host:port per service, as JSON: {"feedback": "host:port", ...}.',
    )
