"""The feedback service's migrations build exactly the tables its models describe."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData

from flywheel.core.db import Base, create_engine
from flywheel.core.events.inbox import ProcessedEvent
from flywheel.core.events.outbox import OutboxEvent
from flywheel.core.migrations import upgrade
from flywheel.feedback import models
from flywheel.feedback.server import MIGRATIONS


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_models_and_migrations_agree(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'f.sqlite3'}"
    schema = None
    if backend == "postgres":
        url, schema = request.getfixturevalue("pg_url"), "feedback"
    engine = create_engine(url, schema=schema)
    await upgrade(engine, schema, [MIGRATIONS])
    expected = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.tables.values():
        if table.name in {t.__tablename__ for t in _feedback_models()} | {
            OutboxEvent.__tablename__,
            ProcessedEvent.__tablename__,
        }:
            table.to_metadata(expected)

    def diff(sync_conn: object) -> list[object]:
        context = MigrationContext.configure(sync_conn)  # type: ignore[arg-type]
        return list(compare_metadata(context, expected))

    async with engine.connect() as conn:
        assert await conn.run_sync(diff) == []
    await engine.dispose()


def _feedback_models() -> list[type[Base]]:
    return [
        models.TenantRow,
        models.UserRow,
        models.ApiKeyRow,
        models.TaskTypeRow,
        models.GenerationRow,
        models.FeedbackRow,
        models.FeedbackRevisionRow,
    ]
