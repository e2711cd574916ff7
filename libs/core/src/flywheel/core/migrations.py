"""Alembic migrations, run programmatically at service start.

Core's own tables (outbox, processed events) have their revisions in
``flywheel/core/alembic/versions`` under the branch label ``core``; each service keeps its
revisions in its own ``migrations`` folder. Upgrading to ``heads`` applies both branches, so a
service never copies core's tables into its migrations.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.ext.asyncio import AsyncEngine

from flywheel.core.db import ensure_schema

CORE_ALEMBIC_DIR = Path(__file__).parent / "alembic"


def alembic_config(engine: AsyncEngine, version_dirs: list[Path]) -> Config:
    """An Alembic config over core's revisions plus ``version_dirs`` for ``engine``."""
    config = Config()
    config.set_main_option("script_location", str(CORE_ALEMBIC_DIR))
    locations = [CORE_ALEMBIC_DIR / "versions", *version_dirs]
    config.set_main_option("version_locations", " ".join(str(p) for p in locations))
    config.set_main_option("path_separator", "space")
    config.attributes["engine"] = engine
    return config


async def upgrade(engine: AsyncEngine, schema: str | None, version_dirs: list[Path]) -> None:
    """Bring the service's database (its schema, on PostgreSQL) to the newest revision."""
    await ensure_schema(engine, schema)
    config = alembic_config(engine, version_dirs)
    async with engine.begin() as conn:

        def _run(sync_conn: object) -> None:
            config.attributes["connection"] = sync_conn
            command.upgrade(config, "heads")

        await conn.run_sync(_run)
