"""Wiring of the inference service: settings -> runtime (database, events, gRPC health)."""

from __future__ import annotations

from flywheel.core.runtime import ServiceRuntime
from flywheel.inference.config import InferenceSettings


def build() -> ServiceRuntime:
    """The inference service's runtime, configured from the environment."""
    return ServiceRuntime(InferenceSettings())
