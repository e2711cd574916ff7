"""The official OpenAI client against a real inference service (`flywheel up`, embedded).

One stack for the module: every service as its own process on the embedded default, the
inference service in front of Flywheel's CPU engine serving the tiny base model. Three
random LoRA adapters are published the trainer's way (files and manifest.json into the
stack's artifact store) and announced by ``adapter.published`` on the embedded event log,
which the inference service consumes like any other; the tests then talk to it only
through ``openai.OpenAI`` (and the feedback service's gRPC API, where the generation log
must land).

Aliases are set through the inference gRPC API when it answers, else (while that API is
not wired) written straight into the service's database with its own `AliasStore`, which
the service reads on every request.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import openai
import pytest
from openai.types.chat import ChatCompletion
from openai.types.shared_params import ResponseFormatJSONSchema

from flywheel.contracts.common.v1.common_pb2 import AdapterRef, WeightedAdapter
from flywheel.contracts.feedback.v1 import resources_pb2 as fb
from flywheel.contracts.feedback.v1 import service_pb2 as fbapi
from flywheel.contracts.feedback.v1.service_pb2_grpc import FeedbackServiceStub
from flywheel.contracts.inference.v1 import resources_pb2 as ri
from flywheel.contracts.inference.v1 import service_pb2 as infapi
from flywheel.contracts.inference.v1.service_pb2_grpc import InferenceServiceStub
from flywheel.contracts.trainer.v1 import resources_pb2 as tr
from flywheel.core.artifacts import LocalArtifactStore
from flywheel.core.config import ServiceSettings
from flywheel.core.db import create_engine, session_factory
from flywheel.core.events.factory import create_bus
from flywheel.core.testing.stack import Stack, running_stack
from flywheel.inference.aliases import AliasStore
from flywheel.inference.routing import Arm, WeightedRef
from flywheel.inference.testing import (
    ALLOCATION_SCHEMA,
    check_allocation,
    publish_adapter,
    published_record,
    random_lora_adapter,
)

TENANT = "openai-client"
OTHER_TENANT = "someone-else"
ADAPTERS = ("alpha-lora", "beta-lora", "gamma-lora")
VERSION = "v1"
RANK, ALPHA = 8, 16
TIMEOUT_S = 120.0
PROMPT = "Split a $5,000 monthly budget across Amazon Ads and Walmart Connect."

T = TypeVar("T")


# --- helpers (publishing adapters the trainer's way, aliases, polling) ------------------


def wait_for(what: str, seconds: float, probe: Callable[[], T | None], every: float = 0.2) -> T:
    """Poll ``probe`` until it returns something other than None; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds:.0f}s waiting for {what}")
        time.sleep(every)


async def announce(data_dir: Path, manifests: Sequence[tr.AdapterManifest]) -> None:
    """Publish the events on the stack's bus: the embedded log in its data folder."""
    bus = create_bus(ServiceSettings(data_dir=data_dir, event_bus="embedded", event_log_url=None))
    try:
        await bus.publish([published_record(m) for m in manifests])
    finally:
        await bus.close()


def create_tenant(feedback: str, tenant: str) -> None:
    """The tenant must exist in the feedback service before generations are logged."""
    with grpc.insecure_channel(feedback) as channel:
        FeedbackServiceStub(channel).CreateTenant(
            fbapi.CreateTenantRequest(tenant_id=tenant, display_name=tenant), timeout=30
        )


def _arm_proto(arm: Arm) -> ri.TrafficArm:
    return ri.TrafficArm(
        label=arm.label,
        weight=arm.weight,
        adapters=[
            WeightedAdapter(adapter=AdapterRef(name=r.name, version=r.version), weight=r.weight)
            for r in arm.adapters
        ],
    )


async def _with_alias_store(data_dir: Path, work: Callable[[AliasStore], Any]) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{(data_dir / 'inference.sqlite3').resolve()}")
    try:
        await work(AliasStore(session_factory(engine)))
    finally:
        await engine.dispose()


