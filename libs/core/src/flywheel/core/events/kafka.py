"""Kafka as the event bus (kafka-python): idempotent producer with ``acks=all``, consumer
groups that commit offsets only after the records' effects are durable.

kafka-python is a blocking client, so each producer and consumer runs its calls on a thread
of its own, keeping the service's event loop free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from flywheel.core.events.bus import EventRecord
from flywheel.core.events.envelope import parse

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long a publish may wait for a broker before failing; the relay then retries, so a
# short wait keeps a broker outage visible in the logs instead of one long stall.
PUBLISH_TIMEOUT_S = 10.0


class KafkaBus:
    """An :class:`~flywheel.core.events.bus.EventBus` on a Kafka cluster."""

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        client_id: str = "flywheel",
        linger_ms: int = 5,
        publish_timeout_s: float = PUBLISH_TIMEOUT_S,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.client_id = client_id
        self.linger_ms = linger_ms
        self.publish_timeout_s = publish_timeout_s
        self._producer: KafkaProducer | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="kafka-producer")

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _new_producer(self) -> KafkaProducer:
        timeout_ms = int(self.publish_timeout_s * 1000)
        return KafkaProducer(
            bootstrap_servers=self.bootstrap_servers,
            client_id=self.client_id,
            # Broker-side dedup of retried batches; with acks=all a record acknowledged
            # is on every in-sync replica.
            enable_idempotence=True,
            acks="all",
            linger_ms=self.linger_ms,
            max_block_ms=timeout_ms,
            bootstrap_timeout_ms=timeout_ms,
            request_timeout_ms=timeout_ms,
            delivery_timeout_ms=timeout_ms + self.linger_ms + 1,
        )

    async def publish(self, records: Sequence[EventRecord]) -> None:
        """Send ``records`` and wait until the broker has acknowledged every one."""
        if records:
            await self._run(lambda: self._publish_sync(records))

    def _publish_sync(self, records: Sequence[EventRecord]) -> None:
        try:
            if self._producer is None:
                self._producer = self._new_producer()
            producer = self._producer
            futures = [
                producer.send(
                    r.topic,
                    key=r.key.encode(),
                    value=r.value,
                    headers=[("event_id", r.event_id.encode()), ("type", r.event_type.encode())],
                )
                for r in records
            ]
            producer.flush(timeout=self.publish_timeout_s)
            for future in futures:
                future.get(timeout=0)  # raises the send's error, if any
        except Exception:
            # A failed idempotent producer may hold a poisoned sequence state; start afresh.
            self._drop_producer()
            raise

    def _drop_producer(self) -> None:
        if self._producer is not None:
            try:
                self._producer.close(timeout=0)
            except Exception:  # closing a broken producer must not hide the original error
                log.debug("error closing producer", exc_info=True)
            self._producer = None

    async def subscribe(self, group: str, topics: Sequence[str]) -> KafkaSubscription:
        """Join ``group`` on ``topics``; a new group starts at the earliest offsets."""
        executor = ThreadPoolExecutor(1, thread_name_prefix=f"kafka-consumer-{group}")
        consumer = await asyncio.get_running_loop().run_in_executor(
            executor,
            lambda: KafkaConsumer(
                *topics,
                bootstrap_servers=self.bootstrap_servers,
                client_id=self.client_id,
                group_id=group,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                # Only read what producers finished; matters once transactions are used.
                isolation_level="read_committed",
            ),
        )
        return KafkaSubscription(consumer, executor)

    async def close(self) -> None:
        """Flush nothing further; close the producer and its thread."""
        await self._run(self._drop_producer)
        self._executor.shutdown(wait=False)


class KafkaSubscription:
    """One member of a Kafka consumer group."""

    def __init__(self, consumer: KafkaConsumer, executor: ThreadPoolExecutor) -> None:
        self._consumer = consumer
        self._executor = executor

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def poll(self, max_records: int = 500, timeout_s: float = 1.0) -> list[EventRecord]:
        """Next records of the partitions assigned to this member."""
        batches = await self._run(
            lambda: self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        )
        return [_to_record(message) for messages in batches.values() for message in messages]

    async def commit(self) -> None:
        """Commit the positions after every record returned by ``poll``."""
        await self._run(self._consumer.commit)

    async def close(self) -> None:
        """Leave the group; uncommitted records go to whoever takes the partitions."""
        await self._run(lambda: self._consumer.close(autocommit=False))
        self._executor.shutdown(wait=False)


def _to_record(message: Any) -> EventRecord:
    headers = {name: value.decode() for name, value in (message.headers or [])}
    event_id, event_type = headers.get("event_id"), headers.get("type")
    if event_id is None or event_type is None:
        # Written by a producer that does not set our headers: read the envelope instead.
        envelope = parse(message.value)
        event_id, event_type = envelope.event_id, envelope.type
    return EventRecord(
        topic=message.topic,
        key=(message.key or b"").decode(),
        value=message.value,
        event_id=event_id,
        event_type=event_type,
        partition=message.partition,
        offset=message.offset,
    )


def ensure_topics(
    bootstrap_servers: str,
    topics: Sequence[str],
    *,
    partitions: int = 3,
    replication_factor: int = 1,
) -> None:
    """Create ``topics`` if missing; existing ones are left alone."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="flywheel-admin")
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            new = [NewTopic(t, partitions, replication_factor) for t in missing]
            # Another service may create one first.
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(new)
    finally:
        admin.close()
