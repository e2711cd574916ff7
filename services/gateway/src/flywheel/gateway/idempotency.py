"""``Idempotency-Key``: a retried POST gets the first response instead of a second effect.

The key is claimed *before* the request runs, by inserting its row in a transaction of
its own; the primary key (API key, Idempotency-Key) lets exactly one request win. The
winner runs and stores its response; a request arriving meanwhile sees the row still in
flight (409) and one arriving later gets the stored response replayed. A request that
fails on the server side (5xx) gives the key back, so a retry runs again.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import DateTime, Integer, LargeBinary, String, Text, delete, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.sql.elements import ColumnElement

from flywheel.core.db import Base, SessionFactory

log = logging.getLogger(__name__)

# Response headers kept with the stored response and sent again on replay.
REPLAYED_HEADERS = ("content-type", "location", "etag")


class IdempotencyRecord(Base):
    """One Idempotency-Key of one API key: the request it was first used for and, once
    that request finished, its response."""

    __tablename__ = "idempotency_keys"

    api_key_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(255), primary_key=True)
    method: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(Text)
    body_sha256: Mapped[str] = mapped_column(String(64))
    # Who holds the key while the request runs; a stale holder cannot overwrite a taker.
    lock_token: Mapped[str] = mapped_column(String(32))
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    response_headers: Mapped[str | None] = mapped_column(Text, nullable=True)
    response_body: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


@dataclass(frozen=True)
class Fingerprint:
    """What makes two requests "the same request"."""

    method: str
    path: str
    body_sha256: str


class Outcome(enum.Enum):
    """What a claim found."""

    CLAIMED = "claimed"  # the key is new: run the request
    REPLAY = "replay"  # the same request finished: send its response again
    IN_FLIGHT = "in_flight"  # the same request is still running
    MISMATCH = "mismatch"  # the key was used for a different request


@dataclass(frozen=True)
class Claim:
    """The outcome of claiming a key, with the stored response for a replay."""

    outcome: Outcome
    api_key_id: str = ""
    key: str = ""
    lock_token: str = ""
    status_code: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def _utc(value: datetime) -> datetime:
    # SQLite hands timestamps back without their offset; they were stored in UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class IdempotencyStore:
    """Idempotency keys in the gateway's own database."""

    def __init__(self, sessions: SessionFactory, *, ttl_s: float, lock_timeout_s: float) -> None:
        self.sessions = sessions
        self.ttl = timedelta(seconds=ttl_s)
        self.lock_timeout = timedelta(seconds=lock_timeout_s)

    async def claim(self, api_key_id: str, key: str, fingerprint: Fingerprint) -> Claim:
        """Claim ``key`` for a request, or say why it cannot run."""
        for _ in range(3):
            now = datetime.now(UTC)
            token = uuid.uuid4().hex
            values = {
                "api_key_id": api_key_id,
                "idempotency_key": key,
                "method": fingerprint.method,
                "path": fingerprint.path,
                "body_sha256": fingerprint.body_sha256,
                "lock_token": token,
                "created_at": now,
                "expires_at": now + self.ttl,
            }
            async with self.sessions() as session, session.begin():
                # ON CONFLICT DO NOTHING rather than catching IntegrityError: the loser of a
                # race learns it lost from the row count, and no failed statement is left
                # to roll back (on SQLite that path has been seen to leave the write lock
                # held by a pooled connection).
                inserted = await session.execute(_insert_new(session, values))
            if getattr(inserted, "rowcount", 0) == 1:
                return Claim(Outcome.CLAIMED, api_key_id, key, token)
            async with self.sessions() as session, session.begin():
                row = await session.get(IdempotencyRecord, (api_key_id, key))
                if row is None:
                    continue  # expired and removed in between: claim again
                stale = _utc(row.expires_at) <= now or (
                    row.status_code is None and _utc(row.created_at) <= now - self.lock_timeout
                )
                if stale:
                    # An expired key, or one whose request died with its process: take it
                    # over, unless someone else just did.
                    await session.execute(
                        delete(IdempotencyRecord).where(
                            IdempotencyRecord.api_key_id == api_key_id,
                            IdempotencyRecord.idempotency_key == key,
                            IdempotencyRecord.lock_token == row.lock_token,
                        )
                    )
                    continue
                same = Fingerprint(row.method, row.path, row.body_sha256) == fingerprint
                if not same:
                    return Claim(Outcome.MISMATCH)
                if row.status_code is None:
                    return Claim(Outcome.IN_FLIGHT)
                return Claim(
                    Outcome.REPLAY,
                    status_code=row.status_code,
                    headers=json.loads(row.response_headers or "{}"),
                    body=row.response_body or b"",
                )
        return Claim(Outcome.IN_FLIGHT)

    async def complete(
        self, claim: Claim, status_code: int, headers: dict[str, str], body: bytes
    ) -> None:
        """Store the response of the request that holds ``claim``."""
        async with self.sessions() as session, session.begin():
            await session.execute(
                update(IdempotencyRecord)
                .where(*self._held(claim))
                .values(
                    status_code=status_code,
                    response_headers=json.dumps(headers),
                    response_body=body,
                    completed_at=datetime.now(UTC),
                )
            )

    async def release(self, claim: Claim) -> None:
        """Give the key back (the request failed on the server side), so a retry runs."""
        async with self.sessions() as session, session.begin():
            await session.execute(delete(IdempotencyRecord).where(*self._held(claim)))

    async def prune(self) -> int:
        """Delete expired keys; return how many."""
        async with self.sessions() as session, session.begin():
            result = await session.execute(
                delete(IdempotencyRecord).where(IdempotencyRecord.expires_at < datetime.now(UTC))
            )
        return int(getattr(result, "rowcount", 0) or 0)

    async def prune_forever(self, stop: asyncio.Event, every_s: float = 600.0) -> None:
        """Prune expired keys every ``every_s`` until ``stop`` is set."""
        while not stop.is_set():
            try:
                await self.prune()
            except Exception:  # the next round tries again; requests do not depend on it
                log.warning("pruning expired idempotency keys failed", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=every_s)

    @staticmethod
    def _held(claim: Claim) -> tuple[ColumnElement[bool], ...]:
        return (
            IdempotencyRecord.api_key_id == claim.api_key_id,
            IdempotencyRecord.idempotency_key == claim.key,
            IdempotencyRecord.lock_token == claim.lock_token,
            IdempotencyRecord.status_code.is_(None),
        )


def _insert_new(session: AsyncSession, values: dict[str, object]) -> Any:
    """INSERT of a new key that does nothing if the key exists (PostgreSQL and SQLite)."""
    dialect = session.get_bind().dialect.name
    module: Any = postgresql if dialect == "postgresql" else sqlite
    return (
        module.insert(IdempotencyRecord)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["api_key_id", "idempotency_key"])
    )
