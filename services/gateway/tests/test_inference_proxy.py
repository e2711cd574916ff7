"""The OpenAI-compatible API through the gateway, driven by the official `openai` client.

The gateway runs over real HTTP in front of the real feedback service (API keys, roles,
rate limits). The inference service is stood in for by a small HTTP receiver speaking its
OpenAI API (fixed answers, scripted event streams) that records every request, so the
tests see exactly what the gateway forwards: the caller's tenant in `X-Flywheel-Tenant`,
no client-sent tenant, no API key, the body byte for byte. The path through a real
inference service is covered by the end-to-end tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from openai.types.chat import ChatCompletionMessageParam
from pydantic import BaseModel

from flywheel.core.testing.local_infra import free_port
from flywheel.gateway.config import GatewaySettings
from flywheel.gateway.http_api import create_app
from flywheel.gateway.ratelimit import TokenBuckets
from flywheel.gateway.state import inference_client

MakeTenant = Callable[..., Awaitable[Any]]

TENANT_HEADER = "x-flywheel-tenant"
GENERATION_IDS = ["gen-0001", "gen-0002"]
SERVED_BY = {
    "base_model": "tiny-llama",
    "adapter": {"name": "acme-budgeting", "version": "v2"},
    "components": [],
    "alias": "acme/budgeting",
    "traffic_arm": "candidate",
    "replica": "inference-0",
}
FLYWHEEL_HEADERS = {
    "X-Flywheel-Generation-Ids": ",".join(GENERATION_IDS[:1]),
    "X-Flywheel-Adapter": "acme-budgeting@v2",
    "X-Flywheel-Alias": "acme/budgeting",
    "X-Flywheel-Traffic-Arm": "candidate",
}
MODELS = {
    "object": "list",
    "data": [
        {"id": "tiny-llama", "object": "model", "created": 1, "owned_by": "flywheel",
         "root": "tiny-llama", "parent": None},
        {"id": "acme-budgeting@v2", "object": "model", "created": 1, "owned_by": "flywheel",
         "root": "acme-budgeting@v2", "parent": "tiny-llama"},
    ],
}  # fmt: skip
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Split 1000 EUR across retailers A and B."}
]
PIECES = ["A: 600", ", B: 400"]


def _envelope(message: str, kind: str, status: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _chunk(chat: bool, model: str, text: str, finish: str | None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "generation_id": "gen-0001"}
    if chat:
        choice["delta"] = {"role": "assistant", "content": text}
    else:
        choice |= {"text": text, "logprobs": None}
    return {
        "id": "chatcmpl-1" if chat else "cmpl-1",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": 1,
        "model": model,
        "choices": [choice],
        "served_by": SERVED_BY,
    }


def _event(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


def sse_events(chat: bool, body: dict[str, Any]) -> list[bytes]:
    """The event stream the receiver answers ``stream: true`` with."""
    model = body["model"]
    events = [
        _event(_chunk(chat, model, text, "stop" if i == len(PIECES) - 1 else None))
        for i, text in enumerate(PIECES)
    ]
    if (body.get("stream_options") or {}).get("include_usage"):
        usage = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
        last = _chunk(chat, model, "", None) | {"choices": [], "usage": usage}
        events.append(_event(last))
    return [*events, _event("[DONE]")]


def completion(chat: bool, body: dict[str, Any]) -> dict[str, Any]:
    """The receiver's answer to a completion that does not stream."""
    text = "".join(PIECES)
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "generation_id": "gen-0001"}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice |= {"text": text, "logprobs": None}
    return {
        "id": "chatcmpl-1" if chat else "cmpl-1",
        "object": "chat.completion" if chat else "text_completion",
        "created": 1,
        "model": body["model"],
        "choices": [choice],
        "usage": {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16},
        "served_by": SERVED_BY,
    }


