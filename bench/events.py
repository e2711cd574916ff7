"""Events benchmark: events/s end to end, from the outbox to an applied effect.

    uv run python bench/events.py [--events N] [--repeat R] [--quick]

Starts PostgreSQL and a single-node Kafka in a temporary directory (``deploy/local``, through
``LocalPostgres``/``LocalKafka``), runs three pipelines in this one process, and stops the
servers at the end, also on error, Ctrl-C or SIGTERM:

- **flywheel, embedded log**: a producer task writes events with ``add_event``, ``--per-txn``
  per transaction, into a SQLite service database; ``OutboxRelay.run`` publishes them to the
  embedded log (another SQLite file); ``run_consumer`` hands batches to a handler that claims
  them (``claim_events``) and inserts one row per new event into a SQLite consumer database,
  in one transaction per batch, before the group's offsets are committed.
- **flywheel, Kafka**: the same with PostgreSQL service and consumer databases and Kafka.
- **bare kafka-python**, the baseline: a ``KafkaProducer`` with the same durability
  (``acks=all``, idempotence, KafkaBus's ``linger_ms``) sends records of the same size, keys
  and headers, then flushes, while a ``KafkaConsumer`` on a thread consumes them, committing
  offsets by hand after each poll, as ``run_consumer`` does.

Throughput: each pipeline runs ``--repeat`` times, interleaved, each run after an untimed
warm-up (connections, metadata, group join; the broker itself is warmed up once first). The
clock starts at the first measured write (send) and stops when the last event's effect has
committed (the last record is in the consumer's hands); the median run counts. Every flywheel
run then checks its effects: exactly one per event, none missing, none left in the outbox.

Latency: one more run per pipeline writes events one per transaction at a steady 100/s,
well below saturation, and reports p50/p99 from the write (just before the producer's
commit; the send) to the effect's commit (the poll that returned the record). At saturation
latency would only measure the backlog.

Prints a table, then as its last line the JSON result ``docs/benchmarks.md`` describes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import struct
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from kafka import KafkaConsumer, KafkaProducer
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from flywheel.contracts.common.v1.common_pb2 import Prompt
from flywheel.contracts.feedback.v1.events_pb2 import FeedbackRecorded
from flywheel.contracts.feedback.v1.resources_pb2 import (
    SOURCE_KIND_HUMAN,
    Comment,
    Feedback,
    FeedbackSource,
    FeedbackValue,
    Generation,
)
from flywheel.core.db import SessionFactory, create_engine, session_factory
from flywheel.core.events.bus import EventBus, EventRecord
from flywheel.core.events.consumer import BatchHandler, run_consumer
from flywheel.core.events.embedded import EmbeddedLogBus
from flywheel.core.events.envelope import event_options, parse, unpack, wrap
from flywheel.core.events.inbox import claim_events
from flywheel.core.events.kafka import KafkaBus, ensure_topics
from flywheel.core.events.outbox import OutboxEvent, add_event
from flywheel.core.events.relay import OutboxRelay
from flywheel.core.migrations import upgrade
from flywheel.core.testing.local_infra import LocalKafka, LocalPostgres

DEFAULT_EVENTS = 15_000
QUICK_EVENTS = 2_000
TENANTS = [f"brand-{i:02d}" for i in range(10)]
SOURCE_SERVICE = "feedback"
CONSUMER_GROUP = "bench-dataset"
BARE_GROUP = "bench-bare"
# ensure_topics' default, like the flywheel.* topics of a fresh broker.
KAFKA_PARTITIONS = 3
# KafkaBus's default, used by the baseline producer too.
LINGER_MS = 5
PROGRESS_EVERY_S = 2.0
# The latency run: events one per transaction at a steady pace well below saturation.
LATENCY_RATE = 100.0
LATENCY_EVENTS = 500
QUICK_LATENCY_EVENTS = 200
# Generous: a healthy run finishes each pipeline in well under a minute. A handler that
# keeps failing is retried by run_consumer (and logged) until this runs out.
PIPELINE_TIMEOUT_S = 300.0

FEEDBACK_TOPIC = event_options(FeedbackRecorded)[1]

_effects_metadata = MetaData()
# The consumer's effect: one row per applied event. event_id is deliberately not unique,
# so a duplicate effect shows up in the final check instead of failing the batch.
effects = Table(
    "bench_effects",
    _effects_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("event_id", String(36), nullable=False),
    Column("tenant", String(200), nullable=False),
    Column("feedback_id", String(36), nullable=False),
    Column("comment_chars", Integer, nullable=False),
)

_VOCABULARY = (
    "the budget pacing looks off for the spring campaign please shift spend toward "
    "search and cap display frequency at three per user while keeping the retail "
    "partner placements stable through the holiday weekend"
)
_WORDS = _VOCABULARY.split()


def log(message: str) -> None:
    """Progress on stderr, so stdout stays the table and the JSON line."""
    print(message, file=sys.stderr, flush=True)


# --- workload -------------------------------------------------------------------------


def _text(rng: random.Random, chars: int) -> str:
    words: list[str] = []
    length = 0
    while length < chars:
        word = rng.choice(_WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)[:chars]


def make_events(count: int, seed: int) -> list[tuple[str, FeedbackRecorded]]:
    """``count`` (tenant, payload) pairs: a comment feedback of ~200 characters on a
    generation it carries whole (event-carried state, as the feedback service publishes)."""
    rng = random.Random(seed)
    now = Timestamp()
    now.GetCurrentTime()
    events = []
    for _ in range(count):
        tenant = rng.choice(TENANTS)
        generation_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        generation = Generation(
            generation_id=generation_id,
            tenant_id=tenant,
            task="budgeting",
            prompt=Prompt(text=_text(rng, 120)),
            prompt_hash=f"{rng.getrandbits(256):064x}",
            output=_text(rng, 200),
            model=f"{tenant}/budgeting",
            base_model="flywheel-tiny",
            prompt_tokens=32,
            completion_tokens=48,
        )
        generation.created_at.CopyFrom(now)
        feedback = Feedback(
            feedback_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            tenant_id=tenant,
            generation_id=generation_id,
            value=FeedbackValue(comment=Comment(text=_text(rng, 200))),
            source=FeedbackSource(kind=SOURCE_KIND_HUMAN),
            user_id=f"rater-{rng.randrange(50)}",
            revision=1,
            task="budgeting",
        )
        feedback.created_at.CopyFrom(now)
        feedback.updated_at.CopyFrom(now)
        events.append((tenant, FeedbackRecorded(feedback=feedback, generation=generation)))
    return events


def record_size(events: Sequence[tuple[str, FeedbackRecorded]]) -> int:
    """Mean size in bytes of the serialized envelopes of ``events``."""
    sizes = [
        len(wrap(tenant, payload, source_service=SOURCE_SERVICE).SerializeToString())
        for tenant, payload in events
    ]
    return round(statistics.fmean(sizes))


# --- results --------------------------------------------------------------------------


@dataclass
class PathResult:
    """What one pipeline measured."""

    name: str
    events: int
    seconds: float
    latencies_s: list[float] = field(default_factory=list)
    delivered: int = 0

    @property
    def events_per_s(self) -> float:
        """Measured events over measured seconds."""
        return self.events / self.seconds

    def latency_ms(self, quantile: float) -> float | None:
        """The ``quantile`` (0-1) of the per-event latencies, nearest rank; None if none."""
        if not self.latencies_s:
            return None
        ordered = sorted(self.latencies_s)
        index = min(len(ordered) - 1, round(quantile * (len(ordered) - 1)))
        return ordered[index] * 1000.0


@dataclass
class Progress:
    """Counters shared by a pipeline's tasks and its progress printer."""

    target: int
    written: int = 0
    applied: int = 0
    delivered: int = 0
    applied_before: int = 0
    measuring_since: float | None = None
    finished_at: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


