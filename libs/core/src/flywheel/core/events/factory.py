"""Choosing the event bus from settings: Kafka, or the embedded log of the one-machine default."""

from __future__ import annotations

from flywheel.core.config import ServiceSettings
from flywheel.core.events.bus import EventBus
from flywheel.core.events.embedded import EmbeddedLogBus
from flywheel.core.events.kafka import KafkaBus


def create_bus(settings: ServiceSettings) -> EventBus:
    """The bus ``settings.event_bus`` names."""
    if settings.event_bus == "kafka":
        return KafkaBus(settings.kafka_bootstrap_servers, client_id=settings.service_name)
    return EmbeddedLogBus(settings.resolved_event_log_url)
