"""The CPU engine's HTTP API: the subset of vLLM's server the inference service drives.

``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (streaming too), the
runtime LoRA endpoints ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``, and
``/health``: the same paths, bodies, status codes and error envelopes as ``vllm serve``
with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``, so one contract suite checks both.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel

from flywheel.inference.engine.core import (
    AdapterExistsError,
    ChoiceEvent,
    EngineCore,
    EngineRequest,
    UnknownAdapterError,
)
from flywheel.inference.engine.loading import read_adapter
from flywheel.inference.engine.lora import AdapterLoadError
from flywheel.inference.engine.sampling import SamplingParams
from flywheel.inference.engine.structured import ResponseFormatError, grammar_for
from flywheel.inference.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ProtocolError,
    SamplingFields,
    completion_id,
    error_body,
    model_card,
    now,
    validation_problem,
)


class LoadLoraAdapterRequest(BaseModel):
    """vLLM's body for ``POST /v1/load_lora_adapter``."""

    lora_name: str
    lora_path: str


class UnloadLoraAdapterRequest(BaseModel):
    """vLLM's body for ``POST /v1/unload_lora_adapter``."""

    lora_name: str
    lora_int_id: int | None = None


class ModelNotFound(LookupError):
    """The ``model`` field names neither the base model nor a loaded adapter."""


@dataclass
class _Choice:
    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0


@dataclass
class _Run:
    """One request in flight: the events of all its choices, as they arrive."""

    request: EngineRequest
    events: asyncio.Queue[ChoiceEvent | BaseException]
    choices: list[_Choice] = field(default_factory=list)


def build_app(core: EngineCore, model_name: str, model_path: str) -> FastAPI:
    """The engine's FastAPI app around a started ``core``."""
    app = FastAPI(title="Flywheel CPU engine", docs_url=None, redoc_url=None)
    tokenizer = core.tokenizer
    dtype = next(core.model.parameters()).dtype

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        message, param, _kind = validation_problem(error.errors(), str(error))
        return _error(message, "BadRequestError", 400, param)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = now()
        base = model_card(
            model_name, root=model_path, parent=None, created=created,
            max_model_len=core.max_model_len,
        )  # fmt: skip
        data = [base]
        data += [
            model_card(name, root=path, parent=model_name, created=created, max_model_len=None)
            for name, path in sorted(core.adapter_paths.items())
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraAdapterRequest) -> Response:
        if body.lora_name in core.adapter_paths:
            return _error(
                f"The lora adapter '{body.lora_name}' has already been loaded.",
                "InvalidUserInput",
                400,
            )
        try:
            weights = await asyncio.to_thread(read_adapter, body.lora_path, dtype)
            core.slots.check(weights)
            await asyncio.wrap_future(core.add_adapter(body.lora_name, body.lora_path, weights))
        except (AdapterLoadError, AdapterExistsError) as error:
            return _error(str(error), "BadRequestError", 400, "lora_path")
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest) -> Response:
        try:
            await asyncio.wrap_future(core.remove_adapter(body.lora_name))
        except UnknownAdapterError as error:
            return _error(str(error), "NotFoundError", 404, "lora_name")
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    def adapter_for(name: str) -> str | None:
        if name == model_name:
            return None
        if name in core.adapter_paths:
            return name
        raise ModelNotFound(f"The model `{name}` does not exist.")

    async def serve(
        body: SamplingFields, prompt_ids: list[int], default_max: int, chat: bool
    ) -> Response:
        try:
            adapter = adapter_for(body.model)
            grammar = None
            if body.response_format is not None:  # compiling may take a while: off the loop
                grammar = await asyncio.to_thread(grammar_for, core.grammars, body.response_format)
            params = _sampling(body, len(prompt_ids), default_max, core.max_model_len)
        except ModelNotFound as error:
            return _error(str(error), "NotFoundError", 404, "model")
        except (ProtocolError, ResponseFormatError) as error:
            return _error(str(error), "BadRequestError", 400, getattr(error, "param", None))
        run = _start(core, prompt_ids, adapter, params, body.n, grammar)
        if body.stream:
            chunks = _stream(core, run, body, chat, len(prompt_ids))
            return StreamingResponse(chunks, media_type="text/event-stream")
        try:
            await _collect(core, run)
        except UnknownAdapterError as error:
            return _error(str(error), "NotFoundError", 404, "model")
        return JSONResponse(_final(run, body, chat, len(prompt_ids)))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            rendered = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        except ProtocolError as error:
            return _error(str(error), "BadRequestError", 400, error.param)
        prompt_ids = tokenizer(str(rendered), add_special_tokens=False)["input_ids"]
        body.max_tokens = body.token_limit()
        return await serve(body, prompt_ids, core.max_model_len, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Response:
        ids = body.prompt_ids()
        if ids is not None and any(not 0 <= i < core.vocab_size for i in ids):
            return _error("prompt has token ids outside the vocabulary", "BadRequestError", 400)
        if ids is None:
            ids = tokenizer(body.prompt_text() or "")["input_ids"]
        # OpenAI's default for text completions is 16 tokens.
        return await serve(body, list(ids), 16, chat=False)

    return app


def _error(message: str, kind: str, status: int, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, status, param), status_code=status)


