"""The consumer loop: poll a batch, apply it, then commit the group's offsets.

Offsets are committed only after the handler returned, that is after its effects are durable;
a crash in between redelivers the batch and the handler's idempotency (see
:func:`flywheel.core.events.inbox.claim_events`) keeps each effect single.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence

import prometheus_client

from flywheel.core.events.bus import EventBus, EventRecord, Subscription

log = logging.getLogger(__name__)

BatchHandler = Callable[[list[EventRecord]], Awaitable[None]]

CONSUMED = prometheus_client.Counter(
    "flywheel_events_consumed_total", "Events handled by a consumer group", ["group", "topic"]
)
HANDLER_FAILURES = prometheus_client.Counter(
    "flywheel_event_handler_failures_total", "Batches whose handler raised", ["group"]
)


async def run_consumer(
    bus: EventBus,
    group: str,
    topics: Sequence[str],
    handler: BatchHandler,
    stop: asyncio.Event,
    *,
    max_records: int = 500,
    poll_timeout_s: float = 0.5,
    retry_backoff_s: float = 1.0,
) -> None:
    """Feed batches of ``topics`` to ``handler`` as consumer group ``group`` until ``stop``.

    A batch whose handler raises is not committed: the subscription is reopened from the
    committed offsets after ``retry_backoff_s`` and the batch comes again.
    """
    subscription: Subscription | None = None
    try:
        while not stop.is_set():
            if subscription is None:
                subscription = await bus.subscribe(group, topics)
            records = await subscription.poll(max_records, poll_timeout_s)
            if not records:
                continue
            try:
                await handler(records)
            except Exception:
                HANDLER_FAILURES.labels(group).inc()
                log.exception("consumer %s: handler failed; batch will be redelivered", group)
                await subscription.close()
                subscription = None
                await asyncio.sleep(retry_backoff_s)
                continue
            await subscription.commit()
            for topic, count in Counter(record.topic for record in records).items():
                CONSUMED.labels(group, topic).inc(count)
    finally:
        if subscription is not None:
            await subscription.close()
