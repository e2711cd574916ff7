"""The engine contract: the subset of vLLM's OpenAI-compatible API that Flywheel relies on.

The Flywheel inference service drives either a real ``vllm serve`` (GPU) or our CPU engine
(``python -m flywheel.inference.engine``) through this one contract, so the suite runs
against either:

- by default it builds the tiny bootstrap Llama in a temp folder and starts our engine on
  a free loopback port;
- with ``FLYWHEEL_ENGINE_URL`` set it uses that server instead. ``FLYWHEEL_ENGINE_MODEL_DIR``
  must then name the model folder the server runs (adapters are made for it on the spot),
  ``FLYWHEEL_ENGINE_ADAPTER_DIR`` a folder the server can read (adapters are written
  there; a temp folder when unset, fine for a server on this machine) and
  ``FLYWHEEL_ENGINE_MODEL_NAME`` the served base model id (default: the one base model
  ``/v1/models`` lists).

Sources for the expected behaviour (vllm-project/vllm): ``entrypoints/openai/
serving_models.py`` (now ``entrypoints/openai/models/serving.py``) for /v1/models and the
LoRA endpoints, ``entrypoints/serve/lora/api_router.py`` for their HTTP answers,
``entrypoints/serve/utils/error_response.py`` and ``entrypoints/openai/engine/protocol.py``
for error bodies, ``serving_chat.py`` / ``serving_completion.py`` for streaming, and
``v1/engine/parallel_sampling.py`` for ``n`` with ``seed``.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam
from openai.types.shared_params import ResponseFormatJSONSchema
from transformers import AutoTokenizer

from flywheel.inference.testing import (
    ALLOCATION_SCHEMA,
    check_allocation,
    engine_server,
    random_lora_adapter,
    tiny_base_model,
)

pytestmark = pytest.mark.engine_contract

URL_ENV = "FLYWHEEL_ENGINE_URL"
MODEL_DIR_ENV = "FLYWHEEL_ENGINE_MODEL_DIR"
ADAPTER_DIR_ENV = "FLYWHEEL_ENGINE_ADAPTER_DIR"
MODEL_NAME_ENV = "FLYWHEEL_ENGINE_MODEL_NAME"
START_TIMEOUT_ENV = "FLYWHEEL_ENGINE_START_TIMEOUT"
SERVED_NAME = "flywheel-tiny"
# Adapter names are unique per run: an external server may still hold a failed run's.
RUN = uuid.uuid4().hex[:8]
TIMEOUT_S = 120.0

PROMPTS = [
    "Split a $5,000 monthly budget across Amazon Ads and Walmart Connect.",
    "Write a headline for a sparkling water brand on Target Roundel.",
    "Instacart",
    "Which retail media network returns the best ROAS for pet food, and why?",
]


@dataclass(frozen=True)
class Engine:
    """A running engine: where it is, what it serves, where adapters for it go."""

    url: str
    model: str  # the served base model id
    model_dir: Path
    adapter_dir: Path
    log: Path | None  # our engine's log, when the suite started it


@dataclass(frozen=True)
class Adapter:
    name: str
    path: Path


def _base_model_id(url: str) -> str:
    cards = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
    bases = [c["id"] for c in cards if c.get("parent") is None]
    if len(bases) != 1:
        pytest.fail(f"set {MODEL_NAME_ENV}: /v1/models lists base models {bases}")
    return str(bases[0])


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """The engine under test: an external one (``FLYWHEEL_ENGINE_URL``) or ours, started."""
    url = os.environ.get(URL_ENV)
    if url:
        url = url.rstrip("/")
        served_dir = os.environ.get(MODEL_DIR_ENV)
        if not served_dir:
            pytest.fail(f"{URL_ENV} needs {MODEL_DIR_ENV}: the model folder the server runs")
        adapters = os.environ.get(ADAPTER_DIR_ENV)
        adapter_root = Path(adapters) if adapters else tmp_path_factory.mktemp("adapters")
        name = os.environ.get(MODEL_NAME_ENV) or _base_model_id(url)
        yield Engine(url, name, Path(served_dir), adapter_root / f"contract-{RUN}", None)
        return
    root = tmp_path_factory.mktemp("engine")
    model_dir = tiny_base_model(root / "models")
    log = root / "engine.log"
    args = ["--max-loras", "8", "--max-lora-rank", "64", "--max-num-seqs", "16"]
    timeout_s = float(os.environ.get(START_TIMEOUT_ENV, "180"))
    with engine_server(
        model_dir, served_model_name=SERVED_NAME, args=args, log_path=log, timeout_s=timeout_s
    ) as url:
        yield Engine(url, SERVED_NAME, model_dir, root / "adapters", log)


@pytest.fixture(scope="module")
def http(engine: Engine) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=engine.url, timeout=TIMEOUT_S) as client:
        yield client


@pytest.fixture(scope="module")
def client(engine: Engine) -> Iterator[openai.OpenAI]:
    # No retries: a retried 5xx would hide an engine error.
    with openai.OpenAI(
        base_url=f"{engine.url}/v1", api_key="x", max_retries=0, timeout=TIMEOUT_S
    ) as c:
        yield c


def _async_client(engine: Engine) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{engine.url}/v1", api_key="x", max_retries=0, timeout=TIMEOUT_S
    )


@pytest.fixture(scope="module")
def tokenizer(engine: Engine) -> Any:
    return AutoTokenizer.from_pretrained(engine.model_dir)


def _make_adapter(engine: Engine, name: str, seed: int) -> Adapter:
    path = random_lora_adapter(engine.model_dir, engine.adapter_dir / name, rank=8, seed=seed)
    return Adapter(name, path)


def _load(http: httpx.Client, adapter: Adapter, name: str | None = None) -> httpx.Response:
    body = {"lora_name": name or adapter.name, "lora_path": str(adapter.path)}
    return http.post("/v1/load_lora_adapter", json=body)


def _unload(http: httpx.Client, name: str) -> httpx.Response:
    return http.post("/v1/unload_lora_adapter", json={"lora_name": name})


def _cards(http: httpx.Client) -> dict[str, dict[str, Any]]:
    response = http.get("/v1/models")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list"
    return {card["id"]: card for card in body["data"]}


def _error(response: httpx.Response) -> dict[str, Any]:
    """The error object of a 4xx answer, checked for vLLM's fields.

    Current vLLM answers ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's
    shape, ``code`` = the HTTP status); older releases put the same fields at the top
    level with ``"object": "error"``. Both are accepted.
    """
    body = response.json()
    error: dict[str, Any] = body["error"] if isinstance(body.get("error"), dict) else body
    assert isinstance(error.get("message"), str), body
    assert error["message"], body
    assert isinstance(error.get("type"), str), body
    assert error.get("code") == response.status_code, body
    return error


@pytest.fixture(scope="module")
def adapters(engine: Engine, http: httpx.Client) -> Iterator[list[Adapter]]:
    """Three random adapters (seeds 1-3) made for the base and loaded; unloaded after."""
    made = [_make_adapter(engine, f"contract-{RUN}-{seed}", seed) for seed in (1, 2, 3)]
    loaded: list[str] = []
    try:
        for adapter in made:
            response = _load(http, adapter)
            assert response.status_code == 200, response.text
            loaded.append(adapter.name)
        yield made
    finally:
        for name in loaded:
            _unload(http, name)


@pytest.fixture(scope="module")
def spare(engine: Engine) -> Adapter:
    """One more adapter on disk (not loaded), for the load/unload tests."""
    return _make_adapter(engine, f"contract-{RUN}-spare", 7)


def _special_texts(tokenizer: Any) -> list[str]:
    return [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]


def _complete(client: openai.OpenAI, model: str, prompt: str, **kwargs: Any) -> Completion:
    kwargs.setdefault("max_tokens", 12)
    kwargs.setdefault("temperature", 0.0)
    completion: Completion = client.completions.create(model=model, prompt=prompt, **kwargs)
    return completion


def _messages(prompt: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": prompt}]


def _chat(client: openai.OpenAI, model: str, prompt: str, **kwargs: Any) -> ChatCompletion:
    kwargs.setdefault("max_tokens", 12)
    kwargs.setdefault("temperature", 0.0)
    chat: ChatCompletion = client.chat.completions.create(
        model=model, messages=_messages(prompt), **kwargs
    )
    return chat


# --- /v1/models and the LoRA endpoints ------------------------------------------------


def test_models_lists_the_base(engine: Engine, http: httpx.Client, client: openai.OpenAI) -> None:
    cards = _cards(http)
    assert engine.model in cards, cards
    card = cards[engine.model]
    assert card["object"] == "model"
    assert card.get("parent") is None
    # vLLM: root = the --model path, max_model_len = the context length.
    assert Path(card["root"]).resolve() == engine.model_dir.resolve()
    assert isinstance(card["max_model_len"], int)
    assert card["max_model_len"] > 0
    assert engine.model in [m.id for m in client.models.list()]


def test_loaded_adapter_is_listed_with_its_parent(
    engine: Engine, http: httpx.Client, spare: Adapter
) -> None:
    name = f"{spare.name}-listed"
    response = _load(http, spare, name)
    try:
        # vLLM answers 200 with the text "Success: LoRA adapter '<name>' added successfully."
        assert response.status_code == 200, response.text
        assert name in response.text
        card = _cards(http)[name]
        assert card["object"] == "model"
        assert card["parent"] == engine.model
        assert card["root"] == str(spare.path)
    finally:
        _unload(http, name)


def test_loading_a_loaded_name_again_is_400(
    http: httpx.Client, adapters: list[Adapter], spare: Adapter
) -> None:
    # vLLM: 400 InvalidUserInput "The lora adapter '<name>' has already been loaded."
    # (every release; newer ones let load_inplace=true replace it).
    response = _load(http, spare, adapters[0].name)
    assert response.status_code == 400, response.text
    assert adapters[0].name in _error(response)["message"]
    assert _cards(http)[adapters[0].name]["root"] == str(adapters[0].path)  # unchanged


def test_unload_removes_the_adapter(
    engine: Engine, http: httpx.Client, client: openai.OpenAI, spare: Adapter
) -> None:
    name = f"{spare.name}-unloaded"
    assert _load(http, spare, name).status_code == 200
    _complete(client, name, PROMPTS[0], max_tokens=2)  # served while loaded
    response = _unload(http, name)
    assert response.status_code == 200, response.text
    assert name not in _cards(http)
    with pytest.raises(openai.NotFoundError):
        _complete(client, name, PROMPTS[0], max_tokens=2)


def test_unloading_an_unknown_adapter_is_404(http: httpx.Client) -> None:
    # vLLM: 404 NotFoundError "The lora adapter '<name>' cannot be found."
    response = _unload(http, f"contract-{RUN}-never-loaded")
    assert response.status_code == 404, response.text
    _error(response)


def test_loading_a_missing_path_fails_and_the_engine_keeps_serving(
    engine: Engine, http: httpx.Client, client: openai.OpenAI, tmp_path: Path
) -> None:
    name = f"contract-{RUN}-missing"
    response = _load(http, Adapter(name, tmp_path / "no-such-adapter"))
    # vLLM validates by loading at once: current releases answer 404 NotFoundError
    # "Loading lora <name> failed: No adapter found for <path>"; older ones 400.
    assert response.status_code in (400, 404), response.text
    _error(response)
    assert name not in _cards(http)
    assert http.get("/health").status_code == 200
    assert _complete(client, engine.model, PROMPTS[0], max_tokens=2).choices


def test_loading_without_a_path_is_400(http: httpx.Client) -> None:
    # vLLM: 400 "Both 'lora_name' and 'lora_path' must be provided."
    response = http.post(
        "/v1/load_lora_adapter", json={"lora_name": f"contract-{RUN}-nopath", "lora_path": ""}
    )
    assert response.status_code == 400, response.text
    _error(response)


def test_an_unknown_model_is_404(engine: Engine, http: httpx.Client, client: openai.OpenAI) -> None:
    # vLLM: 404 NotFoundError "The model `<name>` does not exist." (param "model").
    with pytest.raises(openai.NotFoundError):
        _complete(client, "no-such-model", PROMPTS[0])
    with pytest.raises(openai.NotFoundError):
        _chat(client, "no-such-model", PROMPTS[0])
    response = http.post(
        "/v1/completions", json={"model": "no-such-model", "prompt": "x", "max_tokens": 2}
    )
    assert response.status_code == 404
    assert "no-such-model" in _error(response)["message"]


# --- generation ------------------------------------------------------------------------


def test_greedy_completions_differ_by_adapter_and_repeat(
    engine: Engine, client: openai.OpenAI, adapters: list[Adapter], tokenizer: Any
) -> None:
    models = [engine.model, *(a.name for a in adapters)]
    texts: dict[str, str] = {}
    for model in models:
        first = _complete(client, model, PROMPTS[0])
        again = _complete(client, model, PROMPTS[0])
        assert first.object == "text_completion"
        assert first.model == model  # vLLM names the adapter, not the base
        assert len(first.choices) == 1
        assert first.choices[0].index == 0
        assert first.choices[0].text == again.choices[0].text, model
        texts[model] = first.choices[0].text
    for adapter in adapters:
        assert texts[adapter.name] != texts[engine.model], texts
    # vLLM decodes with skip_special_tokens=True by default.
    for text in texts.values():
        assert not any(special in text for special in _special_texts(tokenizer)), texts


def test_greedy_chat_differs_by_adapter_and_repeats(
    engine: Engine, client: openai.OpenAI, adapters: list[Adapter]
) -> None:
    texts: dict[str, str | None] = {}
    for model in [engine.model, *(a.name for a in adapters)]:
        first = _chat(client, model, PROMPTS[1])
        again = _chat(client, model, PROMPTS[1])
        assert first.object == "chat.completion"
        assert first.model == model
        message = first.choices[0].message
        assert message.role == "assistant"
        assert isinstance(message.content, str)
        assert message.content == again.choices[0].message.content, model
        texts[model] = message.content
    for adapter in adapters:
        assert texts[adapter.name] != texts[engine.model], texts


def test_usage_counts_prompt_and_completion_tokens(
    engine: Engine, client: openai.OpenAI, tokenizer: Any
) -> None:
    prompt = PROMPTS[3]
    completion = _complete(client, engine.model, prompt, max_tokens=7)
    assert completion.usage is not None
    # Completions: the prompt tokenized with add_special_tokens=True.
    assert completion.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    assert completion.usage.completion_tokens <= 7
    total = completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert completion.usage.total_tokens == total
    chat = _chat(client, engine.model, prompt, max_tokens=7)
    assert chat.usage is not None
    # Chat: the model's chat template with the generation prompt, then tokenized without
    # adding special tokens (the template writes them).
    text = tokenizer.apply_chat_template(
        _messages(prompt), add_generation_prompt=True, tokenize=False
    )
    expected = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert chat.usage.prompt_tokens == expected
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens


def test_max_tokens_stops_with_length(engine: Engine, client: openai.OpenAI) -> None:
    longer = _complete(client, engine.model, PROMPTS[0], max_tokens=16)
    assert longer.usage is not None
    assert longer.usage.completion_tokens > 5, "precondition: the model stopped early"
    short = _complete(client, engine.model, PROMPTS[0], max_tokens=5)
    assert short.choices[0].finish_reason == "length"
    assert short.usage is not None
    assert short.usage.completion_tokens == 5
    assert longer.choices[0].text.startswith(short.choices[0].text)


def test_max_tokens_beyond_the_context_is_400(
    engine: Engine, http: httpx.Client, client: openai.OpenAI
) -> None:
    # vLLM: 400 BadRequestError "This model's maximum context length is N tokens ...".
    with pytest.raises(openai.BadRequestError):
        _complete(client, engine.model, PROMPTS[0], max_tokens=10_000_000)
    with pytest.raises(openai.BadRequestError):
        _chat(client, engine.model, PROMPTS[0], max_tokens=10_000_000)
    response = http.post(
        "/v1/completions",
        json={"model": engine.model, "prompt": PROMPTS[0], "max_tokens": 10_000_000},
    )
    assert response.status_code == 400
    _error(response)


def _stop_candidate(text: str) -> tuple[str, int] | None:
    """A two-character printable stop string first found past the start of ``text``."""
    for at in range(1, len(text) - 1):
        stop = text[at : at + 2]
        printable = stop.isascii() and stop.isprintable() and stop.strip() == stop
        if printable and text.find(stop) == at and "\ufffd" not in text[: at + 2]:
            return stop, at
    return None


def test_stop_strings_end_generation_before_the_stop_text(
    engine: Engine, client: openai.OpenAI, adapters: list[Adapter]
) -> None:
    # A stop string taken from the greedy output itself, so it is sure to come up.
    candidates = (
        (model, prompt)
        for model in [engine.model, *(a.name for a in adapters)]
        for prompt in PROMPTS
    )
    for model, prompt in candidates:
        free = _complete(client, model, prompt, max_tokens=24).choices[0].text
        found = _stop_candidate(free)
        if found is not None:
            break
    else:
        pytest.fail("precondition: no greedy output has a usable stop string")
    stop, at = found
    stopped = _complete(client, model, prompt, max_tokens=24, stop=["@@never@@", stop])
    choice = stopped.choices[0]
    # vLLM: the text ends before the stop string (include_stop_str_in_output=False).
    assert choice.text == free[:at], (free, stop)
    assert choice.finish_reason == "stop"
    # vLLM also says which stop string matched (an extension to OpenAI's schema).
    if choice.model_extra and "stop_reason" in choice.model_extra:
        assert choice.model_extra["stop_reason"] == stop


def test_chat_stream_matches_the_greedy_answer(
    engine: Engine, client: openai.OpenAI, adapters: list[Adapter]
) -> None:
    for model in (engine.model, adapters[0].name):
        full = _chat(client, model, PROMPTS[0], max_tokens=16)
        chunks = list(
            client.chat.completions.create(
                model=model,
                messages=_messages(PROMPTS[0]),
                max_tokens=16,
                temperature=0.0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert {c.object for c in chunks} == {"chat.completion.chunk"}
        assert len({c.id for c in chunks}) == 1
        assert {c.model for c in chunks} == {model}
        with_choices = [c for c in chunks if c.choices]
        # vLLM's first chunk carries the role (and empty content).
        assert with_choices[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in with_choices)
        assert text == full.choices[0].message.content
        finishes = [c.choices[0].finish_reason for c in with_choices]
        assert finishes[-1] == full.choices[0].finish_reason
        assert finishes[-1] in ("stop", "length")
        assert all(f is None for f in finishes[:-1])
        # include_usage: one last chunk with no choices and the request's usage.
        usage_chunk = chunks[-1]
        assert usage_chunk.choices == []
        assert usage_chunk.usage is not None
        assert full.usage is not None
        assert usage_chunk.usage.prompt_tokens == full.usage.prompt_tokens
        assert usage_chunk.usage.completion_tokens == full.usage.completion_tokens


def test_completion_stream_matches_the_greedy_answer(
    engine: Engine, client: openai.OpenAI, adapters: list[Adapter]
) -> None:
    for model in (engine.model, adapters[1].name):
        full = _complete(client, model, PROMPTS[2], max_tokens=16)
        chunks = list(
            client.completions.create(
                model=model,
                prompt=PROMPTS[2],
                max_tokens=16,
                temperature=0.0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert {c.object for c in chunks} == {"text_completion"}
        with_choices = [c for c in chunks if c.choices]
        assert "".join(c.choices[0].text for c in with_choices) == full.choices[0].text
        finishes = [c.choices[0].finish_reason for c in with_choices]
        assert finishes[-1] == full.choices[0].finish_reason
        assert all(f is None for f in finishes[:-1])
        assert chunks[-1].choices == []
        assert chunks[-1].usage is not None
        assert full.usage is not None
        assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_stream_is_server_sent_events_ending_with_done(
    engine: Engine, http: httpx.Client, endpoint: str
) -> None:
    body: dict[str, Any] = {"model": engine.model, "max_tokens": 6, "temperature": 0.0}
    body["stream"] = True
    if endpoint == "/v1/completions":
        body["prompt"] = PROMPTS[0]
    else:
        body["messages"] = _messages(PROMPTS[0])
    with http.stream("POST", endpoint, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line.strip()]
    assert all(line.startswith("data: ") for line in lines), lines
    payloads = [line.removeprefix("data: ") for line in lines]
    assert payloads[-1].strip() == "[DONE]"
    assert "[DONE]" not in [p.strip() for p in payloads[:-1]]
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks
    assert chunks[-1]["choices"][-1]["finish_reason"] in ("stop", "length")


def test_n_samples_with_a_seed_repeat(engine: Engine, client: openai.OpenAI) -> None:
    def sample(seed: int) -> list[str]:
        completion = _complete(
            client, engine.model, PROMPTS[0], max_tokens=8, temperature=1.0, seed=seed, n=3
        )
        assert sorted(c.index for c in completion.choices) == [0, 1, 2]
        assert completion.usage is not None
        if all(c.finish_reason == "length" for c in completion.choices):
            assert completion.usage.completion_tokens == 3 * 8  # summed over the choices
        return [c.text for c in sorted(completion.choices, key=lambda c: c.index)]

    first = sample(1234)
    assert len(set(first)) > 1, first  # n independent samples, not one copied
    assert sample(1234) == first
    assert sample(4321) != first


def test_n_samples_are_seeded_per_choice_like_vllm(engine: Engine, client: openai.OpenAI) -> None:
    # vLLM's V1 engine splits n > 1 into n requests, the i-th seeded with seed + i
    # (v1/engine/parallel_sampling.py), so choice i equals a lone request with seed + i.
    both = _complete(client, engine.model, PROMPTS[0], max_tokens=8, temperature=1.0, seed=99, n=3)
    texts = [c.text for c in sorted(both.choices, key=lambda c: c.index)]
    for i in range(3):
        alone = _complete(
            client, engine.model, PROMPTS[0], max_tokens=8, temperature=1.0, seed=99 + i
        )
        assert alone.choices[0].text == texts[i], i


def test_json_schema_response_format(
    engine: Engine, client: openai.OpenAI, adapters: list[Adapter]
) -> None:
    # Sampled, not greedy: vLLM (xgrammar, default any_whitespace) lets whitespace run
    # between JSON tokens, and a random model under greedy decoding can repeat whitespace
    # until max_tokens. Sampling leaves it within ~100 tokens for these models.
    response_format: ResponseFormatJSONSchema = {
        "type": "json_schema",
        "json_schema": {"name": "allocation", "schema": ALLOCATION_SCHEMA},
    }
    for model in (engine.model, adapters[2].name):
        chat = _chat(
            client,
            model,
            "Which retailer should get more budget? Answer in JSON.",
            max_tokens=400,
            temperature=1.0,
            seed=5,
            response_format=response_format,
        )
        choice = chat.choices[0]
        assert choice.finish_reason == "stop", choice
        check_allocation(choice.message.content)


# --- concurrency -----------------------------------------------------------------------


async def _one(client: openai.AsyncOpenAI, model: str, prompt: str, chat: bool) -> tuple[Any, ...]:
    if chat:
        answer = await client.chat.completions.create(
            model=model, messages=_messages(prompt), max_tokens=16, temperature=0.0
        )
        assert answer.usage is not None
        choice = answer.choices[0]
        return (choice.message.content, choice.finish_reason, answer.usage.completion_tokens)
    completion = await client.completions.create(
        model=model, prompt=prompt, max_tokens=16, temperature=0.0
    )
    assert completion.usage is not None
    c = completion.choices[0]
    return (c.text, c.finish_reason, completion.usage.completion_tokens)


async def test_concurrent_requests_across_adapters_match_sequential(
    engine: Engine, adapters: list[Adapter]
) -> None:
    """Twelve greedy requests (base + 3 adapters, mixed prompts) at once, each equal to
    the same request made alone: mixed-adapter batching is correct per row."""
    models = [engine.model, *(a.name for a in adapters)]
    jobs = [(models[i % 4], PROMPTS[(i // 4 + i) % len(PROMPTS)], i % 2 == 1) for i in range(12)]
    async with _async_client(engine) as client:
        alone = [await _one(client, *job) for job in jobs]
        together = await asyncio.gather(*(_one(client, *job) for job in jobs))
    for job, expected, got in zip(jobs, alone, together, strict=True):
        assert got == expected, job


async def _stream_text(stream: Any, first: Any) -> tuple[str, str | None]:
    chunks = [first, *[chunk async for chunk in stream]]
    choices = [c.choices[0] for c in chunks if c.choices]
    return "".join(c.text for c in choices), choices[-1].finish_reason


async def test_loading_an_adapter_while_streaming_fails_no_stream(
    engine: Engine, http: httpx.Client, adapters: list[Adapter], spare: Adapter
) -> None:
    models = [engine.model, *(a.name for a in adapters)]
    name = f"{spare.name}-midstream"
    async with (
        _async_client(engine) as client,
        httpx.AsyncClient(base_url=engine.url, timeout=TIMEOUT_S) as ahttp,
    ):
        expected = []
        for i, model in enumerate(models):
            done = await client.completions.create(
                model=model, prompt=PROMPTS[i], max_tokens=48, temperature=0.0
            )
            expected.append((done.choices[0].text, done.choices[0].finish_reason))
        streams = [
            await client.completions.create(
                model=model, prompt=PROMPTS[i], max_tokens=48, temperature=0.0, stream=True
            )
            for i, model in enumerate(models)
        ]
        iterators = [aiter(s) for s in streams]
        firsts = [await anext(it) for it in iterators]  # every stream is under way
        body = {"lora_name": name, "lora_path": str(spare.path)}
        try:
            loaded = await ahttp.post("/v1/load_lora_adapter", json=body)
            results = await asyncio.gather(
                *(_stream_text(it, first) for it, first in zip(iterators, firsts, strict=True))
            )
            assert loaded.status_code == 200, loaded.text
            assert results == expected
            fresh = await client.completions.create(
                model=name, prompt=PROMPTS[0], max_tokens=4, temperature=0.0
            )
            assert fresh.model == name
        finally:
            await ahttp.post("/v1/unload_lora_adapter", json={"lora_name": name})
