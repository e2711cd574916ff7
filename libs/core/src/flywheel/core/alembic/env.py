"""Alembic environment: runs on the connection flywheel.core.migrations hands it."""

from __future__ import annotations

from alembic import context

from flywheel.core.db import Base
from flywheel.core.events import inbox, outbox  # noqa: F401  (core tables on Base.metadata)

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through flywheel.core.migrations.upgrade()")

context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
