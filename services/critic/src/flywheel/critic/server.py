"""Wiring of the critic service: settings -> runtime (database, events, gRPC health)."""

from __future__ import annotations

from flywheel.core.runtime import ServiceRuntime
from flywheel.critic.config import CriticSettings


def build() -> ServiceRuntime:
    """The critic service's runtime, configured from the environment."""
    return ServiceRuntime(CriticSettings())