def set_split(stack: Stack, tenant: str, alias: str, arms: Sequence[Arm], sticky: bool) -> str:
    """Make ``alias`` route to ``arms``: by the gRPC API if the service serves it, else
    in the service's database. Returns which way it went."""
    with grpc.insecure_channel(stack.grpc("inference")) as channel:
        try:
            InferenceServiceStub(channel).SetSplit(
                infapi.SetSplitRequest(
                    tenant_id=tenant, alias=alias, arms=[_arm_proto(a) for a in arms],
                    sticky=sticky,
                ),
                timeout=30,
            )  # fmt: skip
            return "grpc"
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise

    async def work(store: AliasStore) -> None:
        await store.set_split(tenant, alias, arms, sticky=sticky)

    asyncio.run(_with_alias_store(stack.data_dir, work))
    return "database"


def extra(obj: Any, key: str) -> Any:
    """A field the OpenAI types do not declare (``served_by``, ``generation_id``)."""
    extras = obj.model_extra or {}
    assert key in extras, f"no {key!r} in {obj!r}"
    return extras[key]


def adapter_of(completion: Any) -> tuple[str, str] | None:
    adapter = extra(completion, "served_by")["adapter"]
    return None if adapter is None else (adapter["name"], adapter["version"])


# --- the stack ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    stack: Stack
    base_model: str
    url: str  # the inference service's OpenAI base URL

    def client(self, tenant: str = TENANT) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.url, api_key="unused", max_retries=0, timeout=TIMEOUT_S,
            default_headers={"X-Flywheel-Tenant": tenant},
        )  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("openai-client")
    with running_stack(root) as stack:
        base_model = stack.env["FLYWHEEL_INFERENCE_BASE_MODEL"]
        url = f"http://127.0.0.1:{stack.services['inference']['http_port']}/v1"
        create_tenant(stack.grpc("feedback"), TENANT)
        store = LocalArtifactStore(stack.data_dir / "artifacts")
        manifests = []
        for seed, name in enumerate(ADAPTERS, start=1):
            folder = random_lora_adapter(
                Path(base_model), root / "adapters" / name, rank=RANK, alpha=ALPHA, seed=seed
            )
            manifests.append(
                publish_adapter(
                    store,
                    folder,
                    tenant=TENANT,
                    name=name,
                    version=VERSION,
                    base_model=base_model,
                    rank=RANK,
                    alpha=ALPHA,
                )
            )
        asyncio.run(announce(stack.data_dir, manifests))
        result = Served(stack, base_model, url)
        wanted = {f"{name}@{VERSION}" for name in ADAPTERS}
        with result.client() as client:

            def routable() -> bool | None:
                listed = {m.id for m in client.models.list()}
                return True if wanted <= listed else None

            wait_for(f"{sorted(wanted)} in /v1/models", 120, routable, every=0.5)
        yield result


@pytest.fixture
def client(served: Served) -> Iterator[openai.OpenAI]:
    with served.client() as c:
        yield c


def greedy(client: openai.OpenAI, model: str, **kwargs: Any) -> ChatCompletion:
    completion: ChatCompletion = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=12,
        temperature=0.0,
        **kwargs,
    )
    return completion


# --- the tests ----------------------------------------------------------------------------


def test_models_lists_the_base_and_the_published_adapters(
    served: Served, client: openai.OpenAI
) -> None:
    cards = {m.id: m for m in client.models.list()}
    assert served.base_model in cards
    for name in ADAPTERS:
        card = cards[f"{name}@{VERSION}"]
        assert (card.model_extra or {}).get("parent") == served.base_model
    # Another tenant sees none of them.
    with served.client(OTHER_TENANT) as other:
        assert {m.id for m in other.models.list()} == {served.base_model}


def test_chat_completion_on_the_base_model(served: Served, client: openai.OpenAI) -> None:
    completion = greedy(client, served.base_model)
    assert completion.model == served.base_model
    (choice,) = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    uuid.UUID(extra(choice, "generation_id"))
    served_by = extra(completion, "served_by")
    assert served_by["base_model"] == served.base_model
    assert served_by["adapter"] is None
    assert served_by["alias"] is None
    assert completion.usage is not None
    assert completion.usage.completion_tokens > 0