async def report_progress(name: str, progress: Progress) -> None:
    """Print the pipeline's counters every few seconds until cancelled."""
    while True:
        await asyncio.sleep(PROGRESS_EVERY_S)
        rate = ""
        if progress.measuring_since is not None:
            elapsed = time.perf_counter() - progress.measuring_since
            applied = progress.applied - progress.applied_before
            rate = f", {applied / elapsed:,.0f} applied/s since the clock started"
        log(
            f"  [{name}] written {progress.written:,}/{progress.target:,}, "
            f"applied {progress.applied:,}{rate}"
        )


# --- the Flywheel pipeline ------------------------------------------------------------


async def migrate(engine: AsyncEngine) -> None:
    """Core tables (outbox, processed_events) plus the benchmark's effect table."""
    await upgrade(engine, None, [])
    async with engine.begin() as conn:
        await conn.run_sync(_effects_metadata.create_all)


async def produce(
    sessions: SessionFactory,
    relay: OutboxRelay,
    events: Sequence[tuple[str, FeedbackRecorded]],
    per_txn: int,
    progress: Progress,
    write_times: dict[str, float],
    rate: float | None = None,
) -> list[str]:
    """Write ``events`` through the outbox, ``per_txn`` per transaction, as fast as possible
    or at ``rate`` events/s; return their ids."""
    ids: list[str] = []
    began = time.perf_counter()
    for start in range(0, len(events), per_txn):
        if rate is not None:
            await asyncio.sleep(max(0.0, began + start / rate - time.perf_counter()))
        async with sessions() as session, session.begin():
            batch = [
                add_event(session, tenant, payload, source_service=SOURCE_SERVICE).event_id
                for tenant, payload in events[start : start + per_txn]
            ]
            # Stamped before the commit, so the consumer can never see an event first.
            now = time.perf_counter()
            for event_id in batch:
                write_times[event_id] = now
        ids.extend(batch)
        progress.written += len(batch)
        relay.wake()
    return ids


