"""The inference service's tables: the adapter registry, aliases and their history."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Index, Integer, String, Text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from flywheel.core.db import Base

# The service's Alembic revisions (branch "inference"), for core.migrations.upgrade.
MIGRATIONS = Path(__file__).parent / "migrations" / "versions"

# JSONB on PostgreSQL, JSON text on SQLite.
Json = JSON().with_variant(JSONB(), "postgresql")


class RegisteredAdapterRow(Base):
    """An adapter version known to the fleet, its status and why it was rejected.

    Named ``registered_adapters``, not ``adapters``: every service's tables share one
    metadata, and the trainer's published adapters already hold that name.
    """

    __tablename__ = "registered_adapters"
    __table_args__ = (
        Index("ix_registered_adapters_tenant", "tenant_id", "registered_at"),
        # A replica starting up asks for every ROUTABLE adapter, across tenants.
        Index("ix_registered_adapters_status", "status"),
    )

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    version: Mapped[str] = mapped_column(String(40), primary_key=True)
    # The AdapterManifest message as protobuf JSON.
    manifest: Mapped[dict[str, Any]] = mapped_column(Json)
    # An AdapterStatus value.
    status: Mapped[int] = mapped_column(Integer)
    reject_code: Mapped[str] = mapped_column(String(63), default="")
    reject_reason: Mapped[str] = mapped_column(Text, default="")
    # For a composite: [{"name", "version", "weight"}, ...]; empty otherwise.
    components: Mapped[list[dict[str, Any]]] = mapped_column(Json, default=list)
    registered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class AliasRow(Base):
    """A tenant's alias as it routes now."""

    __tablename__ = "aliases"
    __table_args__ = (Index("ix_aliases_tenant", "tenant_id", "created_at"),)

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    # Bare name; callers write "<tenant>/<name>".
    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    # [{"label", "weight", "adapters": [{"name", "version", "weight"}]}, ...]
    arms: Mapped[list[dict[str, Any]]] = mapped_column(Json)
    sticky: Mapped[bool] = mapped_column(Boolean, default=False)
    revision: Mapped[int] = mapped_column(Integer)
    # Listing order; unlike updated_at it does not move, so pages stay stable.
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AliasRevisionRow(Base):
    """Every revision an alias ever had, for rollback and audit.

    Kept when the alias is deleted, so a re-created alias continues the numbering (an old
    event can never look newer than it). A deletion is itself a revision with no arms.
    """

    __tablename__ = "alias_revisions"

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    revision: Mapped[int] = mapped_column(Integer, primary_key=True)
    arms: Mapped[list[dict[str, Any]]] = mapped_column(Json)
    sticky: Mapped[bool] = mapped_column(Boolean, default=False)
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
