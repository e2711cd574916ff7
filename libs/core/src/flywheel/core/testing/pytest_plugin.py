"""Pytest fixtures for a real PostgreSQL and Kafka on loopback.

Enable with ``pytest_plugins = ["flywheel.core.testing.pytest_plugin"]`` in a conftest
(or ``-p flywheel.core.testing.pytest_plugin``).

- ``postgres`` (session): a :class:`LocalPostgres` started in a temp dir, or the server
  of ``FLYWHEEL_TEST_POSTGRES_URL`` when set (a SQLAlchemy asyncpg URL of any database
  on it, with a role that may create databases).
- ``pg_url`` (function): the URL of a fresh, empty database on that server, dropped
  after the test (kept when ``FLYWHEEL_TEST_KEEP_DATABASES=1``).
- ``kafka`` (session): a :class:`LocalKafka` started in a temp dir, or the broker of
  ``FLYWHEEL_TEST_KAFKA_BOOTSTRAP`` when set. Shared: use unique topic and group names.
- ``kafka_broker`` (function): a dedicated fresh broker the test may stop and restart;
  stopped at teardown.

A server that fails to start fails the test with the script's output; nothing is
skipped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from flywheel.core.testing.local_infra import LocalKafka, LocalPostgres

POSTGRES_URL_ENV = "FLYWHEEL_TEST_POSTGRES_URL"
KAFKA_BOOTSTRAP_ENV = "FLYWHEEL_TEST_KAFKA_BOOTSTRAP"
KEEP_DATABASES_ENV = "FLYWHEEL_TEST_KEEP_DATABASES"


@contextlib.contextmanager
def _server_dir(prefix: str) -> Iterator[Path]:
    """A data directory outside pytest's basetemp, removed afterwards.

    Not under ``tmp_path_factory``: any pytest session that starts meanwhile re-chmods
    ``/tmp/pytest-of-<user>`` to 0700 (locking the ``postgres`` user out of its own data
    directory) and deletes old session directories, live servers' data included.
    """
    path = Path(tempfile.mkdtemp(prefix=f"flywheel-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[LocalPostgres]:
    """A running PostgreSQL server for the whole session."""
    url = os.environ.get(POSTGRES_URL_ENV)
    if url:
        yield LocalPostgres.attach(url)
        return
    with _server_dir("postgres") as data_dir:
        pg = LocalPostgres(data_dir=data_dir)
        try:
            pg.start()
            yield pg
        finally:
            pg.stop()


@pytest.fixture
def pg_url(postgres: LocalPostgres) -> Iterator[str]:
    """SQLAlchemy asyncpg URL of a fresh database, private to this test."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    url = postgres.create_database(name)
    yield url
    if os.environ.get(KEEP_DATABASES_ENV) != "1":
        postgres.drop_database(name)


@pytest.fixture(scope="session")
def kafka() -> Iterator[LocalKafka]:
    """A running single-node Kafka broker shared by the whole session."""
    bootstrap = os.environ.get(KAFKA_BOOTSTRAP_ENV)
    if bootstrap:
        yield LocalKafka.attach(bootstrap)
        return
    with _server_dir("kafka") as data_dir:
        broker = LocalKafka(data_dir=data_dir)
        try:
            broker.start()
            yield broker
        finally:
            broker.stop()


@pytest.fixture
def kafka_broker() -> Iterator[LocalKafka]:
    """A dedicated, fresh Kafka broker for this test, which may stop/restart it."""
    with _server_dir("kafka-broker") as data_dir:
        broker = LocalKafka(data_dir=data_dir)
        try:
            broker.start()
            yield broker
        finally:
            broker.stop()