def test_adapter_version_selects_the_adapter(served: Served, client: openai.OpenAI) -> None:
    base_text = greedy(client, served.base_model).choices[0].message.content
    texts = {}
    for name in ADAPTERS:
        completion = greedy(client, f"{name}@{VERSION}")
        assert completion.model == f"{name}@{VERSION}"
        assert adapter_of(completion) == (name, VERSION)
        assert extra(completion, "served_by")["base_model"] == served.base_model
        texts[name] = completion.choices[0].message.content
        assert texts[name] != base_text, f"{name} answers like the base model: {base_text!r}"
    assert len(set(texts.values())) == len(ADAPTERS), texts
    # Greedy is deterministic: the same adapter again gives the same text.
    again = greedy(client, f"{ADAPTERS[0]}@{VERSION}")
    assert again.choices[0].message.content == texts[ADAPTERS[0]]


def test_streamed_deltas_add_up_to_the_greedy_answer(client: openai.OpenAI) -> None:
    model = f"{ADAPTERS[1]}@{VERSION}"
    whole = greedy(client, model).choices[0].message.content
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=12,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, ids, finish = "", set(), None
    chunks = 0
    for chunk in stream:
        chunks += 1
        assert adapter_of(chunk) == (ADAPTERS[1], VERSION)
        for choice in chunk.choices:
            ids.add(extra(choice, "generation_id"))
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert chunks > 1, "not streamed"
    assert text == whole
    assert finish in ("stop", "length")
    assert len(ids) == 1, f"every chunk of the one choice carries its generation id: {ids}"
    uuid.UUID(ids.pop())


def test_n_choices_with_a_seed(client: openai.OpenAI) -> None:
    def sample() -> ChatCompletion:
        return client.chat.completions.create(
            model=f"{ADAPTERS[2]}@{VERSION}",
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=10,
            temperature=1.0,
            seed=1234,
            n=3,
        )

    first, second = sample(), sample()
    assert sorted(c.index for c in first.choices) == [0, 1, 2]
    ids = [extra(c, "generation_id") for c in first.choices]
    assert len(set(ids)) == 3, ids
    assert not set(ids) & {extra(c, "generation_id") for c in second.choices}

    def texts(completion: ChatCompletion) -> list[str | None]:
        return [c.message.content for c in sorted(completion.choices, key=lambda c: c.index)]

    assert texts(first) == texts(second), "the same seed gave other samples"
    assert len(set(texts(first))) > 1, f"n=3 sampled one text thrice: {texts(first)}"


