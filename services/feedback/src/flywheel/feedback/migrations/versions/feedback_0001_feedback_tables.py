"""Feedback service tables: tenants, users, API keys, task types, generations, feedback.

Revision ID: feedback_0001
Revises:
Create Date: 2026-11-27 08:47:07.463105
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "feedback_0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("feedback",)
depends_on: str | Sequence[str] | None = "core_0001"

# JSONB on PostgreSQL, JSON text on SQLite (as in flywheel.feedback.models).
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("display_name", sa.String(length=200), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_tenants")),
    )
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("role", sa.String(length=20), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.String(length=36), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.tenant_id"], name=op.f("fk_api_keys_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("key_id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("secret_hash", name=op.f("uq_api_keys_secret_hash")),
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_keys_tenant_id"), ["tenant_id"], unique=False)

    op.create_table(
        "generations",
        sa.Column("generation_id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("client_generation_id", sa.String(length=200), nullable=True),
        sa.Column("task", sa.String(length=63), nullable=False),
        sa.Column(
            "prompt",
            Json,
            nullable=False,
        ),
        sa.Column("prompt_hash", sa.String(length=64), nullable=False),
        sa.Column("output", sa.Text(), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("base_model", sa.String(length=200), nullable=False),
        sa.Column("adapter_name", sa.String(length=200), nullable=True),
        sa.Column("adapter_version", sa.String(length=100), nullable=True),
        sa.Column(
            "composed_adapters",
            Json,
            nullable=False,
        ),
        sa.Column("alias", sa.String(length=200), nullable=True),
        sa.Column("traffic_arm", sa.String(length=100), nullable=True),
        sa.Column(
            "sampling",
            Json,
            nullable=False,
        ),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(length=200), nullable=True),
        sa.Column(
            "metadata",
            Json,
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.tenant_id"], name=op.f("fk_generations_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("generation_id", name=op.f("pk_generations")),
        sa.UniqueConstraint(
            "tenant_id", "client_generation_id", name=op.f("uq_generations_tenant_id")
        ),
    )
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.create_index(
            "ix_generations_tenant_created",
            ["tenant_id", "created_at", "generation_id"],
            unique=False,
        )
        batch_op.create_index(
            "ix_generations_tenant_prompt", ["tenant_id", "prompt_hash"], unique=False
        )

    op.create_table(
        "task_types",
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("domain", sa.String(length=100), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.tenant_id"], name=op.f("fk_task_types_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("tenant_id", "name", name=op.f("pk_task_types")),
    )
    op.create_table(
        "users",
        sa.Column("user_id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("external_id", sa.String(length=200), nullable=False),
        sa.Column("display_name", sa.String(length=200), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.tenant_id"], name=op.f("fk_users_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_users")),
        sa.UniqueConstraint("tenant_id", "external_id", name=op.f("uq_users_tenant_id")),
    )
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_users_tenant_id"), ["tenant_id"], unique=False)

    op.create_table(
        "feedback",
        sa.Column("feedback_id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("generation_id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column(
            "value",
            Json,
            nullable=False,
        ),
        sa.Column("thumbs_up", sa.Boolean(), nullable=True),
        sa.Column("rating", sa.Integer(), nullable=True),
        sa.Column("preference_choice", sa.String(length=10), nullable=True),
        sa.Column("generation_b_id", sa.String(length=36), nullable=True),
        sa.Column("source_kind", sa.String(length=20), nullable=False),
        sa.Column("critic", sa.String(length=200), nullable=False),
        sa.Column("user_id", sa.String(length=200), nullable=True),
        sa.Column(
            "dimension_scores",
            Json,
            nullable=False,
        ),
        sa.Column("client_feedback_id", sa.String(length=200), nullable=True),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column(
            "metadata",
            Json,
            nullable=False,
        ),
        sa.Column("task", sa.String(length=63), nullable=False),
        sa.Column("adapter_name", sa.String(length=200), nullable=True),
        sa.Column("adapter_version", sa.String(length=100), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retracted_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["generation_id"],
            ["generations.generation_id"],
            name=op.f("fk_feedback_generation_id_generations"),
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.tenant_id"], name=op.f("fk_feedback_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("feedback_id", name=op.f("pk_feedback")),
        sa.UniqueConstraint("tenant_id", "client_feedback_id", name=op.f("uq_feedback_tenant_id")),
    )
    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.create_index(
            "ix_feedback_tenant_adapter",
            ["tenant_id", "adapter_name", "adapter_version"],
            unique=False,
        )
        batch_op.create_index(
            "ix_feedback_tenant_created", ["tenant_id", "created_at", "feedback_id"], unique=False
        )
        batch_op.create_index(
            "ix_feedback_tenant_generation", ["tenant_id", "generation_id"], unique=False
        )

    op.create_table(
        "feedback_revisions",
        sa.Column("feedback_id", sa.String(length=36), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column(
            "value",
            Json,
            nullable=False,
        ),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["feedback_id"],
            ["feedback.feedback_id"],
            name=op.f("fk_feedback_revisions_feedback_id_feedback"),
        ),
        sa.PrimaryKeyConstraint("feedback_id", "revision", name=op.f("pk_feedback_revisions")),
    )


def downgrade() -> None:
    op.drop_table("feedback_revisions")
    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.drop_index("ix_feedback_tenant_generation")
        batch_op.drop_index("ix_feedback_tenant_created")
        batch_op.drop_index("ix_feedback_tenant_adapter")

    op.drop_table("feedback")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_users_tenant_id"))

    op.drop_table("users")
    op.drop_table("task_types")
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.drop_index("ix_generations_tenant_prompt")
        batch_op.drop_index("ix_generations_tenant_created")

    op.drop_table("generations")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_keys_tenant_id"))

    op.drop_table("api_keys")
    op.drop_table("tenants")
