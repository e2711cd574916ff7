"""Settings of the feedback service (environment variables `FLYWHEEL_*`)."""

from __future__ import annotations

from pydantic import Field, SecretStr

from flywheel.core.config import PLACEHOLDER_SECRET, ServiceSettings


class FeedbackSettings(ServiceSettings):
    """The feedback service's settings; defaults give it its own ports on one machine."""

    service_name: str = "feedback"
    grpc_port: int = 50052
    metrics_port: int = 9102
    api_key_pepper: SecretStr = Field(
        SecretStr(PLACEHOLDER_SECRET),
        description="Key of the HMAC that API-key secrets are stored as; refused in production "
        "while left at its placeholder. Changing it invalidates every key.",
    )
