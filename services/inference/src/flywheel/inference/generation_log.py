"""The durable generation log: every served completion reaches the feedback service, later.

Serving never waits on the feedback service. :meth:`GenerationLog.record` writes each
served generation (a ``GenerationInput``) to the ``pending_generations`` table of the
inference service's own database, in one short transaction, and returns its generation id
at once: the id is :func:`~flywheel.core.ids.generation_id_for` the tenant and the
generation's client id, which is exactly the id the feedback service will assign, so
feedback on it lands on the right generation however late the log arrives.

:class:`GenerationRelay` drains the table in the background, oldest first, one
``BatchLogGenerations`` call per tenant per pass, and deletes rows only once the feedback
service has committed them. A crash between the two sends them again, which is harmless:
the feedback service is idempotent per client id. While the feedback service is down,
rows wait with exponential backoff; no row is ever dropped.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import prometheus_client
from sqlalchemy import (
    DateTime,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.orm import Mapped, mapped_column

from flywheel.contracts.feedback.v1.service_pb2 import BatchLogGenerationsRequest, GenerationInput
from flywheel.contracts.feedback.v1.service_pb2_grpc import FeedbackServiceStub
from flywheel.core.db import Base, BigId, SessionFactory, insert_ignoring_conflicts
from flywheel.core.errors import field_errors_of
from flywheel.core.ids import generation_id_for

log = logging.getLogger(__name__)

# Sends one tenant's generations in one call, all or none; raises when they were not logged.
Sender = Callable[[str, list[GenerationInput]], Awaitable[None]]

RECORDED = prometheus_client.Counter(
    "flywheel_generation_log_recorded_total", "Served generations written to the durable log"
)
SENT = prometheus_client.Counter(
    "flywheel_generation_log_sent_total", "Logged generations the feedback service committed"
)
SEND_FAILURES = prometheus_client.Counter(
    "flywheel_generation_log_send_failures_total", "Batches the feedback service did not take"
)
PENDING = prometheus_client.Gauge(
    "flywheel_generation_log_pending", "Generations waiting for the feedback service"
)
OLDEST_PENDING = prometheus_client.Gauge(
    "flywheel_generation_log_oldest_pending_seconds", "Age of the oldest waiting generation"
)
ID_MISMATCHES = prometheus_client.Counter(
    "flywheel_generation_log_id_mismatches_total",
    "Generations the feedback service logged under another id than the one served",
)

MAX_ERROR_CHARS = 1000


def utcnow() -> datetime:
    """Now, timezone-aware."""
    return datetime.now(UTC)


class PendingGenerationRow(Base):
    """A served generation the feedback service has not committed yet."""

    __tablename__ = "pending_generations"
    __table_args__ = (
        # A generation recorded twice (a retried request with the caller's own client id)
        # is kept once; the feedback service would keep only the first anyway.
        UniqueConstraint(
            "tenant_id", "client_generation_id", name="uq_pending_generations_client_id"
        ),
        # The relay's scan: rows due for a (re)send.
        Index("ix_pending_generations_due", "next_attempt_at", "id"),
    )

    # Insertion order: the relay sends oldest first.
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(63))
    client_generation_id: Mapped[str] = mapped_column(String(200))
    # The GenerationInput message, serialized (client_generation_id and served_at set).
    generation: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Failed sends so far; sets the backoff of the next one.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)


class GenerationLog:
    """Records served generations durably; never touches the network."""

    def __init__(
        self, sessions: SessionFactory, *, on_commit: Callable[[], None] = lambda: None
    ) -> None:
        self.sessions = sessions
        # Called after rows were committed: wakes the relay (GenerationRelay.wake).
        self.on_commit = on_commit

    async def record(self, items: Sequence[tuple[str, GenerationInput]]) -> list[str]:
        """Write ``(tenant, generation)`` pairs in one transaction; return their generation ids.

        A generation without a client id gets a new uuid4 one (the inputs themselves are
        left as they are), and one without ``served_at`` is stamped now, so the feedback
        service dates it by serving time, not by when the log reached it.
        """
        now = utcnow()
        rows: list[dict[str, Any]] = []
        ids: list[str] = []
        for tenant_id, data in items:
            message = GenerationInput()
            message.CopyFrom(data)
            if not message.HasField("client_generation_id"):
                message.client_generation_id = str(uuid.uuid4())
            if not message.HasField("served_at"):
                message.served_at.FromDatetime(now)
            ids.append(generation_id_for(tenant_id, message.client_generation_id))
            rows.append(
                {
                    "tenant_id": tenant_id,
                    "client_generation_id": message.client_generation_id,
                    "generation": message.SerializeToString(),
                    "created_at": now,
                    "attempts": 0,
                    "next_attempt_at": now,
                }
            )
        if rows:
            async with self.sessions() as session, session.begin():
                await session.execute(
                    insert_ignoring_conflicts(session, PendingGenerationRow), rows
                )
            RECORDED.inc(len(rows))
            self.on_commit()
        return ids


class Rejected(Exception):
    """The feedback service refused some generations of a batch as invalid.

    Sent again unchanged they would be refused again, so the relay backs off only those
    and lets the rest of the tenant's log through.
    """

    def __init__(self, indices: Sequence[int], message: str) -> None:
        super().__init__(message)
        self.indices = list(indices)


class GenerationRelay:
    """Moves the log to the feedback service; one per database is enough, more are safe."""

    def __init__(
        self,
        sessions: SessionFactory,
        send: Sender,
        *,
        batch_size: int = 100,
        poll_s: float = 0.2,
        base_backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        lease_s: float = 60.0,
        gauge_interval_s: float = 5.0,
    ) -> None:
        self.sessions = sessions
        self.send = send
        self.batch_size = batch_size
        self.poll_s = poll_s
        self.base_backoff_s = base_backoff_s
        self.max_backoff_s = max_backoff_s
        # How long rows taken for a send stay invisible to other relays (replicas sharing
        # the database); longer than any send may take. A relay that dies meanwhile leaves
        # them to be sent again after it.
        self.lease_s = lease_s
        self.gauge_interval_s = gauge_interval_s
        self._gauged_at: float | None = None
        self._wakeup = asyncio.Event()

    def wake(self) -> None:
        """New rows were recorded: send them now rather than at the next poll."""
        self._wakeup.set()

    async def drain_once(self) -> int:
        """One pass: send the due rows (up to ``batch_size``, oldest first); return rows sent."""
        sent, _failed, _taken = await self._pass()
        return sent

    async def run_forever(self) -> None:
        """Relay until cancelled."""
        await self.run(asyncio.Event())

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until ``stop`` is set (a ServiceRuntime background task).

        When every batch of a pass fails (the feedback service is down), the relay itself
        backs off too, so a large backlog costs one failing call per backoff interval, not
        one per batch, and new records do not wake it early.
        """
        failures = 0
        while not stop.is_set():
            # Cleared before the pass, so a wake() during it is not lost.
            self._wakeup.clear()
            try:
                sent, failed, taken = await self._pass()
            except Exception as exc:  # the database itself; the rows are safe in it
                log.warning("generation log: relay pass failed: %r", exc)
                sent, failed, taken = 0, 1, 0
            if failed and not sent:
                failures += 1
                await self._sleep(stop, self._backoff(failures), wakeable=False)
                continue
            failures = 0
            if taken < self.batch_size:
                await self._sleep(stop, self.poll_s, wakeable=True)

    async def _pass(self) -> tuple[int, int, int]:
        """(rows sent, batches failed, rows taken) of one pass."""
        rows = await self._take_due()
        batches: dict[str, list[Any]] = {}
        for row in rows:
            batches.setdefault(row.tenant_id, []).append(row)
        results = await asyncio.gather(
            *(self._deliver(tenant_id, batch) for tenant_id, batch in batches.items())
        )
        await self._refresh_gauges()
        sent = sum(n for n in results if n is not None)
        return sent, sum(1 for n in results if n is None), len(rows)

    async def _take_due(self) -> list[Any]:
        """The oldest due rows, leased so no other relay sends them meanwhile."""
        p = PendingGenerationRow
        now = utcnow()
        async with self.sessions() as session, session.begin():
            rows = (
                await session.execute(
                    select(p.id, p.tenant_id, p.generation, p.attempts)
                    .where(p.next_attempt_at <= now)
                    .order_by(p.id)
                    .limit(self.batch_size)
                    # PostgreSQL: another replica's relay skips the rows this one takes
                    # (SQLite serialises writers already).
                    .with_for_update(skip_locked=True)
                )
            ).all()
            if rows:
                await session.execute(
                    update(p)
                    .where(p.id.in_([r.id for r in rows]))
                    .values(next_attempt_at=now + timedelta(seconds=self.lease_s))
                    .execution_options(synchronize_session=False)
                )
        return list(rows)

    async def _deliver(self, tenant_id: str, rows: list[Any]) -> int | None:
        """Send one tenant's batch; the number sent, or None when the send failed."""
        try:
            await self.send(tenant_id, [GenerationInput.FromString(r.generation) for r in rows])
        except Rejected as exc:
            SEND_FAILURES.inc()
            refused = {i for i in exc.indices if 0 <= i < len(rows)} or set(range(len(rows)))
            log.error(
                "generation log: feedback service refused %d of %d generations of %s: %s",
                len(refused), len(rows), tenant_id, exc,
            )  # fmt: skip
            await self._back_off([r for i, r in enumerate(rows) if i in refused], exc)
            # The others go out with the next pass, without the refused ones.
            await self._release([r for i, r in enumerate(rows) if i not in refused])
            return 0
        except Exception as exc:
            SEND_FAILURES.inc()
            log.warning("generation log: sending %d of %s failed: %r", len(rows), tenant_id, exc)
            await self._back_off(rows, exc)
            return None
        async with self.sessions() as session, session.begin():
            await session.execute(
                delete(PendingGenerationRow).where(
                    PendingGenerationRow.id.in_([r.id for r in rows])
                )
            )
        SENT.inc(len(rows))
        return len(rows)

    async def _back_off(self, rows: list[Any], error: BaseException) -> None:
        """Count a failed attempt of ``rows`` and schedule their next one, together."""
        if not rows:
            return
        p = PendingGenerationRow
        delay = self._backoff(max(r.attempts for r in rows) + 1)
        async with self.sessions() as session, session.begin():
            await session.execute(
                update(p)
                .where(p.id.in_([r.id for r in rows]))
                .values(
                    attempts=p.attempts + 1,
                    next_attempt_at=utcnow() + timedelta(seconds=delay),
                    last_error=repr(error)[:MAX_ERROR_CHARS],
                )
                .execution_options(synchronize_session=False)
            )

    async def _release(self, rows: list[Any]) -> None:
        """Make leased rows due again at once."""
        if not rows:
            return
        p = PendingGenerationRow
        async with self.sessions() as session, session.begin():
            await session.execute(
                update(p)
                .where(p.id.in_([r.id for r in rows]))
                .values(next_attempt_at=utcnow())
                .execution_options(synchronize_session=False)
            )

    def _backoff(self, attempts: int) -> float:
        """Seconds before attempt ``attempts + 1``: exponential, capped, with jitter so
        replicas and batches that failed together do not retry in step."""
        ceiling = min(self.max_backoff_s, self.base_backoff_s * 2 ** min(attempts - 1, 32))
        return random.uniform(ceiling / 2, ceiling)

    async def _refresh_gauges(self) -> None:
        """Pending count and oldest age, at most every ``gauge_interval_s`` (a full count)."""
        clock = asyncio.get_running_loop().time()
        if self._gauged_at is not None and clock - self._gauged_at < self.gauge_interval_s:
            return
        self._gauged_at = clock
        p = PendingGenerationRow
        async with self.sessions() as session:
            count, oldest = (
                await session.execute(select(func.count(), func.min(p.created_at)))
            ).one()
        PENDING.set(count)
        if oldest is None:
            OLDEST_PENDING.set(0)
        else:
            # SQLite hands back naive datetimes, which are UTC.
            oldest = oldest if oldest.tzinfo else oldest.replace(tzinfo=UTC)
            OLDEST_PENDING.set(max(0.0, (utcnow() - oldest).total_seconds()))

    async def _sleep(self, stop: asyncio.Event, seconds: float, *, wakeable: bool) -> None:
        waiters = [asyncio.ensure_future(stop.wait())]
        if wakeable:
            waiters.append(asyncio.ensure_future(self._wakeup.wait()))
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()


