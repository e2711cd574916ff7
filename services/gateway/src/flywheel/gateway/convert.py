"""Protobuf well-known types <-> Python values, for the REST mappings."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp

from flywheel.contracts.common.v1 import common_pb2
from flywheel.gateway.routes.common import AdapterRef


def timestamp(value: datetime) -> Timestamp:
    """A protobuf Timestamp; naive datetimes are UTC."""
    ts = Timestamp()
    ts.FromDatetime(value if value.tzinfo else value.replace(tzinfo=UTC))
    return ts


def datetime_of(message: Any, name: str) -> datetime | None:
    """``message.<name>`` as an aware datetime, or None when unset."""
    if not message.HasField(name):
        return None
    value: datetime = getattr(message, name).ToDatetime(tzinfo=UTC)
    return value


def struct(value: dict[str, Any] | None) -> Struct:
    """A protobuf Struct from a JSON object."""
    result = Struct()
    if value:
        result.update(value)
    return result


def dict_of(value: Struct) -> dict[str, Any]:
    """A JSON object from a protobuf Struct."""
    result: dict[str, Any] = json_format.MessageToDict(value)
    return result


def duration_ms(value: float) -> Duration:
    """A protobuf Duration from milliseconds."""
    duration = Duration()
    duration.FromNanoseconds(round(value * 1_000_000))
    return duration


def ms_of(value: Duration) -> float:
    """Milliseconds of a protobuf Duration."""
    return float(value.ToNanoseconds()) / 1_000_000


def adapter_ref(value: AdapterRef) -> common_pb2.AdapterRef:
    """The protobuf AdapterRef of a REST one."""
    return common_pb2.AdapterRef(name=value.name, version=value.version)


def adapter_of(message: Any, name: str = "adapter") -> AdapterRef | None:
    """``message.<name>`` as a REST AdapterRef, or None when unset."""
    if not message.HasField(name):
        return None
    ref = getattr(message, name)
    return AdapterRef.model_construct(name=ref.name, version=ref.version)


def optional_str(message: Any, name: str) -> str | None:
    """An ``optional string`` field, None when unset."""
    return str(getattr(message, name)) if message.HasField(name) else None