@dataclass
class Seen:
    """One request the receiver got."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """Stands in for the inference service's OpenAI API; records what reaches it.

    ``model`` picks the answer: ``missing@v1`` 404, ``bad`` 400, ``crash`` a 500 page
    that is not JSON, ``stall`` nothing until ``release``; streamed, ``slow`` and
    ``stall`` wait for ``release`` after their first event,
    ``endless`` never ends (``closed`` is set once the gateway hangs up), ``broken``
    breaks off after its first event.
    """

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.release = asyncio.Event()
        self.closed = asyncio.Event()
        self.app = FastAPI()
        self.app.add_api_route("/v1/models", self.models, methods=["GET"])
        self.app.add_api_route("/v1/chat/completions", self.complete, methods=["POST"])
        self.app.add_api_route("/v1/completions", self.complete, methods=["POST"])

    async def _record(self, request: Request) -> Seen:
        seen = Seen(
            request.method,
            request.url.path,
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw],
            await request.body(),
        )
        self.seen.append(seen)
        return seen

    async def models(self, request: Request) -> Response:
        await self._record(request)
        return JSONResponse(MODELS)

    async def complete(self, request: Request) -> Response:
        seen = await self._record(request)
        body = seen.json()
        chat = seen.path.endswith("/chat/completions")
        model = body["model"]
        if model == "missing@v1":
            return JSONResponse(
                _envelope("adapter missing@v1 not found", "NotFoundError", 404), status_code=404
            )
        if model == "bad":
            message = "temperature: must be at most 2"
            return JSONResponse(
                _envelope(message, "BadRequestError", 400, "temperature"), status_code=400
            )
        if model == "crash":
            return PlainTextResponse("Internal Server Error", status_code=500)
        if model == "stall" and not body.get("stream"):
            await self.release.wait()
        if not body.get("stream"):
            return JSONResponse(completion(chat, body), headers=FLYWHEEL_HEADERS)
        events = sse_events(chat, body)
        scripts = {
            "slow": self._slow,
            "stall": self._slow,
            "endless": self._endless,
            "broken": self._broken,
        }
        stream = scripts.get(model, self._plain)(events)
        return StreamingResponse(stream, media_type="text/event-stream", headers=FLYWHEEL_HEADERS)

    async def _plain(self, events: list[bytes]) -> AsyncIterator[bytes]:
        for event in events:
            yield event

    async def _slow(self, events: list[bytes]) -> AsyncIterator[bytes]:
        yield events[0]
        await self.release.wait()
        for event in events[1:]:
            yield event

    async def _endless(self, events: list[bytes]) -> AsyncIterator[bytes]:
        try:
            while True:
                yield events[0]
                await asyncio.sleep(0.02)
        finally:
            self.closed.set()

    async def _broken(self, events: list[bytes]) -> AsyncIterator[bytes]:
        yield events[0]
        raise RuntimeError("the engine went away")


class _Uvicorn(uvicorn.Server):
    """uvicorn in the test's loop, leaving the signal handlers alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serving_http(app: Any) -> AsyncIterator[tuple[str, _Uvicorn, asyncio.Task[None]]]:
    """``app`` (already started) over real HTTP on a free loopback port."""
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        lifespan="off",
        log_config=None,
        # A test that failed may leave a stream open: do not wait for it forever.
        timeout_graceful_shutdown=5,
    )
    server = _Uvicorn(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", server, task
    finally:
        server.should_exit = True
        await task


@dataclass
class Inference:
    """The running receiver, and a way to take it down."""

    receiver: Receiver
    url: str
    _server: _Uvicorn
    _task: asyncio.Task[None]

    async def stop(self) -> None:
        self._server.should_exit = True
        await self._task


@pytest.fixture
async def inference() -> AsyncIterator[Inference]:
    receiver = Receiver()
    async with serving_http(receiver.app) as (url, server, task):
        yield Inference(receiver, url, server, task)
        receiver.release.set()  # a slow stream still held back ends now


@pytest.fixture
def gateway_settings(gateway_settings: GatewaySettings, inference: Inference) -> GatewaySettings:
    gateway_settings.inference_url = inference.url
    return gateway_settings


@pytest.fixture
async def gateway_url(gateway: Any) -> AsyncIterator[str]:
    """The gateway app (already started) over real HTTP."""
    async with serving_http(gateway.app) as (url, _, _):
        yield url


class Clients:
    """Official clients of the gateway for API keys, closed after the test."""

    def __init__(self, gateway_url: str) -> None:
        self.base_url = f"{gateway_url}/v1"
        self.made: list[openai.OpenAI | openai.AsyncOpenAI] = []

    def sync(self, key: str) -> openai.OpenAI:
        # No retries: each test sees the gateway's first answer.
        client = openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=30)
        self.made.append(client)
        return client

    def async_(self, key: str) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=30)
        self.made.append(client)
        return client


