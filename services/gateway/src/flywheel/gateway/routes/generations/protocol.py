"""REST schemas of generations."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import Field

from flywheel.gateway.routes.common import (
    AdapterRef,
    Double,
    Float32,
    Int32,
    Int64,
    Metadata,
    RequestModel,
    ResponseModel,
    Timestamp,
    UInt32,
)

_Label = Annotated[str, Field(max_length=200)]


class ChatMessage(RequestModel):
    """One chat turn, in the OpenAI / Hugging Face chat-template shape."""

    role: str = Field(
        min_length=1, max_length=50, description='"system", "user", "assistant" or "tool".'
    )
    content: str
    name: str | None = Field(None, max_length=200)


class SamplingParams(RequestModel):
    """Decoding parameters; unset means the engine's default."""

    temperature: Float32 | None = None
    top_p: Float32 | None = None
    top_k: Int32 | None = None
    max_tokens: UInt32 | None = None
    stop: list[str] = Field(default_factory=list, max_length=64)
    seed: Int64 | None = None
    presence_penalty: Float32 | None = None
    frequency_penalty: Float32 | None = None
    repetition_penalty: Float32 | None = None


class WeightedAdapter(RequestModel):
    """An adapter of a composition, with its weight."""

    adapter: AdapterRef
    weight: Double


class GenerationCreate(RequestModel):
    """One model output as served to a user. Ids, tenant, `prompt_hash` and `created_at`
    are set by the server."""

    client_generation_id: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="Your id for it, unique per tenant: logging the same one again "
        "returns the first record (200 instead of 201).",
    )
    task: str = Field(min_length=1, max_length=100, description="Task type name.")
    prompt: str | list[ChatMessage] = Field(
        description="A plain completion prompt, or chat messages without the model's answer."
    )
    output: str = Field(description="The model's answer.")
    model: str = Field(
        min_length=1, max_length=200, description="Model, adapter or alias asked for."
    )
    base_model: str = Field("", max_length=500, description="Base model that served it.")
    adapter: AdapterRef | None = Field(None, description="Adapter version that served it.")
    composed_adapters: list[WeightedAdapter] = Field(default_factory=list, max_length=64)
    alias: _Label | None = None
    traffic_arm: _Label | None = None
    sampling: SamplingParams | None = None
    latency_ms: Annotated[Double, Field(ge=0, le=1e10)] | None = None
    prompt_tokens: UInt32 = 0
    completion_tokens: UInt32 = 0
    user_id: _Label | None = Field(None, description="End user who saw it (your own id).")
    metadata: Metadata | None = Field(None, description="Free-form; never interpreted.")
    served_at: Timestamp | None = Field(
        None, description="When it was served, if earlier than now (delayed logging)."
    )


class GenerationBatch(RequestModel):
    """Generations to log together, all or none."""

    generations: list[GenerationCreate] = Field(min_length=1, max_length=1000)


class ChatMessageOut(ResponseModel):
    """One chat turn."""

    role: str
    content: str
    name: str | None = None


class SamplingParamsOut(ResponseModel):
    """Decoding parameters; null means the engine's default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None


class WeightedAdapterOut(ResponseModel):
    """An adapter of a composition, with its weight."""

    adapter: AdapterRef | None
    weight: float


class Generation(ResponseModel):
    """A logged generation (immutable)."""

    generation_id: str
    tenant_id: str
    client_generation_id: str | None
    task: str
    prompt: str | list[ChatMessageOut]
    prompt_hash: str = Field(description="sha256 of the canonical prompt.")
    output: str
    model: str
    base_model: str
    adapter: AdapterRef | None
    composed_adapters: list[WeightedAdapterOut]
    alias: str | None
    traffic_arm: str | None
    sampling: SamplingParamsOut
    latency_ms: float | None
    prompt_tokens: int
    completion_tokens: int
    user_id: str | None
    metadata: dict[str, Any]
    created_at: datetime | None


class BatchItem(ResponseModel):
    """The result for one generation of a batch."""

    generation: Generation
    created: bool = Field(description="False when client_generation_id was already logged.")


class BatchResult(ResponseModel):
    """One result per generation, in request order."""

    results: list[BatchItem]
