"""The feedback service's tables. Every row belongs to one tenant, and every query the
service runs filters by it (see :mod:`flywheel.feedback.repository`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from flywheel.core.db import Base

# JSONB on PostgreSQL (indexable, compact); JSON text on SQLite.
Json = JSON().with_variant(JSONB(), "postgresql")


class TenantRow(Base):
    """A brand: the unit of isolation."""

    __tablename__ = "tenants"

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    display_name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class UserRow(Base):
    """A person known to a tenant."""

    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("tenant_id", "external_id"),)

    user_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.tenant_id"), index=True)
    external_id: Mapped[str] = mapped_column(String(200))
    display_name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ApiKeyRow(Base):
    """An API key; only the keyed hash of its secret is stored."""

    __tablename__ = "api_keys"

    key_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.tenant_id"), index=True)
    role: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class TaskTypeRow(Base):
    """A kind of task, per tenant."""

    __tablename__ = "task_types"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.tenant_id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    description: Mapped[str] = mapped_column(Text, default="")
    domain: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class GenerationRow(Base):
    """One model output as served; immutable once logged."""

    __tablename__ = "generations"
    __table_args__ = (
        UniqueConstraint("tenant_id", "client_generation_id"),
        # Newest-first listing with a (created_at, id) cursor.
        Index("ix_generations_tenant_created", "tenant_id", "created_at", "generation_id"),
        Index("ix_generations_tenant_prompt", "tenant_id", "prompt_hash"),
    )

    generation_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.tenant_id"))
    client_generation_id: Mapped[str | None] = mapped_column(String(200))
    task: Mapped[str] = mapped_column(String(63))
    # The Prompt message as protobuf JSON ({"text": ...} or {"messages": {...}}).
    prompt: Mapped[dict[str, Any]] = mapped_column(Json)
    prompt_hash: Mapped[str] = mapped_column(String(64))
    output: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(200))
    base_model: Mapped[str] = mapped_column(String(200), default="")
    adapter_name: Mapped[str | None] = mapped_column(String(200))
    adapter_version: Mapped[str | None] = mapped_column(String(100))
    composed_adapters: Mapped[list[Any]] = mapped_column(Json, default=list)
    alias: Mapped[str | None] = mapped_column(String(200))
    traffic_arm: Mapped[str | None] = mapped_column(String(100))
    sampling: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    user_id: Mapped[str | None] = mapped_column(String(200))
    extra: Mapped[dict[str, Any]] = mapped_column("metadata", Json, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class FeedbackRow(Base):
    """The current revision of one piece of feedback (history in ``feedback_revisions``)."""

    __tablename__ = "feedback"
    __table_args__ = (
        UniqueConstraint("tenant_id", "client_feedback_id"),
        Index("ix_feedback_tenant_created", "tenant_id", "created_at", "feedback_id"),
        Index("ix_feedback_tenant_generation", "tenant_id", "generation_id"),
        Index("ix_feedback_tenant_adapter", "tenant_id", "adapter_name", "adapter_version"),
    )

    feedback_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.tenant_id"))
    generation_id: Mapped[str] = mapped_column(ForeignKey("generations.generation_id"))
    kind: Mapped[str] = mapped_column(String(20))
    # The FeedbackValue message as protobuf JSON; the columns below are copies for queries.
    value: Mapped[dict[str, Any]] = mapped_column(Json)
    thumbs_up: Mapped[bool | None] = mapped_column(Boolean)
    rating: Mapped[int | None] = mapped_column(Integer)
    preference_choice: Mapped[str | None] = mapped_column(String(10))
    generation_b_id: Mapped[str | None] = mapped_column(String(36))
    source_kind: Mapped[str] = mapped_column(String(20))
    critic: Mapped[str] = mapped_column(String(200), default="")
    user_id: Mapped[str | None] = mapped_column(String(200))
    dimension_scores: Mapped[list[Any]] = mapped_column(Json, default=list)
    client_feedback_id: Mapped[str | None] = mapped_column(String(200))
    revision: Mapped[int] = mapped_column(Integer, default=1)
    extra: Mapped[dict[str, Any]] = mapped_column("metadata", Json, default=dict)
    task: Mapped[str] = mapped_column(String(63))
    adapter_name: Mapped[str | None] = mapped_column(String(200))
    adapter_version: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    retracted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class FeedbackRevisionRow(Base):
    """Every revision ever recorded, so an edit never silently replaces what was said."""

    __tablename__ = "feedback_revisions"

    feedback_id: Mapped[str] = mapped_column(ForeignKey("feedback.feedback_id"), primary_key=True)
    revision: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[dict[str, Any]] = mapped_column(Json)
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
