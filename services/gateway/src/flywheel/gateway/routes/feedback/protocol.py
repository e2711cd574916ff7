"""REST schemas of feedback.

A feedback's value is one of five top-level keys, exactly one per request:
``{"thumbs": "up"}``, ``{"rating": 4}``, ``{"comment": "..."}``,
``{"preference": {"generation_b_id": "...", "choice": "a"}}``, ``{"correction": "..."}``.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field
from pydantic.config import JsonDict

from flywheel.gateway.routes.common import (
    AdapterRef,
    Double,
    Metadata,
    RequestModel,
    ResponseModel,
    StrictInt,
)

Thumb = Literal["up", "down"]
Choice = Literal["a", "b", "tie"]

VALUE_KINDS = ("thumbs", "rating", "comment", "preference", "correction")

# `human` or `synthetic:<critic>`.
SOURCE_PATTERN = r"^(human|synthetic:[A-Za-z0-9][A-Za-z0-9_.:/@-]{0,199})$"


class FeedbackKind(StrEnum):
    """Kind of a feedback's value."""

    THUMBS = "thumbs"
    RATING = "rating"
    COMMENT = "comment"
    PREFERENCE = "preference"
    CORRECTION = "correction"


class SourceKind(StrEnum):
    """Whether a person or an AI critic gave a feedback."""

    HUMAN = "human"
    SYNTHETIC = "synthetic"


class GroupBy(StrEnum):
    """What feedback statistics can be grouped by."""

    ADAPTER = "adapter"
    TASK = "task"
    SOURCE = "source"


class Preference(RequestModel):
    """A/B preference between this feedback's generation (A) and generation B of the same
    prompt and tenant."""

    generation_b_id: str = Field(min_length=1, max_length=200)
    choice: Choice = Field(description='"a" (this generation), "b", or "tie".')
    strength: Annotated[Double, Field(gt=0, le=1)] | None = Field(
        None, description="How strong the preference is, in (0, 1]; omit for none given."
    )


class DimensionScore(RequestModel):
    """A score on one named quality dimension."""

    dimension: str = Field(min_length=1, max_length=100)
    score: Annotated[Double, Field(ge=0, le=1)] = Field(description="Normalised to [0, 1].")
    evaluator: str = Field("", max_length=200)
    rationale: str | None = Field(None, max_length=10_000)


class FeedbackValueFields(RequestModel):
    """The five value keys; exactly one per request (checked by the handler, which names
    the fields)."""

    thumbs: Thumb | None = None
    rating: Annotated[StrictInt, Field(ge=1, le=5)] | None = None
    comment: str | None = None
    preference: Preference | None = None
    correction: str | None = Field(None, description="A better output, written by a person.")

    def kinds(self) -> list[str]:
        """The value keys present in the request (even if null)."""
        return [kind for kind in VALUE_KINDS if kind in self.model_fields_set]


_ONE_OF: JsonDict = {"oneOf": [{"required": [kind]} for kind in VALUE_KINDS]}


class FeedbackCreate(FeedbackValueFields):
    """Feedback on one of the tenant's generations: exactly one of `thumbs`, `rating`,
    `comment`, `preference`, `correction`."""

    model_config = ConfigDict(json_schema_extra=_ONE_OF)

    generation_id: str = Field(min_length=1, max_length=200)
    source: str = Field(
        "human",
        pattern=SOURCE_PATTERN,
        description='"human", or "synthetic:<critic>" (service keys only).',
    )
    user_id: str | None = Field(
        None, max_length=200, description="Rater; defaults to the user the API key acts as."
    )
    client_feedback_id: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="Your id for it, unique per tenant: recording it again returns the "
        "first record (200 instead of 201).",
    )
    metadata: Metadata | None = None
    dimension_scores: list[DimensionScore] = Field(default_factory=list, max_length=100)


class FeedbackEdit(FeedbackValueFields):
    """A new value for a feedback, of the same kind: exactly one of `thumbs`, `rating`,
    `comment`, `preference`, `correction`."""

    model_config = ConfigDict(json_schema_extra=_ONE_OF)

    expected_revision: Annotated[StrictInt, Field(ge=1, le=2**32 - 1)] | None = Field(
        None,
        description='The revision you edited (or send `If-Match: "<revision>"`); 409 if '
        "it is no longer the latest.",
    )
    reason: str | None = Field(None, max_length=2000)


class FeedbackRetract(RequestModel):
    """Why a feedback is withdrawn (optional)."""

    reason: str | None = Field(None, max_length=2000)


class PreferenceOut(ResponseModel):
    """An A/B preference."""

    generation_b_id: str
    choice: Choice | None
    strength: float | None


class DimensionScoreOut(ResponseModel):
    """A score on one quality dimension."""

    dimension: str
    score: float
    evaluator: str
    rationale: str | None


class Feedback(ResponseModel):
    """A feedback, latest revision. Exactly the key named by `kind` holds its value."""

    feedback_id: str
    tenant_id: str
    generation_id: str
    kind: FeedbackKind | None
    thumbs: Thumb | None = None
    rating: int | None = None
    comment: str | None = None
    preference: PreferenceOut | None = None
    correction: str | None = None
    source: str = Field(description='"human" or "synthetic:<critic>".')
    user_id: str | None
    dimension_scores: list[DimensionScoreOut]
    client_feedback_id: str | None
    revision: int = Field(description="1 at first; each edit adds 1. Also the ETag.")
    metadata: dict[str, Any]
    created_at: datetime | None
    updated_at: datetime | None
    retracted_at: datetime | None
    task: str
    adapter: AdapterRef | None


class StatsBucket(ResponseModel):
    """Aggregates of one group; keys not grouped by are null."""

    task: str | None
    adapter: AdapterRef | None
    source: SourceKind | None
    generation_count: int
    count_by_kind: dict[str, int]
    mean_rating: float | None
    thumbs_down_rate: float | None = Field(description="thumbs down / all thumbs.")
    preference_win_rate: float | None = Field(description="Share of preferences won, no ties.")


class FeedbackStats(ResponseModel):
    """One bucket per group present in the data."""

    buckets: list[StatsBucket]
