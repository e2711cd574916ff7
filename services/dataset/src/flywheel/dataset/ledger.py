"""The service's copy of the feedback stream: applying events, and reading it back as of a cutoff.

Applying is idempotent by event id (the inbox claim and the versions' primary key), and
order-free: a version is a row of its own, and a read picks each feedback's latest version
by event time, so an edit that arrives before its recording still ends up right.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Text, cast, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from flywheel.contracts.feedback.v1 import events_pb2 as fe
from flywheel.contracts.feedback.v1 import resources_pb2 as fb
from flywheel.core.db import SessionFactory, insert_ignoring_conflicts
from flywheel.core.events.bus import EventRecord
from flywheel.core.events.envelope import parse, unpack
from flywheel.core.events.inbox import claim_events
from flywheel.core.events.topics import EventType
from flywheel.dataset import pg_input
from flywheel.dataset.builder import gc_paused
from flywheel.dataset.models import FeedbackVersion, SourceGeneration
from flywheel.dataset.options import BuildOptions
from flywheel.dataset.records import (
    FACT_COLUMNS,
    FeedbackFact,
    GenerationText,
    fact_from_row,
    generation_columns,
    prompt_value,
    version_columns,
)

CONSUMER_GROUP = "dataset"
# Kinds that can make training rows (comments cannot).
USABLE_KINDS = ("thumbs", "rating", "preference", "correction")


@dataclass(frozen=True, slots=True)
class Applied:
    """What one batch changed: the (tenant, task) scopes that got new versions."""

    scopes: frozenset[tuple[str, str]]
    events: int


def _decode(record: EventRecord) -> tuple[dict[str, Any], list[fb.Generation]] | None:
    """A feedback event as a version row and the generations it carries; None: not ours."""
    envelope = parse(record.value)
    occurred = envelope.occurred_at.ToDatetime(UTC)
    if envelope.type == EventType.FEEDBACK_RECORDED:
        recorded = unpack(envelope, fe.FeedbackRecorded)
        feedback, generations = recorded.feedback, [recorded.generation]
        if recorded.HasField("generation_b"):
            generations.append(recorded.generation_b)
    elif envelope.type == EventType.FEEDBACK_EDITED:
        edited = unpack(envelope, fe.FeedbackEdited)
        feedback, generations = edited.feedback, [edited.generation]
        if edited.HasField("generation_b"):
            generations.append(edited.generation_b)
    elif envelope.type == EventType.FEEDBACK_RETRACTED:
        feedback = unpack(envelope, fe.FeedbackRetracted).feedback
        generations = []
    else:
        return None
    version = version_columns(
        feedback,
        event_id=envelope.event_id,
        occurred_at=occurred,
        retracted=envelope.type == EventType.FEEDBACK_RETRACTED,
    )
    return version, generations


async def apply_events(session: AsyncSession, records: Sequence[EventRecord]) -> Applied:
    """Apply a batch of feedback events in ``session``'s transaction, each at most once."""
    fresh = await claim_events(session, CONSUMER_GROUP, [r.event_id for r in records])
    # Set here rather than by the database: SQLite's clock has whole seconds, and the
    # policy compares arrivals with snapshot times taken in Python.
    received = datetime.now(UTC)
    versions: dict[str, dict[str, Any]] = {}
    generations: dict[str, dict[str, Any]] = {}
    for record in records:
        if record.event_id not in fresh or record.event_id in versions:
            continue
        decoded = _decode(record)
        if decoded is None:
            continue
        version, judged = decoded
        versions[record.event_id] = version | {"received_at": received}
        for generation in judged:
            generations.setdefault(generation.generation_id, generation_columns(generation))
    if generations:
        await session.execute(
            insert_ignoring_conflicts(session, SourceGeneration), list(generations.values())
        )
    if versions:
        await session.execute(
            insert_ignoring_conflicts(session, FeedbackVersion), list(versions.values())
        )
    return Applied(
        scopes=frozenset((v["tenant_id"], v["task"]) for v in versions.values()),
        events=len(versions),
    )


