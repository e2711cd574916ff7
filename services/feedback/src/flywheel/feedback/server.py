"""Wiring of the feedback service: settings -> runtime (database, events, gRPC health)."""

from __future__ import annotations

from flywheel.core.runtime import ServiceRuntime
from flywheel.feedback.config import FeedbackSettings


def build() -> ServiceRuntime:
    """The feedback service's runtime, configured from the environment."""
    return ServiceRuntime(FeedbackSettings())