@pytest.fixture
async def clients(gateway_url: str) -> AsyncIterator[Clients]:
    made = Clients(gateway_url)
    yield made
    for client in made.made:
        if isinstance(client, openai.AsyncOpenAI):
            await client.close()
        else:
            client.close()


def extra(model: BaseModel) -> dict[str, Any]:
    """What a response object holds beyond OpenAI's fields (Flywheel's additions)."""
    assert model.model_extra is not None
    return model.model_extra


def assert_forwarded_for(seen: Seen, tenant_id: str) -> None:
    """The gateway named the caller's tenant, once, and kept the API key to itself."""
    assert seen.header(TENANT_HEADER) == [tenant_id]
    assert seen.header("authorization") == []
    assert seen.header("x-api-key") == []


# --- the official client ------------------------------------------------------------------


async def test_models_list_with_the_official_client(
    clients: Clients, inference: Inference, make_tenant: MakeTenant
) -> None:
    acme = await make_tenant("acme")
    client = clients.sync(acme.integrator)
    page = await asyncio.to_thread(client.models.list)
    assert [m.id for m in page.data] == ["tiny-llama", "acme-budgeting@v2"]
    assert extra(page.data[1]) == {"root": "acme-budgeting@v2", "parent": "tiny-llama"}
    [seen] = inference.receiver.seen
    assert (seen.method, seen.path, seen.body) == ("GET", "/v1/models", b"")
    assert_forwarded_for(seen, acme.tenant_id)


async def test_chat_completion_is_forwarded_under_the_callers_tenant(
    clients: Clients, inference: Inference, make_tenant: MakeTenant
) -> None:
    acme = await make_tenant("acme")
    # A service key, sent as the client sends it: Authorization: Bearer <key>.
    client = clients.sync(acme.service)

    def create() -> Any:
        return client.chat.completions.with_raw_response.create(
            model="acme/budgeting",
            messages=MESSAGES,
            temperature=0.2,
            max_completion_tokens=32,
            user="shopper-7",
            response_format={"type": "json_object"},
            # A client naming a tenant is not believed: the gateway sets the header.
            extra_headers={"X-Flywheel-Tenant": "someone-else"},
            extra_body={"task": "budgeting", "metadata": {"page": "checkout"}, "top_k": 5},
        )

    raw = await asyncio.to_thread(create)
    assert raw.status_code == 200
    for name, value in FLYWHEEL_HEADERS.items():
        assert raw.headers[name] == value
    answer = raw.parse()
    assert answer.choices[0].message.content == "A: 600, B: 400"
    assert extra(answer.choices[0])["generation_id"] == "gen-0001"
    assert extra(answer)["served_by"] == SERVED_BY
    assert answer.usage is not None
    assert answer.usage.total_tokens == 16

    [seen] = inference.receiver.seen
    assert (seen.method, seen.path) == ("POST", "/v1/chat/completions")
    assert_forwarded_for(seen, acme.tenant_id)
    assert seen.json() == {
        "model": "acme/budgeting",
        "messages": MESSAGES,
        "temperature": 0.2,
        "max_completion_tokens": 32,
        "user": "shopper-7",
        "response_format": {"type": "json_object"},
        "task": "budgeting",
        "metadata": {"page": "checkout"},
        "top_k": 5,
    }


async def test_body_is_forwarded_byte_for_byte(
    gateway: Any, gateway_url: str, inference: Inference, make_tenant: MakeTenant
) -> None:
    acme = await make_tenant("acme")
    # Odd spacing, key order and escapes that a re-serialisation would change.
    body = b'{ "prompt":"Budget: \\u00e9t\\u00e9",\n  "model" : "tiny-llama", "n":1 , "seed": 7}'
    async with httpx.AsyncClient(base_url=gateway_url) as client:
        response = await client.post(
            "/v1/completions",
            content=body,
            headers={
                "Content-Type": "application/json",
                "X-API-Key": acme.integrator,
                "X-Flywheel-Tenant": "someone-else",
            },
        )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == "A: 600, B: 400"
    [seen] = inference.receiver.seen
    assert seen.path == "/v1/completions"
    assert seen.body == body
    assert seen.header("content-type") == ["application/json"]
    assert_forwarded_for(seen, acme.tenant_id)


