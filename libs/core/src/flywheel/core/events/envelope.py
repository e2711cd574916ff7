"""Wrapping domain messages in the common ``Envelope`` and reading them back."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import TypeVar

from google.protobuf.message import Message

from flywheel.contracts.events.v1 import envelope_pb2
from flywheel.contracts.events.v1.envelope_pb2 import Envelope

SCHEMA_VERSION = 1

M = TypeVar("M", bound=Message)


def event_options(message_type: type[Message] | Message) -> tuple[str, str]:
    """The ``(type, topic)`` an event message declares with its ``event`` option."""
    options = message_type.DESCRIPTOR.GetOptions()
    declared = options.Extensions[envelope_pb2.event]
    if not options.HasExtension(envelope_pb2.event) or not declared.type or not declared.topic:
        raise TypeError(f"{message_type.DESCRIPTOR.full_name} is not an event message")
    return declared.type, declared.topic


def wrap(
    tenant: str,
    payload: Message,
    *,
    source_service: str,
    trace_id: str = "",
    event_id: str | None = None,
    occurred_at: datetime | None = None,
) -> Envelope:
    """Put ``payload`` in a new envelope with a fresh UUID ``event_id``.

    The envelope's ``type`` is the one the payload's message declares; anything else
    raises ``TypeError``, so no event can be published under the wrong name.
    """
    event_type, _topic = event_options(payload)
    envelope = Envelope(
        event_id=event_id or str(uuid.uuid4()),
        type=event_type,
        tenant=tenant,
        schema_version=SCHEMA_VERSION,
        trace_id=trace_id,
        source_service=source_service,
    )
    envelope.occurred_at.FromDatetime(occurred_at or datetime.now(UTC))
    envelope.payload.Pack(payload)
    return envelope


def parse(value: bytes) -> Envelope:
    """Decode a record value into its envelope."""
    envelope = Envelope()
    envelope.ParseFromString(value)
    return envelope


def unpack(envelope: Envelope, message_type: type[M]) -> M:
    """Decode the envelope's payload as ``message_type``; raise if it holds another type."""
    message = message_type()
    if not envelope.payload.Unpack(message):
        raise TypeError(
            f"event {envelope.event_id} holds {envelope.payload.TypeName()}, "
            f"not {message.DESCRIPTOR.full_name}"
        )
    return message