def _fact_columns() -> list[Any]:
    """The version columns a fact is made of (``FACT_COLUMNS``, in order)."""
    v = FeedbackVersion
    columns: list[Any] = [getattr(v, name) for name in FACT_COLUMNS[:-1]]
    # Scores as text: most are empty ("[]"), and decoding JSON per row is the slow part.
    return [*columns, cast(v.dimension_scores, Text).label("dimension_scores")]


def _latest_versions(dialect: str, tenant_id: str, options: BuildOptions) -> Any:
    """Each feedback's latest version up to the cutoff, usable and not retracted.

    PostgreSQL picks it with ``DISTINCT ON`` (one sort); SQLite with a window function.
    """
    v = FeedbackVersion
    latest_first = (v.occurred_at.desc(), v.retracted.desc(), v.revision.desc(), v.event_id)
    scope = [v.tenant_id == tenant_id, v.occurred_at < options.cutoff]
    if options.task:
        scope.append(v.task == options.task)
    columns = _fact_columns()
    if dialect == "postgresql":
        inner = (
            select(*columns, v.retracted)
            .where(*scope)
            .distinct(v.feedback_id)
            .order_by(v.feedback_id, *latest_first)
            .subquery()
        )
        keep: list[ColumnElement[bool]] = [inner.c.retracted.is_(False)]
    else:
        rank = func.row_number().over(partition_by=v.feedback_id, order_by=latest_first)
        inner = select(*columns, v.retracted, rank.label("rank")).where(*scope).subquery()
        keep = [inner.c.rank == 1, inner.c.retracted.is_(False)]
    facts = [inner.c[name] for name in FACT_COLUMNS]
    return select(*facts).where(*keep, inner.c.kind.in_(USABLE_KINDS))


async def load_facts(
    sessions: SessionFactory, tenant_id: str, options: BuildOptions
) -> tuple[list[FeedbackFact], dict[str, GenerationText]]:
    """The tenant's feedback as it stood at the cutoff, and the generations it judges.

    Core statements on the connection, rows as tuples: a build reads up to millions of
    rows, and ORM or mapping rows would cost more than the build itself.
    """
    async with sessions() as session:
        conn = await session.connection()
        statement = _latest_versions(conn.dialect.name, tenant_id, options)
        rows = (await conn.execute(statement)).tuples()
        with gc_paused():
            facts = [fact_from_row(row) for row in rows]
        g = SourceGeneration
        # Only judged generations are stored, so the scope's are (nearly) all wanted.
        wanted = select(g.generation_id, g.task, g.prompt, g.prompt_hash, g.output).where(
            g.tenant_id == tenant_id
        )
        if options.task:
            wanted = wanted.where(g.task == options.task)
        texts = (await conn.execute(wanted)).tuples()
        with gc_paused():
            generations = {
                generation_id: GenerationText(
                    generation_id, task, prompt_value(prompt), prompt_hash, output
                )
                for generation_id, task, prompt, prompt_hash, output in texts
            }
    return facts, generations


async def load_pair_input(
    sessions: SessionFactory, tenant_id: str, options: BuildOptions
) -> pg_input.PairInput | None:
    """A pair build's input with the votes summed up by PostgreSQL (see pg_input); None
    where the database cannot do that for these options (then use :func:`load_facts`)."""
    async with sessions() as first, sessions() as second, sessions() as third:
        # The engine says which database it is without connecting (on SQLite, connecting
        # would take the write lock).
        dialect = first.get_bind().dialect
        if dialect.name != "postgresql" or not pg_input.applies(dialect.driver, options):
            return None
        raws = [await (await s.connection()).get_raw_connection() for s in (first, second, third)]
        try:
            return await pg_input.load_pair_input(
                [raw.driver_connection for raw in raws], tenant_id, options
            )
        except pg_input.InexactVotes:
            return None


async def count_usable_since(
    session: AsyncSession, tenant_id: str, task: str, since: datetime | None
) -> int:
    """Versions of usable kinds that arrived for a tenant and task after ``since``."""
    v = FeedbackVersion
    statement = select(func.count()).where(
        v.tenant_id == tenant_id,
        v.task == task,
        v.kind.in_(USABLE_KINDS),
        v.retracted.is_(False),
    )
    if since is not None:
        statement = statement.where(v.received_at > since)
    return int((await session.execute(statement)).scalar_one())
