"""Fixtures of the core tests: a migrated service database on SQLite or PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from flywheel.core.db import create_engine
from flywheel.core.migrations import upgrade


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database URL of each backend."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'service.sqlite3'}"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on a migrated database (schema ``svc`` on PostgreSQL)."""
    schema = None if database_url.startswith("sqlite") else "svc"
    engine = create_engine(database_url, schema=schema)
    await upgrade(engine, schema, [])
    yield engine
    await engine.dispose()
