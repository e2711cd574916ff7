"""Wiring of the feedback service: settings -> runtime -> domain -> gRPC servicer."""

from __future__ import annotations

from pathlib import Path

from flywheel.contracts.feedback.v1 import service_pb2_grpc
from flywheel.core.runtime import ServiceRuntime
from flywheel.feedback.config import FeedbackSettings
from flywheel.feedback.grpc_api import FeedbackServicer
from flywheel.feedback.service import FeedbackService

MIGRATIONS = Path(__file__).parent / "migrations" / "versions"
SERVICE_NAME = "flywheel.contracts.feedback.v1.FeedbackService"


def build() -> ServiceRuntime:
    """The feedback service's runtime, configured from the environment."""
    settings = FeedbackSettings()
    runtime = ServiceRuntime(settings, version_dirs=[MIGRATIONS])
    service = FeedbackService(
        runtime.sessions,
        key_pepper=settings.api_key_pepper.get_secret_value().encode(),
        on_commit=runtime.relay.wake,
    )
    runtime.add_grpc_service(
        (service_pb2_grpc.add_FeedbackServiceServicer_to_server, FeedbackServicer(service)),
        SERVICE_NAME,
    )
    return runtime