def make_handler(
    sessions: SessionFactory,
    progress: Progress,
    write_times: dict[str, float],
    latencies: list[float],
) -> BatchHandler:
    """The consumer's effect: claim the batch, insert a row per new event, one transaction."""

    async def handle(records: list[EventRecord]) -> None:
        envelopes = [parse(record.value) for record in records]
        rows: list[dict[str, Any]] = []
        async with sessions() as session, session.begin():
            fresh = await claim_events(session, CONSUMER_GROUP, [e.event_id for e in envelopes])
            for envelope in envelopes:
                # discard: a record delivered twice within one batch is applied once.
                if envelope.event_id not in fresh:
                    continue
                fresh.discard(envelope.event_id)
                feedback = unpack(envelope, FeedbackRecorded).feedback
                rows.append(
                    {
                        "event_id": envelope.event_id,
                        "tenant": envelope.tenant,
                        "feedback_id": feedback.feedback_id,
                        "comment_chars": len(feedback.value.comment.text),
                    }
                )
            if rows:
                await session.execute(insert(effects), rows)
        now = time.perf_counter()
        if progress.measuring_since is not None:
            latencies.extend(
                now - write_times[row["event_id"]]
                for row in rows
                if write_times.get(row["event_id"], 0.0) >= progress.measuring_since
            )
        progress.delivered += len(records)
        progress.applied += len(rows)
        if progress.applied >= progress.target and progress.finished_at is None:
            progress.finished_at = now
            progress.done.set()

    return handle


async def verify(
    service: SessionFactory, consumer: SessionFactory, expected_ids: Sequence[str]
) -> None:
    """Exactly one effect per event written, none missing, the outbox fully published."""
    async with consumer() as session:
        total = await session.scalar(select(func.count()).select_from(effects))
        distinct = await session.scalar(select(func.count(effects.c.event_id.distinct())))
        applied_ids = set((await session.scalars(select(effects.c.event_id))).all())
    async with service() as session:
        pending = await session.scalar(
            select(func.count()).where(OutboxEvent.published_at.is_(None))
        )
    expected = set(expected_ids)
    total, distinct = total or 0, distinct or 0
    problems = []
    if total != len(expected):
        problems.append(f"{total} effects for {len(expected)} events")
    if distinct != total:
        problems.append(f"{total - distinct} duplicate effects")
    if missing := len(expected - applied_ids):
        problems.append(f"{missing} events without an effect")
    if stray := len(applied_ids - expected):
        problems.append(f"{stray} effects of unknown events")
    if pending:
        problems.append(f"{pending} outbox rows left unpublished")
    if problems:
        raise AssertionError("verification failed: " + "; ".join(problems))


