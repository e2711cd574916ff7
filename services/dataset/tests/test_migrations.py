"""The dataset service's migrations build exactly the tables its models describe."""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel.core.testing.migration_check import migration_drift
from flywheel.dataset import models
from flywheel.dataset.server import MIGRATIONS


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_models_and_migrations_agree(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'd.sqlite3'}"
    schema = None
    if backend == "postgres":
        url, schema = request.getfixturevalue("pg_url"), "dataset"
    tables = [
        models.SourceGeneration,
        models.FeedbackVersion,
        models.SnapshotRow,
        models.TriggerPolicyRow,
    ]
    assert await migration_drift(url, schema, [MIGRATIONS], tables) == []
