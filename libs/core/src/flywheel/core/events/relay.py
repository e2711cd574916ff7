"""The outbox relay: publishes committed outbox rows to the event bus, in order, at least once.

Each round takes the oldest unpublished rows, publishes them, waits for the bus to
acknowledge, and only then marks them published. A crash between acknowledgement and marking
publishes those rows again on restart; consumers dedupe by ``event_id``. While the bus is
down the rows wait and the relay retries with backoff.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from datetime import UTC, datetime, timedelta

import prometheus_client
from sqlalchemy import delete, select, update

from flywheel.core.db import SessionFactory
from flywheel.core.events.bus import EventBus, EventRecord
from flywheel.core.events.outbox import OutboxEvent

log = logging.getLogger(__name__)

PUBLISHED = prometheus_client.Counter(
    "flywheel_outbox_published_total", "Outbox events published", ["topic"]
)
PUBLISH_FAILURES = prometheus_client.Counter(
    "flywheel_outbox_publish_failures_total", "Failed relay rounds"
)
BACKLOG = prometheus_client.Gauge(
    "flywheel_outbox_backlog", "Unpublished outbox events seen by the last round"
)


class OutboxRelay:
    """Moves one service's outbox to the bus; run exactly one per service database."""

    def __init__(
        self,
        sessions: SessionFactory,
        bus: EventBus,
        *,
        batch_size: int = 500,
        idle_interval_s: float = 0.05,
        max_idle_interval_s: float = 1.0,
        max_backoff_s: float = 5.0,
        retention_s: float = 24 * 3600.0,
    ) -> None:
        self.sessions = sessions
        self.bus = bus
        self.batch_size = batch_size
        self.idle_interval_s = idle_interval_s
        self.max_idle_interval_s = max_idle_interval_s
        self.max_backoff_s = max_backoff_s
        self.retention_s = retention_s
        self._wakeup = asyncio.Event()

    def wake(self) -> None:
        """Tell the relay new rows were committed, so it need not wait for its next poll."""
        self._wakeup.set()

    async def publish_pending(self) -> int:
        """Publish one batch of unpublished rows; return how many were published."""
        o = OutboxEvent
        async with self.sessions() as session, session.begin():
            # Plain columns, not ORM objects: the relay never changes a row through the session.
            rows = (
                await session.execute(
                    select(o.id, o.topic, o.key, o.value, o.event_id, o.event_type)
                    .where(o.published_at.is_(None))
                    .order_by(o.id)
                    .limit(self.batch_size)
                    # On PostgreSQL a second relay (another replica) waits here rather than
                    # publishing the same rows out of order.
                    .with_for_update()
                )
            ).all()
            BACKLOG.set(len(rows))
            if not rows:
                return 0
            await self.bus.publish(
                [
                    EventRecord(
                        topic=row.topic,
                        key=row.key,
                        value=row.value,
                        event_id=row.event_id,
                        event_type=row.event_type,
                    )
                    for row in rows
                ]
            )
            await session.execute(
                update(o)
                .where(o.id.in_([row.id for row in rows]))
                .values(published_at=datetime.now(UTC))
                .execution_options(synchronize_session=False)
            )
        for topic, count in Counter(row.topic for row in rows).items():
            PUBLISHED.labels(topic).inc(count)
        return len(rows)

    async def drain(self) -> int:
        """Publish until the outbox is empty; return the number published."""
        total = 0
        while published := await self.publish_pending():
            total += published
        return total

    async def purge_published(self) -> int:
        """Delete rows published longer ago than the retention period."""
        cutoff = datetime.now(UTC) - timedelta(seconds=self.retention_s)
        async with self.sessions() as session, session.begin():
            result = await session.execute(
                delete(OutboxEvent).where(OutboxEvent.published_at < cutoff)
            )
        return int(getattr(result, "rowcount", 0) or 0)

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until ``stop`` is set, backing off while the bus is unavailable.

        An idle outbox is polled ever less often (up to ``max_idle_interval_s``): the
        service's own writes call :meth:`wake`, so polling only catches rows committed by
        another process; a failing bus backs off the same way up to ``max_backoff_s``.
        """
        wait = self.idle_interval_s
        rounds = 0
        while not stop.is_set():
            # Cleared before the round, so a wake() during it is not lost.
            self._wakeup.clear()
            try:
                published = await self.publish_pending()
                wait = (
                    self.idle_interval_s if published else min(self.max_idle_interval_s, wait * 2)
                )
                rounds += 1
                if rounds % 1000 == 0:
                    await self.purge_published()
            except Exception as exc:
                PUBLISH_FAILURES.inc()
                wait = min(self.max_backoff_s, max(wait, self.idle_interval_s) * 2)
                log.warning("outbox relay: publish failed, retrying in %.2fs: %r", wait, exc)
                published = 0
            if published < self.batch_size:
                await self._sleep(stop, wait)

    async def _sleep(self, stop: asyncio.Event, seconds: float) -> None:
        wakers = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wakeup.wait())]
        try:
            await asyncio.wait(wakers, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waker in wakers:
                waker.cancel()