async def flywheel_pipeline(
    name: str,
    service_url: str,
    consumer_url: str,
    bus: EventBus,
    warmup: Sequence[tuple[str, FeedbackRecorded]],
    events: Sequence[tuple[str, FeedbackRecorded]],
    per_txn: int,
    relay_batch: int,
    rate: float | None = None,
) -> PathResult:
    """Run producer, relay and consumer together; time the measured events end to end.

    With ``rate``, the measured events are written one per transaction at that pace: a
    latency measurement below saturation rather than a throughput one.
    """
    service_engine = create_engine(service_url)
    consumer_engine = create_engine(consumer_url)
    tasks: list[asyncio.Task[None]] = []
    stop = asyncio.Event()
    try:
        await migrate(service_engine)
        await migrate(consumer_engine)
        service, consumer = session_factory(service_engine), session_factory(consumer_engine)
        relay = OutboxRelay(service, bus, batch_size=relay_batch)
        progress = Progress(target=len(warmup))
        write_times: dict[str, float] = {}
        latencies: list[float] = []
        handler = make_handler(consumer, progress, write_times, latencies)
        tasks = [
            asyncio.create_task(relay.run(stop)),
            asyncio.create_task(run_consumer(bus, CONSUMER_GROUP, [FEEDBACK_TOPIC], handler, stop)),
            asyncio.create_task(report_progress(name, progress)),
        ]

        async def until_done() -> None:
            waiter = asyncio.create_task(progress.done.wait())
            # A relay or consumer that dies would otherwise leave us waiting for ever.
            finished, _ = await asyncio.wait(
                [waiter, *tasks[:2]],
                timeout=PIPELINE_TIMEOUT_S,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if waiter not in finished:
                waiter.cancel()
                for task in finished:
                    task.result()
                raise TimeoutError(f"{name}: {progress.applied}/{progress.target} applied")

        ids = await produce(service, relay, warmup, per_txn, progress, write_times)
        await until_done()

        progress.target += len(events)
        progress.done.clear()
        progress.finished_at = None
        progress.applied_before = progress.applied
        delivered_before = progress.delivered
        progress.measuring_since = start = time.perf_counter()
        ids += await produce(
            service, relay, events, 1 if rate else per_txn, progress, write_times, rate
        )
        await until_done()
        assert progress.finished_at is not None
        seconds = progress.finished_at - start

        stop.set()
        await asyncio.gather(*tasks[:2])
        await verify(service, consumer, ids)
        log(f"  [{name}] verified: {len(ids):,} events, one effect each")
        return PathResult(
            name=name,
            events=len(events),
            seconds=seconds,
            latencies_s=latencies,
            delivered=progress.delivered - delivered_before,
        )
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await bus.close()
        await service_engine.dispose()
        await consumer_engine.dispose()


# --- the baseline: bare kafka-python --------------------------------------------------


def bare_kafka(
    bootstrap: str,
    topic: str,
    warmup: int,
    count: int,
    size: int,
    *,
    group: str = BARE_GROUP,
    rate: float | None = None,
) -> PathResult:
    """Produce and consume ``count`` records of ``size`` bytes with kafka-python alone,
    as fast as possible or at ``rate`` records/s."""
    ensure_topics(bootstrap, [topic])
    rng = random.Random(7)
    filler = rng.randbytes(size)
    keys = [rng.choice(TENANTS).encode() for _ in range(warmup + count)]
    # The same headers KafkaBus sets, so records are the same size on the wire.
    headers = [("event_id", str(uuid.uuid4()).encode()), ("type", b"feedback.recorded")]
    send_times = [0.0] * (warmup + count)
    latencies: list[float] = []
    consumed = 0
    finished_at: float | None = None
    failure: list[BaseException] = []
    progressed = threading.Condition()
    stop = threading.Event()
    measuring_since = float("inf")

    def consume() -> None:
        nonlocal consumed, finished_at
        try:
            consumer = KafkaConsumer(
                topic,
                bootstrap_servers=bootstrap,
                group_id=group,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                isolation_level="read_committed",
            )
        except BaseException as exc:
            with progressed:
                failure.append(exc)
                progressed.notify_all()
            return
        try:
            while consumed < warmup + count and not stop.is_set():
                batches = consumer.poll(timeout_ms=500, max_records=500)
                messages = [m for batch in batches.values() for m in batch]
                if not messages:
                    continue
                now = time.perf_counter()
                for message in messages:
                    sent = send_times[struct.unpack_from(">Q", message.value)[0]]
                    if sent >= measuring_since:
                        latencies.append(now - sent)
                consumer.commit()
                with progressed:
                    consumed += len(messages)
                    if consumed >= warmup + count:
                        finished_at = now
                    progressed.notify_all()
        except BaseException as exc:
            with progressed:
                failure.append(exc)
                progressed.notify_all()
        finally:
            consumer.close(autocommit=False)

    def send_all(producer: KafkaProducer, first: int, last: int, rate: float | None) -> None:
        began = time.perf_counter()
        for i in range(first, last):
            if rate is not None:
                time.sleep(max(0.0, began + (i - first) / rate - time.perf_counter()))
            send_times[i] = time.perf_counter()
            value = struct.pack(">Q", i) + filler[8:]
            producer.send(topic, key=keys[i], value=value, headers=headers)
        producer.flush()

    def wait_consumed(target: int) -> None:
        with progressed:
            if not progressed.wait_for(
                lambda: consumed >= target or bool(failure), timeout=PIPELINE_TIMEOUT_S
            ):
                raise TimeoutError(f"bare kafka: {consumed}/{target} consumed")
        if failure:
            raise failure[0]

    thread = threading.Thread(target=consume, name="bare-consumer", daemon=True)
    thread.start()
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        enable_idempotence=True,
        acks="all",
        linger_ms=LINGER_MS,
    )
    try:
        send_all(producer, 0, warmup, None)
        wait_consumed(warmup)
        measuring_since = start = time.perf_counter()
        send_all(producer, warmup, warmup + count, rate)
        wait_consumed(warmup + count)
        thread.join(timeout=PIPELINE_TIMEOUT_S)
        if consumed != warmup + count or finished_at is None:
            raise AssertionError(f"bare kafka: {consumed} records consumed of {warmup + count}")
        return PathResult(
            name="bare kafka-python",
            events=count,
            seconds=finished_at - start,
            latencies_s=latencies,
            delivered=count,
        )
    finally:
        stop.set()
        producer.close(timeout=5)
        thread.join(timeout=5)


