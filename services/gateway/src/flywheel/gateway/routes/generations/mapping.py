"""Generations: REST <-> protobuf, and protobuf field paths -> REST field names."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from flywheel.contracts.common.v1 import common_pb2
from flywheel.contracts.feedback.v1 import service_pb2
from flywheel.gateway.convert import (
    adapter_of,
    adapter_ref,
    datetime_of,
    dict_of,
    duration_ms,
    ms_of,
    optional_str,
    struct,
    timestamp,
)
from flywheel.gateway.problems import FieldRenamer, normalise_path, renamer
from flywheel.gateway.routes.generations.protocol import (
    ChatMessageOut,
    Generation,
    GenerationCreate,
    SamplingParamsOut,
    WeightedAdapterOut,
)

# GenerationInput paths that differ from the REST body's.
_INPUT_RULES = {
    "prompt.text": "prompt",
    "prompt.messages.messages": "prompt",
    "prompt.messages": "prompt",
    "latency": "latency_ms",
}
_FILTER_RULES = {
    "filter.adapter.name": "adapter",
    "filter.adapter.version": "adapter_version",
    "filter.adapter": "adapter",
    "filter.created.start": "created_after",
    "filter.created.end": "created_before",
    "filter.created": "created_after",
    "filter": "",
    "page.cursor": "cursor",
    "page.page_size": "limit",
}

generation_fields: FieldRenamer = renamer(_INPUT_RULES, strip="generation")
"""LogGeneration paths (``generation.prompt.text``) -> REST fields (``prompt``)."""

filter_fields: FieldRenamer = renamer(_FILTER_RULES)
"""ListGenerations paths (``filter.created.start``) -> query parameters."""

_inner = renamer(_INPUT_RULES)


def batch_fields(path: str) -> str:
    """BatchLogGenerations paths -> REST (``generations[2].latency`` -> ``...2.latency_ms``)."""
    parts = normalise_path(path).split(".")
    if len(parts) >= 3 and parts[0] == "generations" and parts[1].isdigit():
        return ".".join([*parts[:2], _inner(".".join(parts[2:]))])
    if len(parts) >= 2 and parts[0] == "generation":  # a batch of one is named like a single
        return ".".join(["generations", "0", _inner(".".join(parts[1:]))])
    return normalise_path(path)


def generation_input(body: GenerationCreate) -> Any:
    """The ``GenerationInput`` of a REST generation."""
    message = service_pb2.GenerationInput(
        task=body.task,
        output=body.output,
        model=body.model,
        base_model=body.base_model,
        prompt_tokens=body.prompt_tokens,
        completion_tokens=body.completion_tokens,
    )
    if isinstance(body.prompt, str):
        message.prompt.text = body.prompt
    else:
        message.prompt.messages.SetInParent()
        for turn in body.prompt:
            chat = message.prompt.messages.messages.add(role=turn.role, content=turn.content)
            if turn.name is not None:
                chat.name = turn.name
    for name in ("client_generation_id", "alias", "traffic_arm", "user_id"):
        value = getattr(body, name)
        if value is not None:
            setattr(message, name, value)
    if body.adapter is not None:
        message.adapter.CopyFrom(adapter_ref(body.adapter))
    for weighted in body.composed_adapters:
        message.composed_adapters.add(adapter=adapter_ref(weighted.adapter), weight=weighted.weight)
    if body.sampling is not None:
        sampling = body.sampling
        for name in (
            "temperature",
            "top_p",
            "top_k",
            "max_tokens",
            "seed",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
        ):
            value = getattr(sampling, name)
            if value is not None:
                setattr(message.sampling, name, value)
        message.sampling.stop.extend(sampling.stop)
    if body.latency_ms is not None:
        message.latency.CopyFrom(duration_ms(body.latency_ms))
    if body.metadata is not None:
        message.metadata.CopyFrom(struct(body.metadata))
    if body.served_at is not None:
        message.served_at.CopyFrom(timestamp(body.served_at))
    return message


def generation_of(message: Any) -> Generation:
    """REST generation of a ``Generation`` message."""
    prompt: str | list[ChatMessageOut]
    if message.prompt.WhichOneof("kind") == "messages":
        prompt = [
            ChatMessageOut(
                role=m.role, content=m.content, name=m.name if m.HasField("name") else None
            )
            for m in message.prompt.messages.messages
        ]
    else:
        prompt = message.prompt.text
    sampling = message.sampling
    return Generation(
        generation_id=message.generation_id,
        tenant_id=message.tenant_id,
        client_generation_id=optional_str(message, "client_generation_id"),
        task=message.task,
        prompt=prompt,
        prompt_hash=message.prompt_hash,
        output=message.output,
        model=message.model,
        base_model=message.base_model,
        adapter=adapter_of(message),
        composed_adapters=[
            WeightedAdapterOut(adapter=adapter_of(w), weight=w.weight)
            for w in message.composed_adapters
        ],
        alias=optional_str(message, "alias"),
        traffic_arm=optional_str(message, "traffic_arm"),
        sampling=SamplingParamsOut(
            **{
                name: getattr(sampling, name)
                for name in (
                    "temperature",
                    "top_p",
                    "top_k",
                    "max_tokens",
                    "seed",
                    "presence_penalty",
                    "frequency_penalty",
                    "repetition_penalty",
                )
                if sampling.HasField(name)
            },
            stop=list(sampling.stop),
        ),
        latency_ms=ms_of(message.latency) if message.HasField("latency") else None,
        prompt_tokens=message.prompt_tokens,
        completion_tokens=message.completion_tokens,
        user_id=optional_str(message, "user_id"),
        metadata=dict_of(message.metadata),
        created_at=datetime_of(message, "created_at"),
    )


def generation_filter(
    *,
    task: str | None,
    user_id: str | None,
    adapter: str | None,
    adapter_version: str | None,
    alias: str | None,
    prompt_hash: str | None,
    client_generation_id: str | None,
    created_after: datetime | None,
    created_before: datetime | None,
) -> Any:
    """The ``GenerationFilter`` of the list's query parameters."""
    message = service_pb2.GenerationFilter()
    for name, value in (
        ("task", task),
        ("user_id", user_id),
        ("alias", alias),
        ("prompt_hash", prompt_hash),
        ("client_generation_id", client_generation_id),
    ):
        if value is not None:
            setattr(message, name, value)
    if adapter is not None:
        message.adapter.CopyFrom(common_pb2.AdapterRef(name=adapter, version=adapter_version or ""))
    if created_after is not None:
        message.created.start.CopyFrom(timestamp(created_after))
    if created_before is not None:
        message.created.end.CopyFrom(timestamp(created_before))
    return message
