"""Wiring of the trainer service: settings -> runtime (database, events, gRPC health)."""

from __future__ import annotations

from flywheel.core.runtime import ServiceRuntime
from flywheel.trainer.config import TrainerSettings


def build() -> ServiceRuntime:
    """The trainer service's runtime, configured from the environment."""
    return ServiceRuntime(TrainerSettings())