# "generations[3].task" (a batch) or "generation.task" (a batch of one).
_ITEM_FIELD = re.compile(r"^generations\[(\d+)\]")


def feedback_sender(channel_or_stub: Any, *, timeout_s: float = 10.0) -> Sender:
    """A :data:`Sender` calling ``BatchLogGenerations`` on a feedback service channel or stub.

    Invalid generations raise :class:`Rejected` naming them; any other failure raises the
    RPC error, and the relay retries the batch.
    """
    stub = (
        FeedbackServiceStub(channel_or_stub)
        if isinstance(channel_or_stub, grpc.aio.Channel)
        else channel_or_stub
    )

    async def send(tenant_id: str, generations: list[GenerationInput]) -> None:
        try:
            response = await stub.BatchLogGenerations(
                BatchLogGenerationsRequest(tenant_id=tenant_id, generations=generations),
                timeout=timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() is grpc.StatusCode.INVALID_ARGUMENT:
                raise Rejected(_refused(error, len(generations)), str(error.details())) from error
            raise
        for data, result in zip(generations, response.results, strict=True):
            expected = generation_id_for(tenant_id, data.client_generation_id)
            if result.generation.generation_id != expected:
                # Logged before, under an id the service chose at random (a feedback service
                # older than deterministic ids): resending cannot change it, so say so loudly.
                ID_MISMATCHES.inc()
                log.error(
                    "generation log: %s/%s was logged as %s, served as %s",
                    tenant_id, data.client_generation_id,
                    result.generation.generation_id, expected,
                )  # fmt: skip

    return send


def _refused(error: grpc.aio.AioRpcError, size: int) -> list[int]:
    """Indices of the batch's generations an INVALID_ARGUMENT names (all, if it names none)."""
    if size == 1:
        return [0]
    indices = set()
    for field_error in field_errors_of(error):
        match = _ITEM_FIELD.match(field_error.field)
        if match:
            indices.add(int(match.group(1)))
    return sorted(indices) or list(range(size))
