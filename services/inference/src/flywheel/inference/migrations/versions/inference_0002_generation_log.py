"""The durable generation log: served generations waiting for the feedback service.

Revision ID: inference_0002
Revises: inference_0001
Create Date: 2026-12-01 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "inference_0002"
down_revision: str | Sequence[str] | None = "inference_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# 64-bit ids on PostgreSQL; SQLite auto-increments only a column declared exactly INTEGER
# (as flywheel.core.db.BigId).
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "pending_generations",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("client_generation_id", sa.String(length=200), nullable=False),
        sa.Column("generation", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pending_generations")),
        sa.UniqueConstraint(
            "tenant_id", "client_generation_id", name="uq_pending_generations_client_id"
        ),
    )
    op.create_index("ix_pending_generations_due", "pending_generations", ["next_attempt_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_pending_generations_due", table_name="pending_generations")
    op.drop_table("pending_generations")
