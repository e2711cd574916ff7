"""The trainer service's tables: jobs (the queue is the QUEUED rows) and published adapters."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from flywheel.core.db import Base

# JSONB on PostgreSQL, JSON text on SQLite.
Json = JSON().with_variant(JSONB(), "postgresql")


class JobRow(Base):
    """One training job and its latest state and progress."""

    __tablename__ = "jobs"
    __table_args__ = (
        # The scheduler's pick: highest priority, then oldest, among queued jobs.
        Index("ix_jobs_queue", "state", "priority", "created_at"),
        Index("ix_jobs_tenant", "tenant_id", "created_at"),
        # Idempotency of SubmitJob (client_request_id) and of training.requested events.
        UniqueConstraint("tenant_id", "client_request_id", name="uq_jobs_client_request"),
        UniqueConstraint("tenant_id", "training_request_id", name="uq_jobs_training_request"),
    )

    job_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(63))
    # The TrainingSpec message as protobuf JSON.
    spec: Mapped[dict[str, Any]] = mapped_column(Json)
    task: Mapped[str] = mapped_column(String(63))
    method: Mapped[int] = mapped_column(Integer)
    state: Mapped[int] = mapped_column(Integer)
    state_reason: Mapped[str] = mapped_column(Text, default="")
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    retry_of_job_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    client_request_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    training_request_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    # The JobProgress message as protobuf JSON.
    progress: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)
    last_checkpoint_step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    adapter_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    adapter_version: Mapped[str | None] = mapped_column(String(40), nullable=True)
    device: Mapped[str] = mapped_column(String(40), default="")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class AdapterRow(Base):
    """A published adapter version and its manifest."""

    __tablename__ = "adapters"
    __table_args__ = (Index("ix_adapters_tenant", "tenant_id", "created_at"),)

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    version: Mapped[str] = mapped_column(String(40), primary_key=True)
    # Its number among the name's versions (v1, v2, ...), for ordering.
    number: Mapped[int] = mapped_column(Integer)
    task: Mapped[str] = mapped_column(String(63))
    job_id: Mapped[str] = mapped_column(String(36))
    # The AdapterManifest message as protobuf JSON.
    manifest: Mapped[dict[str, Any]] = mapped_column(Json)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
