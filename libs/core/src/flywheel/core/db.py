"""Database access: one async SQLAlchemy engine per service, on PostgreSQL or SQLite.

PostgreSQL gives each service a schema of its own (``search_path``), so one database can hold
every service while no service reads another's tables. SQLite runs in WAL mode so the
services of the embedded default can share files across processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import BigInteger, Integer, MetaData, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase

# Deterministic constraint names, so Alembic migrations are identical on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


# 64-bit ids on PostgreSQL; SQLite auto-increments only a column declared exactly INTEGER
# (which is 64-bit there anyway).
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    """Declarative base of every table; a service's metadata = core tables + its own."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


SessionFactory = async_sessionmaker[AsyncSession]


def is_sqlite(url: str) -> bool:
    """True for SQLite URLs, which need WAL mode and have no schemas."""
    return make_url(url).get_backend_name() == "sqlite"


def create_engine(url: str, *, schema: str | None = None, pool_size: int = 10) -> AsyncEngine:
    """Create the async engine of a service.

    ``schema`` is put first on PostgreSQL's ``search_path``, so unqualified table names, and
    Alembic's version table, live in the service's own schema.
    """
    kwargs: dict[str, Any] = {}
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        # A writer waits for another process's lock instead of failing at once.
        kwargs["connect_args"] = {"timeout": 30}
    else:
        kwargs["pool_size"] = pool_size
        kwargs["max_overflow"] = pool_size
        # No pre-ping: it costs a round trip per checkout; a dead connection fails its
        # statement instead, is discarded, and the caller's transaction is retried or fails.
        kwargs["pool_recycle"] = 1800
        if schema:
            kwargs["connect_args"] = {"server_settings": {"search_path": schema}}
    engine = create_async_engine(url, **kwargs)
    if is_sqlite(url):
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        event.listen(engine.sync_engine, "begin", _sqlite_begin_immediate)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy, not the driver, emit BEGIN (see _sqlite_begin_immediate).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL lets readers in other processes proceed while one writes; NORMAL sync is still
    # durable across process crashes (only an OS crash can lose the last transactions).
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin_immediate(conn: Any) -> None:
    # A deferred transaction that reads and then writes fails with SQLITE_BUSY when another
    # process wrote in between; taking the write lock up front makes it wait its turn instead.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def session_factory(engine: AsyncEngine) -> SessionFactory:
    """Sessions that keep loaded objects usable after commit (no implicit refresh I/O)."""
    return async_sessionmaker(engine, expire_on_commit=False)


async def ensure_schema(engine: AsyncEngine, schema: str | None) -> None:
    """Create the service's PostgreSQL schema if it is missing (no-op on SQLite)."""
    if not schema or is_sqlite(str(engine.url)):
        return
    async with engine.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))


def insert_ignoring_conflicts(session: AsyncSession, model: type[Base]) -> Any:
    """``INSERT ... ON CONFLICT DO NOTHING`` into ``model``'s table, in the session's dialect.

    For effects that must happen once however often an event is delivered: a row that
    is already there is left as it is, without an error that would abort the transaction.
    """
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return insert(model).on_conflict_do_nothing()