# --- servers --------------------------------------------------------------------------


@contextlib.contextmanager
def local_servers(root: Path) -> Iterator[tuple[LocalPostgres, LocalKafka]]:
    """PostgreSQL and Kafka started side by side under ``root``; both stopped on exit."""
    pg, kafka = LocalPostgres(data_dir=root / "postgres"), LocalKafka(data_dir=root / "kafka")
    try:
        log("starting PostgreSQL and Kafka ...")
        with ThreadPoolExecutor(2) as pool:
            for future in [pool.submit(pg.start), pool.submit(kafka.start)]:
                future.result()
        yield pg, kafka
    finally:
        log("stopping PostgreSQL and Kafka ...")
        for server in (kafka, pg):
            try:
                server.stop()
            except Exception as exc:  # stop the other one regardless
                log(f"could not stop {type(server).__name__}: {exc}")


# --- report ---------------------------------------------------------------------------


@dataclass
class Series:
    """One pipeline: its throughput runs and its paced latency run."""

    name: str
    runs: list[PathResult] = field(default_factory=list)
    paced: PathResult | None = None

    @property
    def events_per_s(self) -> float:
        """The median run's throughput."""
        return statistics.median(run.events_per_s for run in self.runs)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def print_report(
    ours: dict[str, Series], baseline: Series, settings: Sequence[tuple[str, str]]
) -> None:
    """The readable table, then the JSON line."""
    print()
    print("events benchmark")
    for key, value in settings:
        print(f"  {key + ':':<24}{value}")
    print()
    header = (
        f"{'pipeline':<32}{'events/s':>9}{'(min-max)':>16}{'deliveries':>12}"
        f"{'p50 ms':>9}{'p99 ms':>9}"
    )
    print(header)
    print("-" * len(header))
    for series in [*ours.values(), baseline]:
        rates = [run.events_per_s for run in series.runs]
        spread = f"({min(rates):,.0f}-{max(rates):,.0f})"
        deliveries = sum(run.delivered for run in series.runs)
        events = sum(run.events for run in series.runs)
        p50 = series.paced.latency_ms(0.5) if series.paced else None
        p99 = series.paced.latency_ms(0.99) if series.paced else None
        print(
            f"{series.name:<32}{series.events_per_s:>9,.0f}{spread:>16}"
            f"{deliveries / events:>11.3f}x{_ms(p50):>9}{_ms(p99):>9}"
        )
    print()
    metrics = [
        {
            "metric": metric,
            "unit": "1/s",
            "ours": round(series.events_per_s, 1),
            "baseline": round(baseline.events_per_s, 1),
            "ratio": round(series.events_per_s / baseline.events_per_s, 3),
            "goal": None,
        }
        for metric, series in ours.items()
    ]
    print(f"{'metric':<24}{'ours':>10}{'baseline':>10}{'ratio':>8}")
    for m in metrics:
        print(f"{m['metric']:<24}{m['ours']:>10,.0f}{m['baseline']:>10,.0f}{m['ratio']:>8.3f}")
    print()
    print(json.dumps({"bench": "events", "results": metrics}))


