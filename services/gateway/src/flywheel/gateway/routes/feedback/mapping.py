"""Feedback: REST <-> protobuf, and protobuf field paths -> REST field names."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from flywheel.contracts.common.v1 import common_pb2
from flywheel.contracts.feedback.v1 import resources_pb2, service_pb2
from flywheel.gateway.convert import (
    adapter_of,
    datetime_of,
    dict_of,
    optional_str,
    struct,
    timestamp,
)
from flywheel.gateway.problems import FieldRenamer, renamer, validation_problem
from flywheel.gateway.routes.feedback.protocol import (
    VALUE_KINDS,
    DimensionScore,
    DimensionScoreOut,
    Feedback,
    FeedbackKind,
    FeedbackValueFields,
    GroupBy,
    PreferenceOut,
    SourceKind,
    StatsBucket,
)

_THUMB_TO_PROTO = {"up": resources_pb2.THUMB_UP, "down": resources_pb2.THUMB_DOWN}
_THUMB_FROM_PROTO = {v: k for k, v in _THUMB_TO_PROTO.items()}
_CHOICE_TO_PROTO = {
    "a": resources_pb2.PREFERENCE_CHOICE_A,
    "b": resources_pb2.PREFERENCE_CHOICE_B,
    "tie": resources_pb2.PREFERENCE_CHOICE_TIE,
}
_CHOICE_FROM_PROTO = {v: k for k, v in _CHOICE_TO_PROTO.items()}
_KIND_TO_PROTO = {
    FeedbackKind.THUMBS: resources_pb2.FEEDBACK_KIND_THUMBS,
    FeedbackKind.RATING: resources_pb2.FEEDBACK_KIND_RATING,
    FeedbackKind.COMMENT: resources_pb2.FEEDBACK_KIND_COMMENT,
    FeedbackKind.PREFERENCE: resources_pb2.FEEDBACK_KIND_PREFERENCE,
    FeedbackKind.CORRECTION: resources_pb2.FEEDBACK_KIND_CORRECTION,
}
_SOURCE_TO_PROTO = {
    SourceKind.HUMAN: resources_pb2.SOURCE_KIND_HUMAN,
    SourceKind.SYNTHETIC: resources_pb2.SOURCE_KIND_SYNTHETIC,
}
_SOURCE_FROM_PROTO = {v: k for k, v in _SOURCE_TO_PROTO.items()}
_GROUP_TO_PROTO = {
    GroupBy.ADAPTER: service_pb2.STATS_GROUP_BY_ADAPTER,
    GroupBy.TASK: service_pb2.STATS_GROUP_BY_TASK,
    GroupBy.SOURCE: service_pb2.STATS_GROUP_BY_SOURCE_KIND,
}

# FeedbackValue paths -> REST keys: the value's kinds are top-level keys in REST.
_VALUE_RULES = {
    "value.thumbs": "thumbs",
    "value.rating.value": "rating",
    "value.rating": "rating",
    "value.comment.text": "comment",
    "value.comment": "comment",
    "value.preference": "preference",
    "value.correction.output": "correction",
    "value.correction": "correction",
    "source.kind": "source",
    "source.critic": "source",
    "source": "source",
}
_FILTER_RULES = {
    "filter.adapter.name": "adapter",
    "filter.adapter.version": "adapter_version",
    "filter.adapter": "adapter",
    "filter.kinds": "kind",
    "filter.source_kinds": "source",
    "filter.created.start": "created_after",
    "filter.created.end": "created_before",
    "filter.created": "created_after",
    "filter": "",
    "page.cursor": "cursor",
    "page.page_size": "limit",
}

filter_fields: FieldRenamer = renamer(_FILTER_RULES)
"""ListFeedback / stats / export paths -> query parameters."""


def value_fields(kind: str) -> FieldRenamer:
    """Record/EditFeedback paths -> REST fields; a bare ``value`` names the kind sent."""
    rename = renamer({**_VALUE_RULES, "value": kind})

    def fields(path: str) -> str:
        return rename(path)

    return fields


def one_kind(body: FeedbackValueFields) -> str:
    """The single value kind of a body; a 422 naming the fields otherwise."""
    kinds = body.kinds()
    if not kinds:
        raise validation_problem(
            [(kind, "one of these fields is required") for kind in VALUE_KINDS],
            "Give exactly one of thumbs, rating, comment, preference, correction.",
        )
    if len(kinds) > 1:
        raise validation_problem(
            [(kind, "only one value kind may be given per feedback") for kind in kinds],
            "Give exactly one of thumbs, rating, comment, preference, correction.",
        )
    kind = kinds[0]
    if getattr(body, kind) is None:
        raise validation_problem([(kind, "must not be null")])
    return kind


def feedback_value(body: FeedbackValueFields, kind: str) -> Any:
    """The ``FeedbackValue`` of a body's one kind."""
    value = resources_pb2.FeedbackValue()
    if kind == "thumbs":
        value.thumbs = _THUMB_TO_PROTO[str(body.thumbs)]
    elif kind == "rating":
        value.rating.value = int(body.rating or 0)
    elif kind == "comment":
        value.comment.text = str(body.comment)
    elif kind == "correction":
        value.correction.output = str(body.correction)
    else:
        preference = body.preference
        assert preference is not None
        value.preference.generation_b_id = preference.generation_b_id
        value.preference.choice = _CHOICE_TO_PROTO[preference.choice]
        if preference.strength is not None:
            value.preference.strength = preference.strength
    return value


