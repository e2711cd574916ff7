"""Wiring of the dataset service: settings -> runtime (database, events, gRPC health)."""

from __future__ import annotations

from flywheel.core.runtime import ServiceRuntime
from flywheel.dataset.config import DatasetSettings


def build() -> ServiceRuntime:
    """The dataset service's runtime, configured from the environment."""
    return ServiceRuntime(DatasetSettings())
