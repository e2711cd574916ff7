"""Cursor paging and time, as every service's listings use them.

A cursor is an opaque position after (created_at, id) in a newest-first listing; a page
size is defaulted and bounded. Both refuse input they did not issue with a field error.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.ext.asyncio import AsyncSession

from flywheel.core.errors import FieldError, InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a listing and the cursor of the next (empty at the end)."""

    items: list[T]
    next_cursor: str


def utcnow() -> datetime:
    """The current time, timezone-aware (UTC)."""
    return datetime.now(UTC)


def encode_cursor(created_at: datetime, ident: str) -> str:
    """An opaque cursor for the position after (created_at, ident)."""
    raw = f"{created_at.isoformat()}|{ident}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The position a cursor stands for; InvalidArgument if it is not ours."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        stamp, ident = base64.urlsafe_b64decode(padded).decode().split("|", 1)
        created = datetime.fromisoformat(stamp)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(FieldError("page.cursor", "is not a cursor this API issued")) from exc
    return created, ident


def page_size_of(size: int) -> int:
    """The page size asked for, defaulted and bounded."""
    if size > MAX_PAGE_SIZE:
        raise InvalidArgument(FieldError("page.page_size", f"must be at most {MAX_PAGE_SIZE}"))
    return size or DEFAULT_PAGE_SIZE


async def newest_first_page(
    session: AsyncSession,
    statement: Select[tuple[R]],
    *,
    created: Any,
    ident: Any,
    position_of: Callable[[R], tuple[datetime, str]],
    page_size: int,
    cursor: str,
) -> tuple[list[R], str]:
    """One page of ``statement``'s rows, newest first by (``created``, ``ident``) columns,
    after ``cursor``; and the next page's cursor ("" at the end). ``position_of`` gives a
    row's (created, ident) values, which the cursor records."""
    size = page_size_of(page_size)
    if cursor:
        after_created, after_ident = decode_cursor(cursor)
        statement = statement.where(
            or_(created < after_created, and_(created == after_created, ident < after_ident))
        )
    statement = statement.order_by(created.desc(), ident.desc()).limit(size + 1)
    rows = list((await session.scalars(statement)).all())
    more = len(rows) > size
    rows = rows[:size]
    next_cursor = encode_cursor(*position_of(rows[-1])) if more else ""
    return rows, next_cursor
