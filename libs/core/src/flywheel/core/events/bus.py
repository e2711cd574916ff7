"""The event-bus protocol, implemented by Kafka and by the embedded log.

Delivery is at least once: a record is handed to consumers until their group commits past
it. Consumers make effects idempotent by ``event_id`` (see :mod:`flywheel.core.events.inbox`),
so the effect happens exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One event on the wire: ``value`` is a serialized ``Envelope``; ``key`` the tenant."""

    topic: str
    key: str
    value: bytes
    event_id: str
    event_type: str
    # Where the record sits in its log; set on consumed records only.
    partition: int = 0
    offset: int = -1


class Subscription(Protocol):
    """A consumer-group member reading some topics."""

    async def poll(self, max_records: int = 500, timeout_s: float = 1.0) -> list[EventRecord]:
        """Return the next records (possibly none once ``timeout_s`` has passed)."""
        ...

    async def commit(self) -> None:
        """Durably mark every record returned by ``poll`` so far as processed by the group."""
        ...

    async def close(self) -> None:
        """Leave the group without committing anything further."""
        ...


class EventBus(Protocol):
    """Publishes records durably and hands out subscriptions."""

    async def publish(self, records: Sequence[EventRecord]) -> None:
        """Return only once every record is durable (all in-sync replicas / committed)."""
        ...

    async def subscribe(self, group: str, topics: Sequence[str]) -> Subscription:
        """Join consumer group ``group`` on ``topics``, starting at its committed offsets."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
