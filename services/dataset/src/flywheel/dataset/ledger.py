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

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from flywheel.contracts.feedback.v1 import events_pb2 as fe
from flywheel.contracts.feedback.v1 import resources_pb2 as fb
from flywheel.core.db import SessionFactory, insert_ignoring_conflicts
from flywheel.core.events.bus import EventRecord
from flywheel.core.events.envelope import parse, unpack
from flywheel.core.events.inbox import claim_events
from flywheel.core.events.topics import EventType
from flywheel.dataset.models import FeedbackVersion, SourceGeneration
from flywheel.dataset.options import BuildOptions
from flywheel.dataset.records import (
    FeedbackFact,
    GenerationText,
    fact_from_columns,
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
    versions: dict[str, dict[str, Any]] = {}
    generations: dict[str, dict[str, Any]] = {}
    for record in records:
        if record.event_id not in fresh or record.event_id in versions:
            continue
        decoded = _decode(record)
        if decoded is None:
            continue
        version, judged = decoded
        versions[record.event_id] = version
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


def _latest_versions(tenant_id: str, options: BuildOptions) -> Any:
    """Each feedback's latest version up to the cutoff (a window query, on both backends)."""
    v = FeedbackVersion
    rank = (
        func.row_number()
        .over(
            partition_by=v.feedback_id,
            order_by=(v.occurred_at.desc(), v.retracted.desc(), v.revision.desc(), v.event_id),
        )
        .label("rank")
    )
    scoped = select(v, rank).where(v.tenant_id == tenant_id, v.occurred_at < options.cutoff)
    if options.task:
        scoped = scoped.where(v.task == options.task)
    return scoped.subquery()


async def load_facts(
    sessions: SessionFactory, tenant_id: str, options: BuildOptions
) -> tuple[list[FeedbackFact], dict[str, GenerationText]]:
    """The tenant's feedback as it stood at the cutoff, and the generations it judges."""
    latest = _latest_versions(tenant_id, options)
    statement = select(latest).where(
        latest.c.rank == 1, latest.c.retracted.is_(False), latest.c.kind.in_(USABLE_KINDS)
    )
    async with sessions() as session:
        rows = (await session.execute(statement)).mappings().all()
        facts = [fact_from_columns(dict(row)) for row in rows]
        wanted = {f.generation_id for f in facts} | {
            f.generation_b_id for f in facts if f.generation_b_id
        }
        generations = await _generations(session, tenant_id, wanted)
    return facts, generations


async def _generations(
    session: AsyncSession, tenant_id: str, wanted: set[str]
) -> dict[str, GenerationText]:
    found: dict[str, GenerationText] = {}
    ids = sorted(wanted)
    g = SourceGeneration
    # In chunks: a build may judge hundreds of thousands of generations.
    for start in range(0, len(ids), 5000):
        chunk = ids[start : start + 5000]
        rows = await session.execute(
            select(g.generation_id, g.task, g.prompt, g.prompt_hash, g.output).where(
                g.tenant_id == tenant_id, g.generation_id.in_(chunk)
            )
        )
        for generation_id, task, prompt, prompt_hash, output in rows:
            found[generation_id] = GenerationText(
                generation_id, task, prompt_value(prompt), prompt_hash, output
            )
    return found


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
