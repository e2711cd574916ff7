"""Trainer service tables: jobs and adapters.

Revision ID: trainer_0001
Revises:
Create Date: 2026-11-27 13:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "trainer_0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("trainer",)
depends_on: str | Sequence[str] | None = "core_0001"

# JSONB on PostgreSQL, JSON text on SQLite (as in flywheel.trainer.models).
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("spec", Json, nullable=False),
        sa.Column("task", sa.String(length=63), nullable=False),
        sa.Column("method", sa.Integer(), nullable=False),
        sa.Column("state", sa.Integer(), nullable=False),
        sa.Column("state_reason", sa.Text(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("retry_of_job_id", sa.String(length=36), nullable=True),
        sa.Column("client_request_id", sa.String(length=200), nullable=True),
        sa.Column("training_request_id", sa.String(length=36), nullable=True),
        sa.Column("progress", Json, nullable=False),
        sa.Column("last_checkpoint_step", sa.Integer(), nullable=True),
        sa.Column("adapter_name", sa.String(length=200), nullable=True),
        sa.Column("adapter_version", sa.String(length=40), nullable=True),
        sa.Column("device", sa.String(length=40), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_jobs")),
        sa.UniqueConstraint("tenant_id", "client_request_id", name="uq_jobs_client_request"),
        sa.UniqueConstraint("tenant_id", "training_request_id", name="uq_jobs_training_request"),
    )
    op.create_index("ix_jobs_queue", "jobs", ["state", "priority", "created_at"])
    op.create_index("ix_jobs_tenant", "jobs", ["tenant_id", "created_at"])
    op.create_table(
        "adapters",
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("version", sa.String(length=40), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("task", sa.String(length=63), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("manifest", Json, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "name", "version", name=op.f("pk_adapters")),
    )
    op.create_index("ix_adapters_tenant", "adapters", ["tenant_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_adapters_tenant", table_name="adapters")
    op.drop_table("adapters")
    op.drop_index("ix_jobs_tenant", table_name="jobs")
    op.drop_index("ix_jobs_queue", table_name="jobs")
    op.drop_table("jobs")
