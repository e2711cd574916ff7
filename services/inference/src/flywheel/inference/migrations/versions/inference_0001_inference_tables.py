"""Inference service tables: registered adapters, aliases and alias revisions.

Revision ID: inference_0001
Revises:
Create Date: 2026-12-01 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "inference_0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("inference",)
depends_on: str | Sequence[str] | None = "core_0001"

# JSONB on PostgreSQL, JSON text on SQLite (as in flywheel.inference.models).
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "registered_adapters",
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("version", sa.String(length=40), nullable=False),
        sa.Column("manifest", Json, nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("reject_code", sa.String(length=63), nullable=False),
        sa.Column("reject_reason", sa.Text(), nullable=False),
        sa.Column("components", Json, nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint(
            "tenant_id", "name", "version", name=op.f("pk_registered_adapters")
        ),
    )
    op.create_index(
        "ix_registered_adapters_tenant", "registered_adapters", ["tenant_id", "registered_at"]
    )
    op.create_index("ix_registered_adapters_status", "registered_adapters", ["status"])
    op.create_table(
        "aliases",
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("arms", Json, nullable=False),
        sa.Column("sticky", sa.Boolean(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "name", name=op.f("pk_aliases")),
    )
    op.create_index("ix_aliases_tenant", "aliases", ["tenant_id", "created_at"])
    op.create_table(
        "alias_revisions",
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("arms", Json, nullable=False),
        sa.Column("sticky", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "name", "revision", name=op.f("pk_alias_revisions")),
    )


def downgrade() -> None:
    op.drop_table("alias_revisions")
    op.drop_index("ix_aliases_tenant", table_name="aliases")
    op.drop_table("aliases")
    op.drop_index("ix_registered_adapters_status", table_name="registered_adapters")
    op.drop_index("ix_registered_adapters_tenant", table_name="registered_adapters")
    op.drop_table("registered_adapters")
