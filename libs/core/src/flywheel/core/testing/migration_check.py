"""Whether a service's migrations build exactly the tables its models describe."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData

from flywheel.core.db import Base, create_engine
from flywheel.core.events.inbox import ProcessedEvent
from flywheel.core.events.outbox import OutboxEvent
from flywheel.core.migrations import upgrade


async def migration_drift(
    url: str, schema: str | None, version_dirs: Sequence[Path], models: Iterable[type[Base]]
) -> list[object]:
    """Migrate a fresh database, then list how it differs from ``models`` (+ outbox, inbox).

    Every service's models share one ``Base.metadata``, so only the service's own tables
    (and core's) are compared; an empty list means models and migrations agree.
    """
    engine = create_engine(url, schema=schema)
    try:
        await upgrade(engine, schema, list(version_dirs))
        everything: list[type[Base]] = [*models, OutboxEvent, ProcessedEvent]
        names = {m.__table__.name for m in everything}  # type: ignore[attr-defined]
        expected = MetaData(naming_convention=Base.metadata.naming_convention)
        for table in Base.metadata.tables.values():
            if table.name in names:
                table.to_metadata(expected)

        def diff(sync_conn: object) -> list[object]:
            context = MigrationContext.configure(sync_conn)  # type: ignore[arg-type]
            return list(compare_metadata(context, expected))

        async with engine.connect() as conn:
            return await conn.run_sync(diff)
    finally:
        await engine.dispose()