def _sampling(
    body: SamplingFields, prompt_tokens: int, default_max: int, max_model_len: int
) -> SamplingParams:
    room = max_model_len - prompt_tokens
    if room <= 0:
        raise ProtocolError(
            f"the prompt has {prompt_tokens} tokens; this model's context is {max_model_len}",
            "messages",
        )
    max_tokens = body.max_tokens if body.max_tokens is not None else min(default_max, room)
    if max_tokens > room:
        raise ProtocolError(
            f"max_tokens {max_tokens} + {prompt_tokens} prompt tokens exceed the model's "
            f"context of {max_model_len}",
            "max_tokens",
        )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=-1 if body.top_k is None else body.top_k,
        stop=body.stop_strings(),
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        ignore_eos=body.ignore_eos,
    )


def _start(
    core: EngineCore,
    prompt_ids: list[int],
    adapter: str | None,
    params: SamplingParams,
    n: int,
    grammar: Any,
) -> _Run:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[ChoiceEvent | BaseException] = asyncio.Queue()

    def sink(event: ChoiceEvent | BaseException) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    request = EngineRequest(prompt_ids, adapter, params, sink, n=n, grammar=grammar)
    run = _Run(request=request, events=events, choices=[_Choice() for _ in range(n)])
    core.submit(request)
    return run


async def _events(core: EngineCore, run: _Run) -> AsyncIterator[ChoiceEvent]:
    """The run's events until every choice has finished; cancels it if abandoned."""
    pending = len(run.choices)
    try:
        while pending:
            event = await run.events.get()
            if isinstance(event, BaseException):
                raise event
            choice = run.choices[event.index]
            choice.text += event.delta
            choice.tokens = event.completion_tokens
            if event.finish_reason is not None:
                choice.finish_reason = event.finish_reason
                pending -= 1
            yield event
    finally:
        if pending:
            core.cancel(run.request)


async def _collect(core: EngineCore, run: _Run) -> None:
    async for _ in _events(core, run):
        pass


def _usage(run: _Run, prompt_tokens: int) -> dict[str, int]:
    completion = sum(c.tokens for c in run.choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


def _final(run: _Run, body: SamplingFields, chat: bool, prompt_tokens: int) -> dict[str, Any]:
    choices: list[dict[str, Any]] = []
    for index, choice in enumerate(run.choices):
        entry: dict[str, Any] = {
            "index": index,
            "finish_reason": choice.finish_reason,
            "logprobs": None,
        }
        if chat:
            entry["message"] = {"role": "assistant", "content": choice.text}
        else:
            entry["text"] = choice.text
        choices.append(entry)
    return {
        "id": completion_id(chat),
        "object": "chat.completion" if chat else "text_completion",
        "created": now(),
        "model": body.model,
        "choices": choices,
        "usage": _usage(run, prompt_tokens),
    }


async def _stream(
    core: EngineCore, run: _Run, body: SamplingFields, chat: bool, prompt_tokens: int
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
    ident, created = completion_id(chat), now()
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        payload = {"id": ident, "object": kind, "created": created, "model": body.model}
        payload.update(choices=choices, **extra)
        return f"data: {json.dumps(payload)}\n\n"

    if chat:  # OpenAI opens each choice with the assistant role
        yield chunk(
            [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                for i in range(len(run.choices))
            ]
        )
    try:
        async for event in _events(core, run):
            if not event.delta and event.finish_reason is None:
                continue
            entry: dict[str, Any] = {"index": event.index, "finish_reason": event.finish_reason}
            if chat:
                entry["delta"] = {"content": event.delta} if event.delta else {}
            else:
                entry["text"] = event.delta
            entry["logprobs"] = None
            yield chunk([entry])
    except (UnknownAdapterError, RuntimeError) as error:
        yield f"data: {json.dumps(error_body(str(error), 'InternalServerError', 500))}\n\n"
    if body.include_usage():
        yield chunk([], usage=_usage(run, prompt_tokens))
    yield "data: [DONE]\n\n"
