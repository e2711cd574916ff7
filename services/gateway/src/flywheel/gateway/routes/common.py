"""REST schema pieces shared by every feature: base models, bounded scalars, pages."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Query
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict

T = TypeVar("T")

# Protobuf timestamps cover 0001..9999; REST accepts the range every backend stores safely.
_MIN_TIME = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_TIME = datetime(9999, 12, 31, tzinfo=UTC)
_MAX_METADATA_DEPTH = 16
_FLOAT32_MAX = 3.4e38


class RequestModel(BaseModel):
    """A request body: unknown fields (``tenant_id``, ``role``, ids the server assigns) are
    rejected, naming the field, rather than silently ignored."""

    model_config = ConfigDict(extra="forbid")


class ResponseModel(BaseModel):
    """A response body."""

    model_config = ConfigDict(extra="ignore")


def _in_range(value: datetime) -> datetime:
    aware = value if value.tzinfo else value.replace(tzinfo=UTC)
    if not _MIN_TIME <= aware <= _MAX_TIME:
        raise ValueError("must be between 1970-01-01 and 9999-12-31")
    return aware


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _numbers(value: Any) -> Iterator[float | int]:
    if isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield value


def _json_object(value: dict[str, Any]) -> dict[str, Any]:
    # Stored as a protobuf Struct: numbers are doubles, nesting is bounded.
    if _depth(value) > _MAX_METADATA_DEPTH:
        raise ValueError(f"must be nested at most {_MAX_METADATA_DEPTH} levels deep")
    for number in _numbers(value):
        try:
            finite = math.isfinite(float(number))
        except OverflowError:
            finite = False
        if not finite:
            raise ValueError("numbers must be finite and fit a 64-bit float")
    return value


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


Timestamp = Annotated[datetime, AfterValidator(_in_range)]
"""A point in time (RFC 3339); without an offset it is taken as UTC."""

Metadata = Annotated[dict[str, Any], AfterValidator(_json_object)]
"""Free-form JSON object kept as given (numbers come back as floats)."""

StrictInt = Annotated[int, Strict()]
StrictBool = Annotated[bool, Strict()]
Double = Annotated[float, Strict(), AfterValidator(_finite)]
Float32 = Annotated[float, Strict(), Field(ge=-_FLOAT32_MAX, le=_FLOAT32_MAX)]
UInt32 = Annotated[int, Strict(), Field(ge=0, le=2**32 - 1)]
Int32 = Annotated[int, Strict(), Field(ge=-(2**31), le=2**31 - 1)]
Int64 = Annotated[int, Strict(), Field(ge=-(2**63), le=2**63 - 1)]
UInt64 = Annotated[int, Strict(), Field(ge=0, le=2**64 - 1)]
Id = Annotated[str, Field(min_length=1, max_length=200)]


class AdapterRef(BaseModel):
    """One immutable adapter version."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    version: str = Field("", max_length=200)


class Artifact(ResponseModel):
    """A stored file, identified by its content (its location is the server's business)."""

    sha256: str = Field(description="Hex sha256 of the content.")
    size_bytes: int


class Page(ResponseModel, Generic[T]):
    """One page of a listing, newest first."""

    items: list[T]
    next_cursor: str | None = Field(
        None, description="Pass as `cursor` to get the next page; null on the last page."
    )


Cursor = Annotated[
    str | None,
    Query(max_length=4096, description="`next_cursor` of the previous page; omit for the first."),
]
Limit = Annotated[int, Query(ge=1, le=500, description="Maximum number of items to return.")]
