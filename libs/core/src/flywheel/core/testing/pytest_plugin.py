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

import os
import uuid
from collections.abc import Iterator

import pytest

from flywheel.core.testing.local_infra import LocalKafka, LocalPostgres

POSTGRES_URL_ENV = "FLYWHEEL_TEST_POSTGRES_URL"
KAFKA_BOOTSTRAP_ENV = "FLYWHEEL_TEST_KAFKA_BOOTSTRAP"
KEEP_DATABASES_ENV = "FLYWHEEL_TEST_KEEP_DATABASES"


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPostgres]:
    """A running PostgreSQL server for the whole session."""
    url = os.environ.get(POSTGRES_URL_ENV)
    if url:
        yield LocalPostgres.attach(url)
        return
    pg = LocalPostgres(data_dir=tmp_path_factory.mktemp("postgres"))
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
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    """A running single-node Kafka broker shared by the whole session."""
    bootstrap = os.environ.get(KAFKA_BOOTSTRAP_ENV)
    if bootstrap:
        yield LocalKafka.attach(bootstrap)
        return
    broker = LocalKafka(data_dir=tmp_path_factory.mktemp("kafka"))
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    """A dedicated, fresh Kafka broker for this test, which may stop/restart it."""
    broker = LocalKafka(data_dir=tmp_path_factory.mktemp("kafka_broker"))
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()
