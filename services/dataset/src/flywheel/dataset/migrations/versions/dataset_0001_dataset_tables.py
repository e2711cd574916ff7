"""Dataset service tables: the feedback ledger, snapshots, trigger policies.

Revision ID: dataset_0001
Revises:
Create Date: 2026-11-27 11:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "dataset_0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("dataset",)
depends_on: str | Sequence[str] | None = "core_0001"

# JSONB on PostgreSQL, JSON text on SQLite (as in flywheel.dataset.models).
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "source_generations",
        sa.Column("generation_id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("task", sa.String(length=63), nullable=False),
        sa.Column("prompt", Json, nullable=False),
        sa.Column("prompt_hash", sa.String(length=80), nullable=False),
        sa.Column("output", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("generation_id", name=op.f("pk_source_generations")),
    )
    op.create_table(
        "feedback_versions",
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("feedback_id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("task", sa.String(length=63), nullable=False),
        sa.Column("generation_id", sa.String(length=36), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("thumbs_up", sa.Boolean(), nullable=True),
        sa.Column("rating", sa.Integer(), nullable=True),
        sa.Column("choice", sa.String(length=10), nullable=True),
        sa.Column("strength", sa.Float(), nullable=True),
        sa.Column("generation_b_id", sa.String(length=36), nullable=True),
        sa.Column("correction", sa.Text(), nullable=True),
        sa.Column("source", sa.String(length=220), nullable=False),
        sa.Column("dimension_scores", Json, nullable=False),
        sa.Column("retracted", sa.Boolean(), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "received_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("event_id", name=op.f("pk_feedback_versions")),
    )
    op.create_index(
        "ix_feedback_versions_scope",
        "feedback_versions",
        ["tenant_id", "task", "occurred_at"],
        unique=False,
    )
    op.create_index(
        "ix_feedback_versions_feedback",
        "feedback_versions",
        ["feedback_id", "occurred_at"],
        unique=False,
    )
    op.create_table(
        "snapshots",
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("snapshot_id", sa.String(length=80), nullable=False),
        sa.Column("task", sa.String(length=63), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("message", Json, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "snapshot_id", name=op.f("pk_snapshots")),
    )
    op.create_index(
        "ix_snapshots_scope",
        "snapshots",
        ["tenant_id", "task", "kind", "created_at"],
        unique=False,
    )
    op.create_table(
        "trigger_policies",
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("task", sa.String(length=63), nullable=False),
        sa.Column("policy", Json, nullable=True),
        sa.Column("last_triggered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "task", name=op.f("pk_trigger_policies")),
    )


def downgrade() -> None:
    op.drop_table("trigger_policies")
    op.drop_index("ix_snapshots_scope", table_name="snapshots")
    op.drop_table("snapshots")
    op.drop_index("ix_feedback_versions_feedback", table_name="feedback_versions")
    op.drop_index("ix_feedback_versions_scope", table_name="feedback_versions")
    op.drop_table("feedback_versions")
    op.drop_table("source_generations")
