"""The dataset service's tables.

The service keeps its own copy of what the feedback events said (it never reads the
feedback service's database): every version of every feedback, one row per event, and the
generations they judge. A snapshot is built from the versions as of a cutoff instant, so
the same spec and cutoff always give the same data, whatever arrived later.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    String,
    Text,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from flywheel.core.db import Base

# JSONB on PostgreSQL, JSON text on SQLite.
Json = JSON().with_variant(JSONB(), "postgresql")


class SourceGeneration(Base):
    """A generation some feedback judged: the prompt and output training rows are made of."""

    __tablename__ = "source_generations"

    generation_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(63))
    task: Mapped[str] = mapped_column(String(63))
    # The Prompt message as protobuf JSON: {"text": ...} or {"messages": {"messages": [...]}}.
    prompt: Mapped[dict[str, Any]] = mapped_column(Json)
    prompt_hash: Mapped[str] = mapped_column(String(80))
    output: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class FeedbackVersion(Base):
    """One feedback as one event left it: recorded, edited or retracted.

    The value is spread over typed columns so that builds can select and aggregate in SQL.
    """

    __tablename__ = "feedback_versions"
    __table_args__ = (
        # A build's scan: a tenant's (and task's) versions up to a cutoff.
        Index("ix_feedback_versions_scope", "tenant_id", "task", "occurred_at"),
        Index("ix_feedback_versions_feedback", "feedback_id", "occurred_at"),
    )

    event_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    feedback_id: Mapped[str] = mapped_column(String(36))
    tenant_id: Mapped[str] = mapped_column(String(63))
    task: Mapped[str] = mapped_column(String(63))
    generation_id: Mapped[str] = mapped_column(String(36))
    revision: Mapped[int] = mapped_column(Integer)
    # thumbs | rating | comment | preference | correction
    kind: Mapped[str] = mapped_column(String(20))
    thumbs_up: Mapped[bool | None] = mapped_column(Boolean)
    rating: Mapped[int | None] = mapped_column(Integer)
    # a | b | tie, against generation_b_id
    choice: Mapped[str | None] = mapped_column(String(10))
    strength: Mapped[float | None] = mapped_column(Float)
    generation_b_id: Mapped[str | None] = mapped_column(String(36))
    correction: Mapped[str | None] = mapped_column(Text)
    # "human" or "synthetic:<critic>"
    source: Mapped[str] = mapped_column(String(220))
    # [[dimension, score], ...] from critics
    dimension_scores: Mapped[list[Any]] = mapped_column(Json)
    retracted: Mapped[bool] = mapped_column(Boolean)
    # When the event happened (its envelope's occurred_at): the order versions apply in.
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    received_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )


class SnapshotRow(Base):
    """An immutable snapshot: its id is the sha256 of its data."""

    __tablename__ = "snapshots"
    __table_args__ = (Index("ix_snapshots_scope", "tenant_id", "task", "kind", "created_at"),)

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    snapshot_id: Mapped[str] = mapped_column(String(80), primary_key=True)
    task: Mapped[str] = mapped_column(String(63))
    kind: Mapped[str] = mapped_column(String(20))
    # The Snapshot message as protobuf JSON (spec, stats, quality, files, lineage).
    message: Mapped[dict[str, Any]] = mapped_column(Json)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class TriggerPolicyRow(Base):
    """A tenant's trigger policy for one task, and when it last fired."""

    __tablename__ = "trigger_policies"

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    task: Mapped[str] = mapped_column(String(63), primary_key=True)
    # The TriggerPolicy message as protobuf JSON; null: the service's defaults (the row
    # then only remembers when the default policy fired).
    policy: Mapped[dict[str, Any] | None] = mapped_column(Json)
    last_triggered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
