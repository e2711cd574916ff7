"""Idempotent claims, and migrations that match the models on both backends."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import AsyncEngine

from flywheel.core.db import Base, session_factory
from flywheel.core.events import outbox
from flywheel.core.events.inbox import ProcessedEvent, claim_events


async def test_an_event_is_claimed_once_per_group(engine: AsyncEngine) -> None:
    sessions = session_factory(engine)
    async with sessions() as session, session.begin():
        assert await claim_events(session, "dataset", ["a", "b", "b"]) == {"a", "b"}
    async with sessions() as session, session.begin():
        assert await claim_events(session, "dataset", ["b", "c"]) == {"c"}
        assert await claim_events(session, "critic", ["b"]) == {"b"}
    assert await _claims_after_rollback(engine) == {"d"}


async def _claims_after_rollback(engine: AsyncEngine) -> set[str]:
    sessions = session_factory(engine)
    async with sessions() as session, session.begin():
        await claim_events(session, "dataset", ["d"])
        await session.rollback()  # the effect failed: the claim goes with it
    async with sessions() as session, session.begin():
        return await claim_events(session, "dataset", ["d"])


async def test_migrations_create_exactly_the_modelled_tables(engine: AsyncEngine) -> None:
    # Core's tables only: other tests may have put services' models on Base.metadata.
    core = MetaData(naming_convention=Base.metadata.naming_convention)
    for name in (outbox.OutboxEvent.__tablename__, ProcessedEvent.__tablename__):
        Base.metadata.tables[name].to_metadata(core)

    def diff(sync_conn: object) -> list[object]:
        context = MigrationContext.configure(sync_conn)  # type: ignore[arg-type]
        return list(compare_metadata(context, core))

    async with engine.connect() as conn:
        assert await conn.run_sync(diff) == []