async def test_text_completion_with_the_official_client(
    clients: Clients, inference: Inference, make_tenant: MakeTenant
) -> None:
    acme = await make_tenant("acme")
    client = clients.async_(acme.integrator)
    answer = await client.completions.create(
        model="acme-budgeting@v2", prompt="Split 1000 EUR:", max_tokens=16, seed=3
    )
    assert answer.choices[0].text == "A: 600, B: 400"
    assert extra(answer.choices[0])["generation_id"] == "gen-0001"
    [seen] = inference.receiver.seen
    assert seen.json() == {
        "model": "acme-budgeting@v2",
        "prompt": "Split 1000 EUR:",
        "max_tokens": 16,
        "seed": 3,
    }
    assert_forwarded_for(seen, acme.tenant_id)


# --- streams ------------------------------------------------------------------------------


async def test_streamed_chat_with_the_official_client(
    clients: Clients, inference: Inference, make_tenant: MakeTenant
) -> None:
    acme = await make_tenant("acme")
    client = clients.async_(acme.integrator)
    raw = await client.chat.completions.with_raw_response.create(
        model="acme/budgeting",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.headers["X-Flywheel-Generation-Ids"] == "gen-0001"
    assert raw.headers["X-Flywheel-Traffic-Arm"] == "candidate"
    chunks = [chunk async for chunk in raw.parse()]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "A: 600, B: 400"
    assert all(extra(c)["served_by"] == SERVED_BY for c in chunks)
    assert {extra(c.choices[0])["generation_id"] for c in chunks if c.choices} == {"gen-0001"}
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 11
    [seen] = inference.receiver.seen
    assert seen.json()["stream_options"] == {"include_usage": True}
    assert_forwarded_for(seen, acme.tenant_id)


async def test_streamed_completion_with_the_sync_client(
    clients: Clients, make_tenant: MakeTenant
) -> None:
    acme = await make_tenant("acme")
    client = clients.sync(acme.service)

    def stream() -> list[Any]:
        with client.completions.create(model="tiny-llama", prompt="Hi", stream=True) as events:
            return list(events)

    chunks = await asyncio.to_thread(stream)
    assert "".join(c.choices[0].text for c in chunks) == "A: 600, B: 400"
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_event_stream_bytes_are_relayed_unchanged(
    gateway: Any, gateway_url: str, make_tenant: MakeTenant
) -> None:
    acme = await make_tenant("acme")
    body = {"model": "tiny-llama", "messages": MESSAGES, "stream": True}
    async with (
        httpx.AsyncClient(base_url=gateway_url) as client,
        client.stream(
            "POST", "/v1/chat/completions", json=body, headers=gateway.auth(acme.integrator)
        ) as response,
    ):
        assert response.status_code == 200
        relayed = b"".join([chunk async for chunk in response.aiter_bytes()])
    assert relayed == b"".join(sse_events(True, body))


async def test_events_arrive_as_they_are_generated(
    clients: Clients, inference: Inference, make_tenant: MakeTenant
) -> None:
    acme = await make_tenant("acme")
    client = clients.async_(acme.integrator)
    # The response starts (headers, first event) before the rest is generated.
    stream = await asyncio.wait_for(
        client.chat.completions.create(
            model="slow",
            messages=MESSAGES,
            stream=True,
        ),
        timeout=10,
    )
    chunks = aiter(stream)
    # The receiver holds the rest back until released: the first chunk came through alone.
    first = await asyncio.wait_for(anext(chunks), timeout=10)
    assert first.choices[0].delta.content == "A: 600"
    inference.receiver.release.set()
    rest = [chunk async for chunk in chunks]
    assert [c.choices[0].delta.content for c in rest] == [", B: 400"]


async def test_client_going_away_closes_the_call_to_inference(
    clients: Clients, inference: Inference, make_tenant: MakeTenant
) -> None:
    acme = await make_tenant("acme")
    client = clients.async_(acme.integrator)
    stream = await client.chat.completions.create(
        model="endless",
        messages=MESSAGES,
        stream=True,
    )
    chunks = aiter(stream)
    for _ in range(3):
        await asyncio.wait_for(anext(chunks), timeout=10)
    assert not inference.receiver.closed.is_set()
    await stream.close()
    await client.close()
    await asyncio.wait_for(inference.receiver.closed.wait(), timeout=10)


async def test_stream_broken_off_ends_with_an_error_event(
    clients: Clients, make_tenant: MakeTenant
) -> None:
    acme = await make_tenant("acme")
    client = clients.async_(acme.integrator)
    stream = await client.chat.completions.create(
        model="broken",
        messages=MESSAGES,
        stream=True,
    )
    chunks = aiter(stream)
    first = await asyncio.wait_for(anext(chunks), timeout=10)
    assert first.choices[0].delta.content == "A: 600"
    with pytest.raises(openai.APIError) as caught:
        await asyncio.wait_for(anext(chunks), timeout=10)
    assert caught.value.body == {
        "message": "The inference service broke off its answer.",
        "type": "ServiceUnavailableError",
        "param": None,
        "code": 502,
    }


# --- errors, in OpenAI's envelope -----------------------------------------------------------


async def test_bad_key_is_an_authentication_error(
    gateway: Any, gateway_url: str, clients: Clients, inference: Inference
) -> None:
    client = clients.sync("fw_not-a-key")
    with pytest.raises(openai.AuthenticationError) as caught:
        await asyncio.to_thread(
            client.chat.completions.create,
            model="tiny-llama",
            messages=MESSAGES,
        )
    assert caught.value.status_code == 401
    assert caught.value.body == {
        "message": "The API key is unknown, revoked or expired.",
        "type": "AuthenticationError",
        "param": None,
        "code": 401,
    }
    assert caught.value.response.headers["www-authenticate"] == 'Bearer realm="flywheel"'
    with pytest.raises(openai.AuthenticationError):
        await asyncio.to_thread(clients.sync("fw_not-a-key").models.list)

    async with httpx.AsyncClient(base_url=gateway_url) as http:
        missing = await http.get("/v1/models")
        wrong_scheme = await http.get("/v1/models", headers={"Authorization": "Basic eDp5"})
        # The rest of /v1 still answers problem+json.
        elsewhere = await http.get("/v1/generations")
    for response in (missing, wrong_scheme):
        assert response.status_code == 401
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"]["type"] == "AuthenticationError"
    assert elsewhere.status_code == 401
    assert elsewhere.headers["content-type"] == "application/problem+json"
    assert inference.receiver.seen == []


async def test_rater_keys_may_not_call_the_models(
    clients: Clients, inference: Inference, make_tenant: MakeTenant
) -> None:
    acme = await make_tenant("acme")
    client = clients.sync(acme.rater)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await asyncio.to_thread(client.models.list)
    assert caught.value.body["type"] == "PermissionDeniedError"  # type: ignore[index]
    assert "rater" in caught.value.message
    assert inference.receiver.seen == []


async def test_inference_errors_pass_through(
    clients: Clients, inference: Inference, make_tenant: MakeTenant
) -> None:
    acme = await make_tenant("acme")
    client = clients.async_(acme.integrator)
    with pytest.raises(openai.NotFoundError) as not_found:
        await client.chat.completions.create(
            model="missing@v1",
            messages=MESSAGES,
        )
    assert not_found.value.body == {
        "message": "adapter missing@v1 not found",
        "type": "NotFoundError",
        "param": None,
        "code": 404,
    }
    with pytest.raises(openai.BadRequestError) as bad:
        await client.completions.create(model="bad", prompt="x", temperature=3)
    assert bad.value.body["param"] == "temperature"  # type: ignore[index]
    # An answer that is not the service's own error (a crash page) keeps its status, in
    # OpenAI's envelope.
    with pytest.raises(openai.InternalServerError) as crash:
        await client.completions.create(model="crash", prompt="x")
    assert crash.value.status_code == 500
    assert crash.value.body == {
        "message": "The inference service failed (HTTP 500).",
        "type": "InternalServerError",
        "param": None,
        "code": 500,
    }
    assert len(inference.receiver.seen) == 3


async def test_invalid_bodies_are_bad_requests(
    gateway: Any, gateway_url: str, inference: Inference, make_tenant: MakeTenant
) -> None:
    acme = await make_tenant("acme")
    headers = gateway.auth(acme.integrator)
    async with httpx.AsyncClient(base_url=gateway_url, headers=headers) as client:
        not_json = await client.post(
            "/v1/chat/completions", content=b"{", headers={"Content-Type": "application/json"}
        )
        nul = await client.post(
            "/v1/chat/completions",
            json={"model": "tiny-llama", "messages": [{"role": "user", "content": "a\x00b"}]},
        )
        form = await client.post("/v1/completions", data={"model": "tiny-llama"})
    assert not_json.status_code == 400
    assert not_json.json()["error"]["type"] == "BadRequestError"
    assert nul.status_code == 400
    assert nul.json()["error"]["param"] == "messages.0.content"
    assert form.status_code == 415
    assert form.json()["error"]["code"] == 415
    assert inference.receiver.seen == []


async def test_rate_limit_is_a_rate_limit_error(
    gateway: Any, clients: Clients, inference: Inference, make_tenant: MakeTenant
) -> None:
    acme = await make_tenant("acme")
    gateway.state.limits = TokenBuckets(rate=0.5, burst=2)
    client = clients.sync(acme.integrator)
    for _ in range(2):
        await asyncio.to_thread(client.models.list)
    with pytest.raises(openai.RateLimitError) as caught:
        await asyncio.to_thread(client.models.list)
    assert caught.value.response.headers["retry-after"] == "2"
    assert caught.value.body["type"] == "RateLimitError"  # type: ignore[index]
    assert len(inference.receiver.seen) == 2


async def test_inference_down_is_a_503(
    clients: Clients, inference: Inference, make_tenant: MakeTenant
) -> None:
    acme = await make_tenant("acme")
    client = clients.async_(acme.integrator)
    assert len((await client.models.list()).data) == 2  # a pooled connection, too
    await inference.stop()
    for call in (
        client.models.list(),
        client.chat.completions.create(
            model="tiny-llama",
            messages=MESSAGES,
            stream=True,
        ),
    ):
        with pytest.raises(openai.APIStatusError) as caught:
            await call
        assert caught.value.status_code == 503
        assert caught.value.response.headers["retry-after"] == "1"
        assert caught.value.body == {
            "message": "The inference service is unavailable; try again.",
            "type": "ServiceUnavailableError",
            "param": None,
            "code": 503,
        }


async def test_inference_too_slow_is_a_504(
    gateway: Any, clients: Clients, make_tenant: MakeTenant
) -> None:
    acme = await make_tenant("acme")
    state = gateway.state
    state.settings.inference_timeout_s = 0.5  # this test's settings, as if configured so
    await state.inference_http.aclose()
    state.inference_http = inference_client(state.settings)
    client = clients.async_(acme.integrator)
    with pytest.raises(openai.APIStatusError) as caught:
        await client.completions.create(model="stall", prompt="x")
    assert caught.value.status_code == 504
    assert caught.value.body == {
        "message": "The inference service did not answer within 0.5 s.",
        "type": "ServiceUnavailableError",
        "param": None,
        "code": 504,
    }
    # A stream that stalls once started ends with an error event.
    stream = await client.completions.create(model="stall", prompt="x", stream=True)
    chunks = aiter(stream)
    assert (await anext(chunks)).choices[0].text == "A: 600"
    with pytest.raises(openai.APIError) as stalled:
        await anext(chunks)
    assert stalled.value.body["code"] == 504  # type: ignore[index]


async def test_inference_client_is_shared_and_closed_on_shutdown(
    gateway: Any, gateway_settings: GatewaySettings, tmp_path: Any
) -> None:
    assert str(gateway.state.inference_http.base_url).rstrip("/") == gateway_settings.inference_url
    settings = gateway_settings.model_copy(update={"data_dir": tmp_path / "second"})
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        client = app.state.gateway.inference_http
        assert not client.is_closed
    assert client.is_closed


def test_inference_url_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert GatewaySettings().inference_url == "http://127.0.0.1:8105"
    monkeypatch.setenv("FLYWHEEL_INFERENCE_URL", "http://inference.internal:9000")
    assert GatewaySettings().inference_url == "http://inference.internal:9000"
    monkeypatch.setenv("FLYWHEEL_INFERENCE_URL", "inference:9000")
    with pytest.raises(ValueError, match="inference_url"):
        GatewaySettings()
