"""The inference service's migrations build exactly the tables its models describe."""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel.core.testing.migration_check import migration_drift
from flywheel.inference import generation_log, models
from flywheel.inference.models import MIGRATIONS


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_models_and_migrations_agree(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'i.sqlite3'}"
    schema = None
    if backend == "postgres":
        url, schema = request.getfixturevalue("pg_url"), "inference"
    tables = [
        models.RegisteredAdapterRow,
        models.AliasRow,
        models.AliasRevisionRow,
        generation_log.PendingGenerationRow,
    ]
    assert await migration_drift(url, schema, [MIGRATIONS], tables) == []
