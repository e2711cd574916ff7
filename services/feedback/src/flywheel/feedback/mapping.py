"""Rows to contract messages and back: one place that knows both shapes.

Events carry these messages whole, and the gRPC API returns them, so both use this module.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp

from flywheel.contracts.common.v1.common_pb2 import (
    AdapterRef,
    DimensionScore,
    Prompt,
    SamplingParams,
    WeightedAdapter,
)
from flywheel.contracts.feedback.v1 import resources_pb2 as pb
from flywheel.feedback.models import (
    ApiKeyRow,
    FeedbackRow,
    GenerationRow,
    TaskTypeRow,
    TenantRow,
    UserRow,
)

M = TypeVar("M", bound=Message)

ROLE_NAMES = {pb.ROLE_RATER: "rater", pb.ROLE_INTEGRATOR: "integrator",
              pb.ROLE_ADMIN: "admin", pb.ROLE_SERVICE: "service"}  # fmt: skip
ROLES = {name: value for value, name in ROLE_NAMES.items()}
SOURCE_KIND_NAMES = {pb.SOURCE_KIND_HUMAN: "human", pb.SOURCE_KIND_SYNTHETIC: "synthetic"}
SOURCE_KINDS = {name: value for value, name in SOURCE_KIND_NAMES.items()}
FEEDBACK_KIND_NAMES = {
    pb.FEEDBACK_KIND_THUMBS: "thumbs",
    pb.FEEDBACK_KIND_RATING: "rating",
    pb.FEEDBACK_KIND_COMMENT: "comment",
    pb.FEEDBACK_KIND_PREFERENCE: "preference",
    pb.FEEDBACK_KIND_CORRECTION: "correction",
}
FEEDBACK_KINDS = {name: value for value, name in FEEDBACK_KIND_NAMES.items()}
CHOICE_NAMES = {pb.PREFERENCE_CHOICE_A: "a", pb.PREFERENCE_CHOICE_B: "b",
                pb.PREFERENCE_CHOICE_TIE: "tie"}  # fmt: skip


def to_json(message: Message) -> Any:
    """A message as protobuf JSON (field names as in the .proto), for JSON columns."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def from_json(data: Any, message_type: type[M]) -> M:
    """Parse a JSON column back into ``message_type``."""
    message = message_type()
    json_format.ParseDict(data or {}, message)
    return message


def timestamp(value: datetime | None) -> Timestamp | None:
    """A datetime as a Timestamp (naive values from SQLite are UTC)."""
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value if value.tzinfo else value.replace(tzinfo=UTC))
    return ts


def adapter_ref(name: str | None, version: str | None) -> AdapterRef | None:
    """The adapter columns as an AdapterRef, or None for the bare base model."""
    return AdapterRef(name=name, version=version or "") if name else None


def tenant_message(row: TenantRow) -> pb.Tenant:
    """Tenant row -> message."""
    return pb.Tenant(
        tenant_id=row.tenant_id, display_name=row.display_name, created_at=timestamp(row.created_at)
    )


def user_message(row: UserRow) -> pb.User:
    """User row -> message."""
    return pb.User(
        user_id=row.user_id,
        tenant_id=row.tenant_id,
        external_id=row.external_id,
        display_name=row.display_name,
        created_at=timestamp(row.created_at),
    )


def api_key_message(row: ApiKeyRow) -> pb.ApiKey:
    """API key row -> message (never the secret: only its hash is stored)."""
    return pb.ApiKey(
        key_id=row.key_id,
        tenant_id=row.tenant_id,
        role=ROLES[row.role],
        name=row.name,
        prefix=row.prefix,
        user_id=row.user_id,
        created_at=timestamp(row.created_at),
        revoked_at=timestamp(row.revoked_at),
        expires_at=timestamp(row.expires_at),
    )


def task_type_message(row: TaskTypeRow) -> pb.TaskType:
    """Task type row -> message."""
    return pb.TaskType(
        tenant_id=row.tenant_id,
        name=row.name,
        description=row.description,
        domain=row.domain,
        created_at=timestamp(row.created_at),
    )


def generation_message(row: GenerationRow) -> pb.Generation:
    """Generation row -> message."""
    message = pb.Generation(
        generation_id=row.generation_id,
        tenant_id=row.tenant_id,
        client_generation_id=row.client_generation_id,
        task=row.task,
        prompt_hash=row.prompt_hash,
        output=row.output,
        model=row.model,
        base_model=row.base_model,
        adapter=adapter_ref(row.adapter_name, row.adapter_version),
        composed_adapters=[from_json(a, WeightedAdapter) for a in row.composed_adapters],
        alias=row.alias,
        traffic_arm=row.traffic_arm,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        user_id=row.user_id,
        created_at=timestamp(row.created_at),
    )
    message.prompt.CopyFrom(from_json(row.prompt, Prompt))
    message.sampling.CopyFrom(from_json(row.sampling, SamplingParams))
    if row.latency_ms is not None:
        message.latency.FromMilliseconds(round(row.latency_ms))
    if row.extra:
        message.metadata.CopyFrom(from_json(row.extra, Struct))
    return message


def feedback_message(row: FeedbackRow) -> pb.Feedback:
    """Feedback row -> message (its current revision)."""
    message = pb.Feedback(
        feedback_id=row.feedback_id,
        tenant_id=row.tenant_id,
        generation_id=row.generation_id,
        value=from_json(row.value, pb.FeedbackValue),
        source=pb.FeedbackSource(kind=SOURCE_KINDS[row.source_kind], critic=row.critic),
        user_id=row.user_id,
        dimension_scores=[from_json(d, DimensionScore) for d in row.dimension_scores],
        client_feedback_id=row.client_feedback_id,
        revision=row.revision,
        created_at=timestamp(row.created_at),
        updated_at=timestamp(row.updated_at),
        retracted_at=timestamp(row.retracted_at),
        task=row.task,
        adapter=adapter_ref(row.adapter_name, row.adapter_version),
    )
    if row.extra:
        message.metadata.CopyFrom(from_json(row.extra, Struct))
    return message


def source_string(kind: str, critic: str) -> str:
    """The string form of a source: "human" or "synthetic:<critic>"."""
    return f"synthetic:{critic}" if kind == "synthetic" else "human"
