"""What a build starts from: feedback facts and the generations they judge.

Plain data, free of storage and transport: the ledger loads them from the service's tables,
the CLI from a feedback JSONL export, and the curation steps only ever see these.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format

from flywheel.contracts.feedback.v1 import resources_pb2 as fb

# A prompt is plain text or a conversation: ((role, content), ...).
Messages = tuple[tuple[str, str], ...]
PromptValue = str | Messages

HUMAN = "human"


@dataclass(frozen=True, slots=True)
class GenerationText:
    """A judged generation: what training rows are made of."""

    generation_id: str
    task: str
    prompt: PromptValue
    prompt_hash: str
    output: str


@dataclass(slots=True)
class FeedbackFact:
    """One feedback as it stood at the build's cutoff (its latest version by then)."""

    # The event that left the feedback in this state: lineage points at it.
    event_id: str
    feedback_id: str
    generation_id: str
    task: str
    kind: str
    source: str
    occurred_at: datetime
    thumbs_up: bool | None = None
    rating: int | None = None
    choice: str | None = None
    strength: float | None = None
    generation_b_id: str | None = None
    correction: str | None = None
    dimension_scores: tuple[tuple[str, float], ...] = ()

    @property
    def human(self) -> bool:
        """Whether a person gave it (rather than a critic)."""
        return self.source == HUMAN


CHOICES = {
    fb.PREFERENCE_CHOICE_A: "a",
    fb.PREFERENCE_CHOICE_B: "b",
    fb.PREFERENCE_CHOICE_TIE: "tie",
}


def source_of(source: fb.FeedbackSource) -> str:
    """``human`` or ``synthetic:<critic>``."""
    if source.kind == fb.SOURCE_KIND_SYNTHETIC:
        return f"synthetic:{source.critic}"
    return HUMAN


def value_columns(value: fb.FeedbackValue) -> dict[str, Any]:
    """A feedback value as the typed columns of a version (kind and the kind's fields).

    The kind is the value's oneof field: thumbs, rating, comment, preference, correction.
    """
    kind = value.WhichOneof("kind") or ""
    columns: dict[str, Any] = {"kind": kind}
    if kind == "thumbs":
        columns["thumbs_up"] = value.thumbs == fb.THUMB_UP
    elif kind == "rating":
        columns["rating"] = value.rating.value
    elif kind == "preference":
        columns["choice"] = CHOICES.get(value.preference.choice, "tie")
        columns["generation_b_id"] = value.preference.generation_b_id
        if value.preference.HasField("strength"):
            columns["strength"] = value.preference.strength
    elif kind == "correction":
        columns["correction"] = value.correction.output
    return columns


def prompt_value(prompt: Any) -> PromptValue:
    """A Prompt (message or its protobuf JSON) as text or a conversation."""
    if isinstance(prompt, dict):
        if "messages" in prompt:
            messages = prompt["messages"].get("messages", [])
            return tuple((m.get("role", "user"), m.get("content", "")) for m in messages)
        return str(prompt.get("text", ""))
    if prompt.WhichOneof("kind") == "messages":
        return tuple((m.role, m.content) for m in prompt.messages.messages)
    return str(prompt.text)


def generation_text(generation: fb.Generation) -> GenerationText:
    """A Generation message as the build's input."""
    return GenerationText(
        generation_id=generation.generation_id,
        task=generation.task,
        prompt=prompt_value(generation.prompt),
        prompt_hash=generation.prompt_hash,
        output=generation.output,
    )


def generation_columns(generation: fb.Generation) -> dict[str, Any]:
    """A Generation message as a ``source_generations`` row."""
    return {
        "generation_id": generation.generation_id,
        "tenant_id": generation.tenant_id,
        "task": generation.task,
        "prompt": json_format.MessageToDict(generation.prompt, preserving_proto_field_name=True),
        "prompt_hash": generation.prompt_hash,
        "output": generation.output,
        "created_at": generation.created_at.ToDatetime(UTC),
    }


def version_columns(
    feedback: fb.Feedback, *, event_id: str, occurred_at: datetime, retracted: bool = False
) -> dict[str, Any]:
    """A Feedback message, as one event left it, as a ``feedback_versions`` row."""
    return {
        "event_id": event_id,
        "feedback_id": feedback.feedback_id,
        "tenant_id": feedback.tenant_id,
        "task": feedback.task,
        "generation_id": feedback.generation_id,
        "revision": feedback.revision,
        "thumbs_up": None,
        "rating": None,
        "choice": None,
        "strength": None,
        "generation_b_id": None,
        "correction": None,
        **value_columns(feedback.value),
        "source": source_of(feedback.source),
        "dimension_scores": [[d.dimension, d.score] for d in feedback.dimension_scores],
        "retracted": retracted or feedback.HasField("retracted_at"),
        "occurred_at": occurred_at,
    }


# The version columns a fact is made of, in ``fact_from_row``'s order.
FACT_COLUMNS = (
    "event_id", "feedback_id", "generation_id", "task", "kind", "source", "occurred_at",
    "thumbs_up", "rating", "choice", "strength", "generation_b_id", "correction",
    "dimension_scores",
)  # fmt: skip


def fact_from_columns(columns: dict[str, Any]) -> FeedbackFact:
    """A ``feedback_versions`` row (as a mapping, scores as a list) as a fact."""
    return fact_from_row([columns[name] for name in FACT_COLUMNS])


def fact_from_row(row: Sequence[Any]) -> FeedbackFact:
    """A fact from the columns of ``FACT_COLUMNS``, in order; the scores as a list, or as
    JSON text (how the ledger reads them, decoding only rows that have any)."""
    (event_id, feedback_id, generation_id, task, kind, source, occurred, thumbs_up, rating,
     choice, strength, generation_b_id, correction, scores) = row  # fmt: skip
    return FeedbackFact(
        event_id,
        feedback_id,
        generation_id,
        task,
        kind,
        source,
        occurred if occurred.tzinfo else occurred.replace(tzinfo=UTC),
        thumbs_up,
        rating,
        choice,
        strength,
        generation_b_id,
        correction,
        tuple(
            (str(d), float(x))
            for d, x in (json.loads(scores) if isinstance(scores, str) else scores or ())
        )
        if scores and scores != "[]"
        else (),
    )