def feedback_source(source: str) -> Any:
    """The ``FeedbackSource`` of ``human`` or ``synthetic:<critic>``."""
    if source == "human":
        return resources_pb2.FeedbackSource(kind=resources_pb2.SOURCE_KIND_HUMAN)
    critic = source.removeprefix("synthetic:")
    return resources_pb2.FeedbackSource(kind=resources_pb2.SOURCE_KIND_SYNTHETIC, critic=critic)


def source_of(message: Any) -> str:
    """``human`` or ``synthetic:<critic>`` of a ``FeedbackSource``."""
    if message.kind == resources_pb2.SOURCE_KIND_SYNTHETIC:
        return f"synthetic:{message.critic}"
    return "human"


def dimension_score(score: DimensionScore) -> Any:
    """The protobuf ``DimensionScore`` of a REST one."""
    message = common_pb2.DimensionScore(
        dimension=score.dimension, score=score.score, evaluator=score.evaluator
    )
    if score.rationale is not None:
        message.rationale = score.rationale
    return message


def record_request(
    tenant_id: str,
    *,
    generation_id: str,
    value: Any,
    source: str,
    user_id: str | None,
    client_feedback_id: str | None,
    metadata: dict[str, Any] | None,
    dimension_scores: Sequence[DimensionScore],
) -> Any:
    """The ``RecordFeedbackRequest`` of a REST feedback."""
    request = service_pb2.RecordFeedbackRequest(
        tenant_id=tenant_id,
        generation_id=generation_id,
        value=value,
        source=feedback_source(source),
        dimension_scores=[dimension_score(s) for s in dimension_scores],
    )
    if user_id is not None:
        request.user_id = user_id
    if client_feedback_id is not None:
        request.client_feedback_id = client_feedback_id
    if metadata is not None:
        request.metadata.CopyFrom(struct(metadata))
    return request


def feedback_of(message: Any) -> Feedback:
    """REST feedback of a ``Feedback`` message."""
    value = message.value
    which = value.WhichOneof("kind")
    preference = None
    if which == "preference":
        preference = PreferenceOut(
            generation_b_id=value.preference.generation_b_id,
            choice=_CHOICE_FROM_PROTO.get(value.preference.choice),
            strength=value.preference.strength if value.preference.HasField("strength") else None,
        )
    return Feedback(
        feedback_id=message.feedback_id,
        tenant_id=message.tenant_id,
        generation_id=message.generation_id,
        kind=FeedbackKind(which) if which else None,
        thumbs=_THUMB_FROM_PROTO.get(value.thumbs) if which == "thumbs" else None,
        rating=value.rating.value if which == "rating" else None,
        comment=value.comment.text if which == "comment" else None,
        preference=preference,
        correction=value.correction.output if which == "correction" else None,
        source=source_of(message.source),
        user_id=optional_str(message, "user_id"),
        dimension_scores=[
            DimensionScoreOut(
                dimension=s.dimension,
                score=s.score,
                evaluator=s.evaluator,
                rationale=s.rationale if s.HasField("rationale") else None,
            )
            for s in message.dimension_scores
        ],
        client_feedback_id=optional_str(message, "client_feedback_id"),
        revision=message.revision,
        metadata=dict_of(message.metadata),
        created_at=datetime_of(message, "created_at"),
        updated_at=datetime_of(message, "updated_at"),
        retracted_at=datetime_of(message, "retracted_at"),
        task=message.task,
        adapter=adapter_of(message),
    )


def feedback_filter(
    *,
    task: str | None,
    user_id: str | None,
    adapter: str | None,
    adapter_version: str | None,
    generation_id: str | None,
    kinds: Sequence[FeedbackKind],
    sources: Sequence[SourceKind],
    created_after: datetime | None,
    created_before: datetime | None,
    include_retracted: bool,
) -> Any:
    """The ``FeedbackFilter`` of the query parameters."""
    message = service_pb2.FeedbackFilter(
        kinds=[_KIND_TO_PROTO[k] for k in kinds],
        source_kinds=[_SOURCE_TO_PROTO[s] for s in sources],
        include_retracted=include_retracted,
    )
    for name, value in (("task", task), ("user_id", user_id), ("generation_id", generation_id)):
        if value is not None:
            setattr(message, name, value)
    if adapter is not None:
        message.adapter.CopyFrom(common_pb2.AdapterRef(name=adapter, version=adapter_version or ""))
    if created_after is not None:
        message.created.start.CopyFrom(timestamp(created_after))
    if created_before is not None:
        message.created.end.CopyFrom(timestamp(created_before))
    return message


def group_by(groups: Sequence[GroupBy]) -> list[Any]:
    """The ``StatsGroupBy`` values of ``?group_by=``, without repeats."""
    return [_GROUP_TO_PROTO[g] for g in dict.fromkeys(groups)]


def bucket_of(message: Any) -> StatsBucket:
    """REST statistics of a ``FeedbackStatsBucket``."""
    return StatsBucket(
        task=optional_str(message, "task"),
        adapter=adapter_of(message),
        source=_SOURCE_FROM_PROTO.get(message.source_kind),
        generation_count=message.generation_count,
        count_by_kind=dict(message.count_by_kind),
        mean_rating=message.mean_rating if message.HasField("mean_rating") else None,
        thumbs_down_rate=(
            message.thumbs_down_rate if message.HasField("thumbs_down_rate") else None
        ),
        preference_win_rate=(
            message.preference_win_rate if message.HasField("preference_win_rate") else None
        ),
    )
