"""The OpenAI-compatible request bodies both the engine and the service accept.

Fields are OpenAI's, plus vLLM's sampling extras (``top_k``, ``repetition_penalty``).
Unknown fields are accepted and ignored, as vLLM does, since clients (LangChain, CrewAI)
send options of their own; options that would change the answer but are not supported
(``logprobs``, ``tools``, ``echo``, ``suffix``, ``best_of`` > n) are refused with a 400
rather than silently dropped.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Upper bounds that keep one request from occupying the engine unreasonably.
MAX_CHOICES = 16
MAX_STOP_STRINGS = 8


class ProtocolError(ValueError):
    """A request that cannot be served as asked (an OpenAI-style 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ChatMessage(BaseModel):
    """One chat message; content may be a string or OpenAI's list of text parts."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text (text parts joined; other part types refused)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ProtocolError("only text content parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``."""

    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields common to chat and text completions."""

    model_config = ConfigDict(extra="allow")
    model: str
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    # vLLM's extra: keep generating past the end-of-sequence token (benchmarks).
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None
    logprobs: bool | int | None = None
    best_of: int | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return value

    @model_validator(mode="after")
    def _unsupported(self) -> SamplingFields:
        if self.logprobs:
            raise ValueError("logprobs are not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        """``stop`` as a tuple."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _no_tools(self) -> ChatCompletionRequest:
        if self.tools:
            raise ValueError("tools are not supported")
        return self

    def token_limit(self) -> int | None:
        """``max_completion_tokens`` (the newer name) or ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    """``POST /v1/completions`` (one text prompt)."""

    prompt: str | list[str] | list[int]
    echo: bool = False
    suffix: str | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> CompletionRequest:
        if self.echo or self.suffix:
            raise ValueError("echo and suffix are not supported")
        texts = isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str)
        if texts and len(self.prompt) != 1:
            raise ValueError("one prompt per request (send several requests instead)")
        return self

    def prompt_text(self) -> str | None:
        """The prompt as text, or None when it was given as token ids."""
        if isinstance(self.prompt, str):
            return self.prompt
        if self.prompt and isinstance(self.prompt[0], str):
            return str(self.prompt[0])
        return None if self.prompt else ""

    def prompt_ids(self) -> list[int] | None:
        """The prompt's token ids when it was given as ids."""
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], int):
            return [int(i) for i in self.prompt]
        return None


def error_body(message: str, kind: str, status: int, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error envelope (what its client raises ``APIStatusError`` subclasses from)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def validation_problem(
    errors: Sequence[Any], fallback: str | None = None
) -> tuple[str, str | None, str]:
    """(message, param, pydantic error type) of a request's first validation error; the
    message names the field ("messages: List should have at least 1 item"); without a
    field, ``fallback`` or the bare message."""
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    text = str(first.get("msg", "invalid request"))
    message = f"{where}: {text}" if where else (fallback or text)
    return message, where or None, str(first.get("type", ""))


def model_card(
    name: str, *, root: str, parent: str | None, created: int, **extra: Any
) -> dict[str, Any]:
    """One ``/v1/models`` entry, as vLLM writes it: an adapter carries its base as
    ``parent``."""
    return {"id": name, "object": "model", "created": created, "owned_by": "flywheel",
            "root": root, "parent": parent, **extra}  # fmt: skip


def completion_id(chat: bool) -> str:
    """A fresh response id in OpenAI's style."""
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def now() -> int:
    """OpenAI's ``created``: Unix seconds."""
    return int(time.time())
