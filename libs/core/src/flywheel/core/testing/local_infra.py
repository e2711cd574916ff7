"""A real PostgreSQL and a real single-node Kafka on loopback, for tests and benchmarks.

Thin typed wrappers around ``deploy/local/postgres.sh`` and ``deploy/local/kafka.sh``,
which stay the single source of truth: these classes only pass the state directory and
port through environment variables and read back the line the scripts print.

    with LocalPostgres(tmp / "pg") as pg:
        url = pg.create_database("t1")  # postgresql+asyncpg://...:PORT/t1

    with LocalKafka(tmp / "kafka") as kafka:
        kafka.bootstrap  # "127.0.0.1:PORT"
        kafka.restart()  # same directory and port: topics and offsets survive
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
from collections.abc import Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

__all__ = [
    "LocalInfraError",
    "LocalKafka",
    "LocalPostgres",
    "create_database",
    "drop_database",
    "free_port",
    "repo_root",
]

_T = TypeVar("_T")

POSTGRES_START_TIMEOUT_S = 180.0
KAFKA_START_TIMEOUT_S = 240.0
KAFKA_FETCH_TIMEOUT_S = 900.0
STOP_TIMEOUT_S = 150.0

_DB_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class LocalInfraError(RuntimeError):
    """A deploy/local script failed; the message carries its output."""


def repo_root() -> Path:
    """The repository root: the directory holding ``deploy/local``.

    ``FLYWHEEL_REPO_ROOT`` overrides; otherwise walk up from this file (editable
    install), then from the working directory (installed wheel).
    """
    override = os.environ.get("FLYWHEEL_REPO_ROOT")
    if override:
        root = Path(override).expanduser().resolve()
        if not (root / "deploy" / "local").is_dir():
            raise LocalInfraError(f"FLYWHEEL_REPO_ROOT={override} has no deploy/local")
        return root
    here, cwd = Path(__file__).resolve(), Path.cwd().resolve()
    for parent in [*here.parents, cwd, *cwd.parents]:
        if (parent / "deploy" / "local" / "postgres.sh").is_file():
            return parent
    raise LocalInfraError(f"no deploy/local above {here} or {cwd}; set FLYWHEEL_REPO_ROOT")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _script(name: str) -> Path:
    return repo_root() / "deploy" / "local" / name


def _run_script(
    name: str,
    command: str,
    env: Mapping[str, str],
    timeout: float,
    ok_codes: tuple[int, ...] = (0,),
) -> subprocess.CompletedProcess[str]:
    path = _script(name)
    try:
        proc = subprocess.run(
            ["bash", str(path), command],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        out = _text(exc.stdout) + _text(exc.stderr)
        raise LocalInfraError(
            f"{path} {command} timed out after {timeout:.0f}s (env {dict(env)}):\n{out}"
        ) from exc
    if proc.returncode not in ok_codes:
        raise LocalInfraError(
            f"{path} {command} failed with exit code {proc.returncode} (env {dict(env)}):\n"
            f"{proc.stdout}{proc.stderr}"
        )
    return proc


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _last_line(proc: subprocess.CompletedProcess[str], what: str) -> str:
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise LocalInfraError(f"{what} printed nothing:\n{proc.stderr}")
    return lines[-1].strip()


def _run_coroutine(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine to completion in a fresh event loop on a worker thread.

    Safe to call whether or not an event loop is running in the calling thread.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-infra") as pool:
        return pool.submit(asyncio.run, coro).result()


def _check_db_name(name: str) -> None:
    if not _DB_NAME.match(name):
        raise ValueError(f"invalid database name {name!r}: want [A-Za-z_][A-Za-z0-9_]{{0,62}}")


async def _execute_autocommit(url: URL, statement: str) -> None:
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            await conn.execute(text(statement))
    finally:
        await engine.dispose()


def create_database(server_url: str, name: str) -> str:
    """Create database ``name`` on the server of ``server_url``; return its URL.

    ``server_url`` is a SQLAlchemy asyncpg URL of any database on the server (with a
    role allowed to create databases); the result is the same URL naming ``name``.
    """
    _check_db_name(name)
    url = make_url(server_url)
    _run_coroutine(_execute_autocommit(url, f'CREATE DATABASE "{name}"'))
    return url.set(database=name).render_as_string(hide_password=False)


def drop_database(server_url: str, name: str) -> None:
    """Drop database ``name`` (if it exists), closing any connections still open to it."""
    _check_db_name(name)
    url = make_url(server_url)
    if url.database == name:
        url = url.set(database="postgres")
    _run_coroutine(_execute_autocommit(url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@dataclass
class LocalPostgres:
    """A throwaway PostgreSQL server run by ``deploy/local/postgres.sh``.

    ``data_dir`` is the script's ``PG_DIR``; ``port`` (``PG_PORT``) is picked by the
    script when None and filled in by :meth:`start`. :meth:`attach` wraps a server
    someone else runs: start and stop then do nothing.
    """

    data_dir: Path = field(default_factory=lambda: repo_root() / ".flywheel" / "local" / "postgres")
    port: int | None = None
    _url: str | None = field(default=None, init=False, repr=False)
    _external: bool = field(default=False, init=False, repr=False)

    @classmethod
    def attach(cls, url: str) -> LocalPostgres:
        """Wrap an already running server, given the SQLAlchemy URL of a database on it."""
        pg = cls(data_dir=Path(os.devnull), port=make_url(url).port)
        pg._url = url
        pg._external = True
        return pg

    @property
    def external(self) -> bool:
        """True when attached to a server this object does not manage."""
        return self._external

    def _env(self) -> dict[str, str]:
        env = {"PG_DIR": str(self.data_dir)}
        if self.port is not None:
            env["PG_PORT"] = str(self.port)
        return env

    def start(self) -> str:
        """Start the server (idempotent); return the URL of its ``postgres`` database."""
        if self._external:
            return self.url
        proc = _run_script("postgres.sh", "start", self._env(), POSTGRES_START_TIMEOUT_S)
        url = _last_line(proc, "postgres.sh start")
        self.port = make_url(url).port
        self._url = url
        return url

    def stop(self) -> None:
        """Fast shutdown; no-op when not running."""
        if self._external:
            return
        _run_script("postgres.sh", "stop", self._env(), STOP_TIMEOUT_S)

    def is_running(self) -> bool:
        if self._external:
            return True
        proc = _run_script("postgres.sh", "status", self._env(), 30.0, ok_codes=(0, 3))
        return proc.returncode == 0

    @property
    def url(self) -> str:
        """SQLAlchemy asyncpg URL of the ``postgres`` database (after :meth:`start`)."""
        if self._url is None:
            raise LocalInfraError("LocalPostgres is not started")
        return self._url

    def create_database(self, name: str) -> str:
        """Create a fresh database; return its SQLAlchemy asyncpg URL."""
        return create_database(self.url, name)

    def drop_database(self, name: str) -> None:
        """Drop a database, closing any connections still open to it."""
        drop_database(self.url, name)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@dataclass
class LocalKafka:
    """A single-node KRaft Kafka broker run by ``deploy/local/kafka.sh``.

    ``data_dir`` is the script's ``KAFKA_DIR``; ``port`` (``KAFKA_PORT``) is picked by
    the script when None and filled in by :meth:`start`, so :meth:`restart` reuses it.
    :meth:`attach` wraps a broker someone else runs: start, stop and restart then do
    nothing (restart raises).
    """

    data_dir: Path = field(default_factory=lambda: repo_root() / ".flywheel" / "local" / "kafka")
    port: int | None = None
    _bootstrap: str | None = field(default=None, init=False, repr=False)
    _external: bool = field(default=False, init=False, repr=False)

    @classmethod
    def attach(cls, bootstrap: str) -> LocalKafka:
        """Wrap an already running broker, given its bootstrap address."""
        _, _, port = bootstrap.split(",")[0].rpartition(":")
        kafka = cls(data_dir=Path(os.devnull), port=int(port) if port.isdigit() else None)
        kafka._bootstrap = bootstrap
        kafka._external = True
        return kafka

    @staticmethod
    def fetch() -> None:
        """Resolve the broker jars (``kafka.sh fetch``); no-op when already there."""
        _run_script("kafka.sh", "fetch", {}, KAFKA_FETCH_TIMEOUT_S)

    @property
    def external(self) -> bool:
        """True when attached to a broker this object does not manage."""
        return self._external

    def _env(self) -> dict[str, str]:
        env = {"KAFKA_DIR": str(self.data_dir)}
        if self.port is not None:
            env["KAFKA_PORT"] = str(self.port)
        return env

    def start(self) -> str:
        """Start the broker (idempotent), wait until it serves metadata; return bootstrap."""
        if self._external:
            return self.bootstrap
        proc = _run_script("kafka.sh", "start", self._env(), KAFKA_START_TIMEOUT_S)
        bootstrap = _last_line(proc, "kafka.sh start")
        self.port = int(bootstrap.rpartition(":")[2])
        self._bootstrap = bootstrap
        return bootstrap

    def stop(self) -> None:
        """Clean shutdown (SIGTERM; SIGKILL after a timeout); no-op when not running."""
        if self._external:
            return
        _run_script("kafka.sh", "stop", self._env(), STOP_TIMEOUT_S)

    def restart(self) -> str:
        """Stop, then start on the same directory and port; return bootstrap."""
        if self._external:
            raise LocalInfraError("cannot restart an attached Kafka broker")
        self.stop()
        return self.start()

    def is_running(self) -> bool:
        if self._external:
            return True
        proc = _run_script("kafka.sh", "status", self._env(), 30.0, ok_codes=(0, 3))
        return proc.returncode == 0

    @property
    def bootstrap(self) -> str:
        """Bootstrap address ``127.0.0.1:PORT`` (after :meth:`start`)."""
        if self._bootstrap is None:
            raise LocalInfraError("LocalKafka is not started")
        return self._bootstrap

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