def crc32c_implementation() -> str:
    """Which CRC32C kafka-python uses: record batches are checksummed on send and on fetch."""
    try:
        import crc32c  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
    except ImportError:
        return "pure Python (the crc32c package is not installed)"
    return "C (crc32c package)"


# --- main -----------------------------------------------------------------------------


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def run_async(pipeline: Coroutine[Any, Any, PathResult]) -> PathResult:
    """``asyncio.run`` in which SIGTERM, like Ctrl-C, cancels the pipeline so that it
    closes its connections, then raises ``KeyboardInterrupt``."""

    async def guarded() -> PathResult:
        task = asyncio.current_task()
        assert task is not None
        terminated = False

        def terminate() -> None:
            nonlocal terminated
            terminated = True
            task.cancel()

        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, terminate)
        try:
            return await pipeline
        except asyncio.CancelledError:
            if terminated:
                raise KeyboardInterrupt from None
            raise

    try:
        return asyncio.run(guarded())
    finally:
        # The loop's handler is gone with the loop; outside it, raise where we stand.
        signal.signal(signal.SIGTERM, _interrupt)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options; ``--quick`` only changes the defaults."""
    parser = argparse.ArgumentParser(
        description="Events/s end to end through the outbox, on the embedded log and on Kafka, "
        "against bare kafka-python."
    )
    parser.add_argument("--events", type=int, help=f"measured events per run ({DEFAULT_EVENTS})")
    parser.add_argument("--repeat", type=int, help="runs of each pipeline; the median counts (3)")
    parser.add_argument(
        "--quick", action="store_true", help=f"smoke run: {QUICK_EVENTS} events, 1 run"
    )
    parser.add_argument("--per-txn", type=int, default=100, help="events per producer transaction")
    parser.add_argument("--relay-batch", type=int, default=500, help="OutboxRelay batch_size")
    parser.add_argument("--seed", type=int, default=1, help="workload seed")
    args = parser.parse_args(argv)
    if args.events is None:
        args.events = QUICK_EVENTS if args.quick else DEFAULT_EVENTS
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if min(args.events, args.repeat, args.per_txn, args.relay_batch) < 1:
        parser.error("--events, --repeat, --per-txn and --relay-batch must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Start the servers, run each pipeline ``--repeat`` times and once paced, report."""
    args = parse_args(argv)
    # SIGTERM takes the same way out as Ctrl-C, so the servers get stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    per_txn: int = args.per_txn
    n_warmup = max(per_txn, min(1000, args.events // 10))
    n_paced = min(QUICK_LATENCY_EVENTS if args.quick else LATENCY_EVENTS, args.events)
    events = make_events(n_warmup + args.events, args.seed)
    warmup, measured, paced = events[:n_warmup], events[n_warmup:], events[-n_paced:]
    size = record_size(events[:200])
    load = os.getloadavg()[0]
    embedded = Series("flywheel, embedded log (SQLite)")
    on_kafka = Series("flywheel, Kafka (PostgreSQL)")
    baseline = Series("bare kafka-python")
    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(
            prefix="flywheel-bench-events-", ignore_cleanup_errors=True
        ) as tmp,
        local_servers(Path(tmp)) as (pg, kafka),
    ):
        root = Path(tmp)
        ensure_topics(kafka.bootstrap, [FEEDBACK_TOPIC])

        def run_embedded(
            run: str, batch: Sequence[tuple[str, FeedbackRecorded]], rate: float | None
        ) -> PathResult:
            log(f"[{embedded.name}] {n_warmup:,} warm-up + {len(batch):,} events")
            return run_async(
                flywheel_pipeline(
                    "embedded",
                    f"sqlite+aiosqlite:///{root / f'service_{run}.db'}",
                    f"sqlite+aiosqlite:///{root / f'consumer_{run}.db'}",
                    EmbeddedLogBus(f"sqlite+aiosqlite:///{root / f'event_log_{run}.db'}"),
                    warmup,
                    batch,
                    per_txn,
                    args.relay_batch,
                    rate,
                )
            )

        def run_kafka(
            run: str, batch: Sequence[tuple[str, FeedbackRecorded]], rate: float | None
        ) -> PathResult:
            log(f"[{on_kafka.name}] {n_warmup:,} warm-up + {len(batch):,} events")
            # Same topic and group every run: the group resumes at its committed offsets,
            # past the earlier runs' events; the databases are new.
            return run_async(
                flywheel_pipeline(
                    "kafka",
                    pg.create_database(f"bench_service_{run}"),
                    pg.create_database(f"bench_consumer_{run}"),
                    KafkaBus(kafka.bootstrap, client_id="bench", linger_ms=LINGER_MS),
                    warmup,
                    batch,
                    per_txn,
                    args.relay_batch,
                    rate,
                )
            )

        def run_bare(run: str, count: int, rate: float | None) -> PathResult:
            log(f"[{baseline.name}] {n_warmup:,} warm-up + {count:,} records")
            return bare_kafka(
                kafka.bootstrap, f"bench.bare.{run}", n_warmup, count, size, rate=rate
            )

        # A fresh broker runs interpreted until its JIT has compiled the hot paths; one
        # untimed pass keeps that from counting against whichever pipeline runs first.
        log("warming up the broker ...")
        bare_kafka(kafka.bootstrap, "bench.warmup.v1", 0, 10_000, size, group="bench-warmup")
        for run in range(1, args.repeat + 1):
            log(f"throughput, run {run}/{args.repeat}")
            embedded.runs.append(run_embedded(str(run), measured, None))
            on_kafka.runs.append(run_kafka(str(run), measured, None))
            baseline.runs.append(run_bare(str(run), args.events, None))
            log(
                f"run {run}: embedded {embedded.runs[-1].events_per_s:,.0f}/s, "
                f"kafka {on_kafka.runs[-1].events_per_s:,.0f}/s, "
                f"bare {baseline.runs[-1].events_per_s:,.0f}/s"
            )
        log(f"latency: {n_paced:,} events at {LATENCY_RATE:,.0f}/s, one per transaction")
        embedded.paced = run_embedded("paced", paced, LATENCY_RATE)
        on_kafka.paced = run_kafka("paced", paced, LATENCY_RATE)
        baseline.paced = run_bare("paced", n_paced, LATENCY_RATE)
    print_report(
        {"events_per_s_embedded": embedded, "events_per_s_kafka": on_kafka},
        baseline,
        [
            ("events per run", f"{args.events:,}, after {n_warmup:,} untimed warm-up events"),
            ("runs", f"{args.repeat} per pipeline, interleaved; events/s is the median run"),
            ("producer transactions", f"{per_txn} events each"),
            ("relay batch", str(args.relay_batch)),
            ("record", f"~{size} B envelope, key = one of {len(TENANTS)} tenants"),
            ("kafka", f"1 broker, {KAFKA_PARTITIONS} partitions, acks=all, idempotent producer"),
            ("kafka-python crc32c", crc32c_implementation()),
            ("deliveries", "records handed to consumers per event (1.000x: no redelivery)"),
            (
                "latency",
                f"write to effect, {n_paced:,} events at {LATENCY_RATE:,.0f}/s "
                "(one per transaction), not at saturation",
            ),
            ("machine", f"{os.cpu_count()} CPUs, load average {load:.2f} at start"),
            ("wall time", f"{time.perf_counter() - started:,.0f} s"),
        ],
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)