def test_json_schema_response_format(client: openai.OpenAI) -> None:
    # Sampled rather than greedy: a random model under greedy decoding may repeat the
    # whitespace the grammar allows until max_tokens (see the engine contract tests).
    response_format: ResponseFormatJSONSchema = {
        "type": "json_schema",
        "json_schema": {"name": "allocation", "schema": ALLOCATION_SCHEMA},
    }
    completion = client.chat.completions.create(
        model=f"{ADAPTERS[0]}@{VERSION}",
        messages=[{"role": "user", "content": "Which retailer gets more? Answer in JSON."}],
        max_tokens=400,
        temperature=1.0,
        seed=5,
        response_format=response_format,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice
    value = check_allocation(choice.message.content)
    assert not isinstance(value["share"], bool)


def test_alias_routes_to_its_adapter(served: Served, client: openai.OpenAI) -> None:
    target = ADAPTERS[2]
    arm = Arm("main", 1.0, (WeightedRef(target, VERSION),))
    set_split(served.stack, TENANT, "helper", [arm], sticky=False)
    direct = greedy(client, f"{target}@{VERSION}").choices[0].message.content
    for model in ("helper", f"{TENANT}/helper"):
        completion = greedy(client, model)
        assert completion.model == model
        served_by = extra(completion, "served_by")
        assert served_by["alias"] == f"{TENANT}/helper"
        assert served_by["traffic_arm"] == "main"
        assert adapter_of(completion) == (target, VERSION)
        assert completion.choices[0].message.content == direct
    assert f"{TENANT}/helper" in {m.id for m in client.models.list()}
    # The alias is this tenant's: another tenant cannot route by it.
    with served.client(OTHER_TENANT) as other, pytest.raises(openai.NotFoundError):
        greedy(other, f"{TENANT}/helper")


def test_sticky_split_keeps_each_user_on_one_arm(served: Served, client: openai.OpenAI) -> None:
    arms = [
        Arm("control", 1.0, (WeightedRef(ADAPTERS[0], VERSION),)),
        Arm("candidate", 1.0, (WeightedRef(ADAPTERS[1], VERSION),)),
    ]
    set_split(served.stack, TENANT, "ab-test", arms, sticky=True)
    expected = {"control": (ADAPTERS[0], VERSION), "candidate": (ADAPTERS[1], VERSION)}
    seen = set()
    for user in (f"user-{i}" for i in range(8)):
        arms_of_user = set()
        for _ in range(2):
            completion = client.chat.completions.create(
                model="ab-test",
                messages=[{"role": "user", "content": PROMPT}],
                max_tokens=2,
                user=user,
            )
            served_by = extra(completion, "served_by")
            arms_of_user.add(served_by["traffic_arm"])
            assert adapter_of(completion) == expected[served_by["traffic_arm"]]
        assert len(arms_of_user) == 1, f"{user} moved between arms: {arms_of_user}"
        seen |= arms_of_user
    assert seen == set(expected), f"8 users all landed in {seen}"


@pytest.mark.parametrize(
    "model", ["missing-lora@v1", f"{ADAPTERS[0]}@v99", "no-such-alias", f"{OTHER_TENANT}/helper"]
)
def test_unknown_model_is_not_found(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        greedy(client, model)
    assert caught.value.status_code == 404


def test_generations_reach_the_feedback_service(served: Served, client: openai.OpenAI) -> None:
    logged: dict[str, tuple[str, str, tuple[str, str] | None, str | None]] = {}

    def keep(completion: ChatCompletion, model: str) -> None:
        served_by = extra(completion, "served_by")
        for choice in completion.choices:
            logged[extra(choice, "generation_id")] = (
                model, choice.message.content or "", adapter_of(completion), served_by["alias"]
            )  # fmt: skip

    keep(greedy(client, served.base_model), served.base_model)
    keep(greedy(client, f"{ADAPTERS[0]}@{VERSION}"), f"{ADAPTERS[0]}@{VERSION}")
    only = Arm("only", 1.0, (WeightedRef(ADAPTERS[1], VERSION),))
    set_split(served.stack, TENANT, "logged", [only], sticky=False)
    keep(greedy(client, "logged", user="end-user-7"), "logged")
    stream = client.chat.completions.create(
        model=f"{ADAPTERS[2]}@{VERSION}",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=6,
        temperature=0.0,
        stream=True,
    )
    streamed_id, streamed_text = "", ""
    for chunk in stream:
        for choice in chunk.choices:
            streamed_id = extra(choice, "generation_id")
            streamed_text += choice.delta.content or ""
    logged[streamed_id] = (f"{ADAPTERS[2]}@{VERSION}", streamed_text, (ADAPTERS[2], VERSION), None)

    with grpc.insecure_channel(served.stack.grpc("feedback")) as channel:
        feedback = FeedbackServiceStub(channel)

        def fetch(generation_id: str) -> fb.Generation | None:
            try:
                found: fb.Generation = feedback.GetGeneration(
                    fbapi.GetGenerationRequest(tenant_id=TENANT, generation_id=generation_id),
                    timeout=10,
                ).generation
                return found
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND:
                    return None
                raise

        for generation_id, (model, output, adapter, alias) in logged.items():
            generation = wait_for(
                f"generation {generation_id} in the feedback service", 60,
                functools.partial(fetch, generation_id),
                every=0.5,
            )  # fmt: skip
            assert generation.generation_id == generation_id
            assert generation.tenant_id == TENANT
            assert generation.model == model
            assert generation.output == output
            assert generation.base_model == served.base_model
            assert generation.prompt.messages.messages[0].content == PROMPT
            if adapter is None:
                assert not generation.HasField("adapter")
            else:
                assert (generation.adapter.name, generation.adapter.version) == adapter
            if alias is None:
                assert not generation.HasField("alias")
            else:
                assert generation.alias == alias
                assert generation.traffic_arm == "only"
                assert generation.user_id == "end-user-7"
                assert generation.task == "logged"
