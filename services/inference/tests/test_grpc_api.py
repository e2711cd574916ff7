"""The inference service's gRPC API over a real CPU engine, on SQLite, through a real channel.

Adapters are real PEFT LoRAs for the tiny bootstrap Llama, published into a local artifact
store the trainer's way (files + manifest.json under the adapter's prefix). The generation
log's relay is not started, so every served generation stays pending in the log, where the
tests find it under the id the response carried.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf.struct_pb2 import Struct
from sqlalchemy import select

from flywheel.contracts.common.v1.common_pb2 import (
    AdapterRef,
    ChatMessage,
    ChatMessages,
    PageRequest,
    Prompt,
    SamplingParams,
    WeightedAdapter,
)
from flywheel.contracts.feedback.v1.service_pb2 import GenerationInput
from flywheel.contracts.inference.v1 import events_pb2 as ie
from flywheel.contracts.inference.v1 import resources_pb2 as ri
from flywheel.contracts.inference.v1 import service_pb2 as api
from flywheel.contracts.inference.v1.service_pb2_grpc import (
    InferenceServiceStub,
    add_InferenceServiceServicer_to_server,
)
from flywheel.contracts.trainer.v1 import resources_pb2 as tr
from flywheel.core.artifacts import LocalArtifactStore, copy_out
from flywheel.core.db import SessionFactory, create_engine, session_factory
from flywheel.core.events.envelope import parse, unpack
from flywheel.core.events.outbox import OutboxEvent
from flywheel.core.ids import generation_id_for
from flywheel.core.migrations import upgrade
from flywheel.core.rpc import start_grpc_server
from flywheel.core.testing.local_infra import free_port
from flywheel.inference.aliases import AliasStore
from flywheel.inference.composition import compose_cat
from flywheel.inference.engine_client import EngineClient
from flywheel.inference.generation_log import GenerationLog, PendingGenerationRow
from flywheel.inference.grpc_api import SERVICE_NAME, InferenceServicer, _request
from flywheel.inference.hotload import AdapterLoader
from flywheel.inference.models import MIGRATIONS
from flywheel.inference.registry import AdapterRegistry
from flywheel.inference.service import InferenceService
from flywheel.inference.testing import (
    engine_server,
    publish_adapter,
    random_lora_adapter,
)
from flywheel.inference.validation import BaseModelFacts

ROUTABLE = ri.ADAPTER_STATUS_ROUTABLE
REJECTED = ri.ADAPTER_STATUS_REJECTED
RANK, ALPHA = 4, 8.0
REPLICA = "replica-test"


@dataclass(frozen=True)
class Fleet:
    """What every test shares: a running engine, its base model, published adapters."""

    url: str
    base: Path
    facts: BaseModelFacts
    store: LocalArtifactStore
    manifests: dict[str, tr.AdapterManifest]  # "name@version" -> as published


def _publish(
    store: LocalArtifactStore, base: Path, folder: Path, tenant: str, name: str, version: str
) -> tr.AdapterManifest:
    """The trainer's manifest of ``folder``, published into ``store`` as the trainer does."""
    published: tr.AdapterManifest = publish_adapter(
        store, folder, tenant=tenant, name=name, version=version, base_model=str(base),
        rank=RANK, alpha=ALPHA,
    )  # fmt: skip
    return published


def _adapters(base: Path, root: Path, store: LocalArtifactStore) -> dict[str, tr.AdapterManifest]:
    """Two versions of acme's "budget" adapter and a corrupt "broken@v1", published."""
    published: dict[str, tr.AdapterManifest] = {}
    for seed, version in ((1, "v1"), (2, "v2")):
        folder = random_lora_adapter(base, root / f"budget-{version}", rank=RANK, alpha=ALPHA,
                                     seed=seed)  # fmt: skip
        published[f"budget@{version}"] = _publish(store, base, folder, "acme", "budget", version)
    # A corrupt upload: the safetensors cut in half (its manifest digests what is there, so
    # only the format check can catch it).
    broken = root / "broken"
    shutil.copytree(root / "budget-v1", broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    published["broken@v1"] = _publish(store, base, broken, "acme", "broken", "v1")
    return published


@pytest.fixture(scope="module")
def fleet(base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """The engine on the tiny base model (conftest's ``base_model``, what `tiny_base_model`
    builds), started while the adapters are made: its start is mostly importing torch."""
    root = tmp_path_factory.mktemp("grpc")
    base = base_model.resolve()  # the id the engine serves and the adapters name
    store = LocalArtifactStore(root / "artifacts")
    args = ["--max-loras", "8", "--max-lora-rank", "64"]
    with ThreadPoolExecutor(max_workers=1) as pool:
        adapters = pool.submit(_adapters, base, root, store)
        with engine_server(base, args=args, log_path=root / "engine.log") as url:
            facts = BaseModelFacts.from_model_folder(base, str(base))
            yield Fleet(url, base, facts, store, adapters.result())


@dataclass
class Stack:
    stub: InferenceServiceStub
    sessions: SessionFactory
    fleet: Fleet

    def manifest(self, key: str) -> tr.AdapterManifest:
        return self.fleet.manifests[key]


@contextlib.asynccontextmanager
async def serving(service: InferenceService) -> AsyncIterator[InferenceServiceStub]:
    """``service`` behind an in-process gRPC server (core's, with its interceptors)."""
    server = await start_grpc_server(
        "127.0.0.1", 0,
        [(add_InferenceServiceServicer_to_server, InferenceServicer(service))], [SERVICE_NAME],
    )  # fmt: skip
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield InferenceServiceStub(channel)
    finally:
        await server.stop(0)


@pytest.fixture
async def stack(fleet: Fleet, tmp_path: Path) -> AsyncIterator[Stack]:
    database = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'inference.sqlite3'}")
    engine = EngineClient(fleet.url, timeout_s=60)
    try:
        await upgrade(database, None, [MIGRATIONS])
        sessions = session_factory(database)
        registry = AdapterRegistry(sessions)
        loader = AdapterLoader(
            engine, fleet.store, registry, fleet.facts, tmp_path / "cache", max_rank=64,
            max_loaded=8,
        )  # fmt: skip
        service = InferenceService(
            engine, loader, registry, AliasStore(sessions), GenerationLog(sessions),
            base_model=str(fleet.base), replica=REPLICA, rng=random.Random(0),
        )  # fmt: skip
        async with serving(service) as stub:
            yield Stack(stub, sessions, fleet)
    finally:
        await engine.close()
        await database.dispose()


# --- helpers --------------------------------------------------------------------------


async def outbox(sessions: SessionFactory) -> list[tuple[str, object]]:
    """Every staged event as (type, payload), oldest first."""
    kinds = {"adapter.rejected": ie.AdapterRejected, "adapter.promoted": ie.AdapterPromoted}
    async with sessions() as session:
        rows = (await session.scalars(select(OutboxEvent).order_by(OutboxEvent.id))).all()
    return [
        (envelope.type, unpack(envelope, kinds[envelope.type]))
        for envelope in (parse(row.value) for row in rows)
    ]


async def logged(sessions: SessionFactory) -> dict[str, GenerationInput]:
    """The generation log's pending generations by the id they were served under."""
    async with sessions() as session:
        rows = (await session.scalars(select(PendingGenerationRow))).all()
    out = {}
    for row in rows:
        generation = GenerationInput.FromString(row.generation)
        out[generation_id_for(row.tenant_id, generation.client_generation_id)] = generation
    return out


def ref(name: str, version: str) -> AdapterRef:
    return AdapterRef(name=name, version=version)


def arm(label: str, name: str, version: str, weight: float = 1.0) -> ri.TrafficArm:
    return ri.TrafficArm(
        label=label, weight=weight, adapters=[WeightedAdapter(adapter=ref(name, version))]
    )


def chat(text: str) -> Prompt:
    return Prompt(messages=ChatMessages(messages=[ChatMessage(role="user", content=text)]))


def generate(
    model: str, *, tenant: str = "acme", max_tokens: int = 8, **fields: object
) -> api.GenerateRequest:
    fields.setdefault("prompt", chat("Split a $5,000 budget across Amazon and Walmart."))
    fields.setdefault("sampling", SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return api.GenerateRequest(tenant_id=tenant, model=model, **fields)  # type: ignore[arg-type]


async def register(s: Stack, *keys: str, load: bool = True) -> list[ri.RegisteredAdapter]:
    out = []
    for key in keys:
        response = await s.stub.RegisterAdapter(
            api.RegisterAdapterRequest(tenant_id="acme", manifest=s.manifest(key), load=load)
        )
        out.append(response.adapter)
    return out


async def status_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value.code()


# --- adapters -------------------------------------------------------------------------


async def test_register_load_get_list_adapters(stack: Stack) -> None:
    (v1,) = await register(stack, "budget@v1")
    assert v1.status == ROUTABLE
    assert (v1.loaded_replicas, v1.total_replicas) == (1, 1)
    assert v1.manifest.adapter == ref("budget", "v1")
    (v2,) = await register(stack, "budget@v2", load=False)
    assert v2.status == ri.ADAPTER_STATUS_REGISTERED
    assert (v2.loaded_replicas, v2.total_replicas) == (0, 1)

    got = await stack.stub.GetAdapter(
        api.GetAdapterRequest(tenant_id="acme", adapter=ref("budget", "v1"))
    )
    assert got.adapter.status == ROUTABLE
    assert got.adapter.registered_at.seconds > 0
    listed = await stack.stub.ListAdapters(api.ListAdaptersRequest(tenant_id="acme"))
    assert {a.manifest.adapter.version for a in listed.adapters} == {"v1", "v2"}
    routable = await stack.stub.ListAdapters(
        api.ListAdaptersRequest(tenant_id="acme", statuses=[ROUTABLE])
    )
    assert [a.manifest.adapter.version for a in routable.adapters] == ["v1"]
    first = await stack.stub.ListAdapters(
        api.ListAdaptersRequest(tenant_id="acme", page=PageRequest(page_size=1))
    )
    assert len(first.adapters) == 1
    assert first.page.next_cursor
    second = await stack.stub.ListAdapters(
        api.ListAdaptersRequest(
            tenant_id="acme", page=PageRequest(page_size=1, cursor=first.page.next_cursor)
        )
    )
    assert len(second.adapters) == 1
    assert not second.page.next_cursor
    assert first.adapters[0].manifest.adapter != second.adapters[0].manifest.adapter

    loaded = await stack.stub.LoadAdapter(
        api.LoadAdapterRequest(tenant_id="acme", adapter=ref("budget", "v2"))
    )
    assert loaded.adapter.status == ROUTABLE
    assert (loaded.adapter.loaded_replicas, loaded.adapter.total_replicas) == (1, 1)
    # Registering the same version again is a no-op returning the entry.
    (again,) = await register(stack, "budget@v2")
    assert again.status == ROUTABLE


async def test_corrupt_adapter_is_rejected_and_announced(stack: Stack) -> None:
    (entry,) = await register(stack, "broken@v1")
    assert entry.status == REJECTED
    assert entry.reject_reason
    assert (entry.loaded_replicas, entry.total_replicas) == (0, 1)
    events = await outbox(stack.sessions)
    assert [kind for kind, _ in events] == ["adapter.rejected"]
    rejected = events[0][1]
    assert isinstance(rejected, ie.AdapterRejected)
    assert rejected.tenant_id == "acme"
    assert rejected.adapter == ref("broken", "v1")
    assert rejected.reason_code == "not_safetensors"
    assert rejected.reason == entry.reject_reason
    load = stack.stub.LoadAdapter(
        api.LoadAdapterRequest(tenant_id="acme", adapter=ref("broken", "v1"))
    )
    assert await status_of(load) == grpc.StatusCode.FAILED_PRECONDITION
    served = stack.stub.Generate(generate("broken@v1"))
    assert await status_of(served) == grpc.StatusCode.FAILED_PRECONDITION
    alias = stack.stub.SetAlias(
        api.SetAliasRequest(tenant_id="acme", alias="b", target=arm("main", "broken", "v1"))
    )
    assert await status_of(alias) == grpc.StatusCode.FAILED_PRECONDITION


# --- aliases and routing --------------------------------------------------------------


async def test_alias_routes_splits_promotes_and_rolls_back(stack: Stack) -> None:
    await register(stack, "budget@v1", "budget@v2")
    created = await stack.stub.SetAlias(
        api.SetAliasRequest(
            tenant_id="acme", alias="acme/budgeting", target=arm("control", "budget", "v1", 0)
        )
    )
    assert created.alias.name == "acme/budgeting"
    assert created.alias.revision == 1
    assert created.alias.arms[0].weight == 1.0

    # Generate by alias (qualified and bare): served by v1, every choice logged.
    for model in ("acme/budgeting", "budgeting"):
        response = await stack.stub.Generate(generate(model, n=2, user_id="u-1", task="budgeting"))
        assert response.served_by.adapter == ref("budget", "v1")
        assert response.served_by.alias == "acme/budgeting"
        assert response.served_by.traffic_arm == "control"
        assert response.served_by.base_model == str(stack.fleet.base)
        assert response.served_by.replica == REPLICA
        assert [c.index for c in response.choices] == [0, 1]
        ids = [c.generation_id for c in response.choices]
        assert all(ids)
        assert len(set(ids)) == 2
        assert all(c.finish_reason in (ri.FINISH_REASON_STOP, ri.FINISH_REASON_LENGTH)
                   for c in response.choices)  # fmt: skip
        assert response.usage.prompt_tokens > 0
        assert response.usage.completion_tokens > 0
        log = await logged(stack.sessions)
        for choice in response.choices:
            generation = log[choice.generation_id]
            assert generation.adapter == ref("budget", "v1")
            assert (generation.alias, generation.traffic_arm) == ("acme/budgeting", "control")
            assert (generation.user_id, generation.task) == ("u-1", "budgeting")
            assert generation.output == choice.text

    # A sticky 50/50 split: each user stays on one arm, and both arms get users.
    split = await stack.stub.SetSplit(
        api.SetSplitRequest(
            tenant_id="acme", alias="budgeting", sticky=True, expected_revision=1,
            arms=[arm("control", "budget", "v1"), arm("candidate", "budget", "v2")],
        )
    )  # fmt: skip
    assert split.alias.revision == 2
    assert split.alias.sticky
    stale = stack.stub.SetSplit(
        api.SetSplitRequest(tenant_id="acme", alias="budgeting", expected_revision=1,
                            arms=[arm("control", "budget", "v1")])
    )  # fmt: skip
    assert await status_of(stale) == grpc.StatusCode.FAILED_PRECONDITION
    versions = {"control": "v1", "candidate": "v2"}
    arms_of_users: dict[str, str] = {}
    for i in range(12):
        user = f"user-{i}"
        seen = set()
        for _ in range(2):
            served = (
                await stack.stub.Generate(generate("budgeting", user_id=user, max_tokens=1))
            ).served_by
            assert served.adapter.version == versions[served.traffic_arm]
            seen.add(served.traffic_arm)
        assert len(seen) == 1, f"{user} moved between arms: {seen}"
        arms_of_users[user] = seen.pop()
    assert set(arms_of_users.values()) == {"control", "candidate"}

    # Promote: one arm, all the traffic, announced.
    promoted = await stack.stub.Promote(
        api.PromoteRequest(tenant_id="acme", alias="acme/budgeting", adapter=ref("budget", "v2"),
                           reason="won A/B")
    )  # fmt: skip
    assert promoted.alias.revision == 3
    assert [(a.label, a.weight, a.adapters[0].adapter.version) for a in promoted.alias.arms] == [
        ("candidate", 1.0, "v2")
    ]
    for user in arms_of_users:
        served = (
            await stack.stub.Generate(generate("budgeting", user_id=user, max_tokens=1))
        ).served_by
        assert served.adapter == ref("budget", "v2")
    events = await outbox(stack.sessions)
    assert [kind for kind, _ in events] == ["adapter.promoted"]
    event = events[0][1]
    assert isinstance(event, ie.AdapterPromoted)
    assert event.adapter == ref("budget", "v2")
    assert event.alias_revision == 3
    assert [a.label for a in event.previous_arms] == ["control", "candidate"]
    assert (event.reason, event.rollback) == ("won A/B", False)

    # Rollback: the split is back, as a new revision, announced as a rollback.
    rolled = await stack.stub.Rollback(
        api.RollbackRequest(tenant_id="acme", alias="budgeting", reason="regressed")
    )
    assert rolled.alias.revision == 4
    assert [a.label for a in rolled.alias.arms] == ["control", "candidate"]
    events = await outbox(stack.sessions)
    assert [kind for kind, _ in events] == ["adapter.promoted"] * 2
    last = events[1][1]
    assert isinstance(last, ie.AdapterPromoted)
    assert last.rollback
    assert last.alias_revision == 4

    got = await stack.stub.GetAlias(api.GetAliasRequest(tenant_id="acme", alias="budgeting"))
    assert got.alias == rolled.alias
    listed = await stack.stub.ListAliases(api.ListAliasesRequest(tenant_id="acme"))
    assert [a.name for a in listed.aliases] == ["acme/budgeting"]

    # Unload is refused while an alias routes to the version, allowed once it does not.
    unload = api.UnloadAdapterRequest(tenant_id="acme", adapter=ref("budget", "v1"))
    assert await status_of(stack.stub.UnloadAdapter(unload)) == grpc.StatusCode.FAILED_PRECONDITION
    await stack.stub.DeleteAlias(api.DeleteAliasRequest(tenant_id="acme", alias="acme/budgeting"))
    gone = stack.stub.Generate(generate("budgeting"))
    assert await status_of(gone) == grpc.StatusCode.NOT_FOUND
    unloaded = (await stack.stub.UnloadAdapter(unload)).adapter
    assert unloaded.status == ri.ADAPTER_STATUS_UNLOADED
    assert (unloaded.loaded_replicas, unloaded.total_replicas) == (0, 1)
    # An unloaded version is loaded again on demand.
    response = await stack.stub.Generate(generate("budget@v1"))
    assert response.served_by.adapter == ref("budget", "v1")
    assert not response.served_by.HasField("alias")


# --- generation -----------------------------------------------------------------------


async def test_stream_events_in_order_and_equal_to_generate(stack: Stack) -> None:
    await register(stack, "budget@v1")
    request = generate("budget@v1", n=2, max_tokens=12, user_id="u-9")
    unary = await stack.stub.Generate(request)
    greedy = unary.choices[0].text
    assert greedy
    assert unary.choices[1].text == greedy

    events = [
        e async for e in stack.stub.GenerateStream(api.GenerateStreamRequest(request=request))
    ]
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "served_by"
    assert kinds[-1] == "usage"
    assert kinds.count("served_by") == 1
    assert kinds.count("usage") == 1
    assert kinds.count("finished") == 2
    assert events[0].served_by.adapter == ref("budget", "v1")
    for index in (0, 1):
        mine = [i for i, e in enumerate(events)
                if (e.delta.index if e.HasField("delta") else e.finished.index) == index
                and e.WhichOneof("event") in ("delta", "finished")]  # fmt: skip
        assert events[mine[-1]].HasField("finished"), "a choice's deltas come before its end"
        assert all(events[i].HasField("delta") for i in mine[:-1])
        text = "".join(events[i].delta.text for i in mine[:-1])
        assert text == greedy
        finished = events[mine[-1]].finished
        assert finished.text == ""
        assert finished.generation_id
        assert finished.finish_reason == unary.choices[index].finish_reason
    usage = events[-1].usage
    assert usage.prompt_tokens == unary.usage.prompt_tokens
    assert usage.completion_tokens == unary.usage.completion_tokens
    # The streamed generations were logged under the ids the stream carried.
    log = await logged(stack.sessions)
    for event in events:
        if event.HasField("finished"):
            assert log[event.finished.generation_id].output == greedy


async def test_text_prompt_json_schema_and_skip_logging(stack: Stack) -> None:
    schema = {
        "type": "object",
        "properties": {"retailer": {"enum": ["amazon", "walmart"]}, "more": {"type": "boolean"}},
        "required": ["retailer", "more"],
        "additionalProperties": False,
    }
    metadata = Struct()
    metadata.update({"campaign": "spring"})
    response = await stack.stub.Generate(
        generate(
            str(stack.fleet.base), prompt=Prompt(text="Which retailer? Answer in JSON:"),
            sampling=SamplingParams(temperature=1.0, seed=5, max_tokens=64),
            response_format=ri.ResponseFormat(json_schema=json.dumps(schema)), metadata=metadata,
        )
    )  # fmt: skip
    choice = response.choices[0]
    assert choice.finish_reason == ri.FINISH_REASON_STOP
    value = json.loads(choice.text)
    assert value["retailer"] in ("amazon", "walmart")
    assert isinstance(value["more"], bool)
    assert not response.served_by.HasField("adapter")
    generation = (await logged(stack.sessions))[choice.generation_id]
    assert generation.prompt.text == "Which retailer? Answer in JSON:"
    assert generation.metadata["campaign"] == "spring"
    assert generation.sampling.seed == 5
    assert generation.sampling.temperature == 1.0

    skipped = await stack.stub.Generate(generate(str(stack.fleet.base), skip_logging=True))
    assert skipped.choices[0].generation_id == ""
    assert len(await logged(stack.sessions)) == 1


def test_generate_request_to_openai_body() -> None:
    request = api.GenerateRequest(
        tenant_id="acme", model="budget@v1", prompt=Prompt(text="hi"), n=3, user_id="u",
        sampling=SamplingParams(temperature=0.7, top_k=5, stop=["\n"]),
        response_format=ri.ResponseFormat(json_object=True),
    )  # fmt: skip
    caller, path, body = _request(request)
    assert path == "/v1/completions"
    assert body == {
        "model": "budget@v1", "prompt": "hi", "temperature": 0.7, "top_k": 5, "stop": ["\n"],
        "n": 3, "response_format": {"type": "json_object"}, "user": "u",
    }  # fmt: skip
    assert (caller.tenant_id, caller.user_id, caller.task, caller.metadata) == (
        "acme",
        "u",
        None,
        {},
    )
    # temperature 0 is greedy, not "unset".
    _, path, body = _request(generate("m", max_tokens=3))
    assert path == "/v1/chat/completions"
    assert (body["temperature"], body["max_tokens"]) == (0.0, 3)
    assert body["messages"][0]["role"] == "user"
    assert "n" not in body


# --- errors ---------------------------------------------------------------------------


async def test_unknown_and_cross_tenant_are_not_found(stack: Stack) -> None:
    await register(stack, "budget@v1")
    await stack.stub.SetAlias(
        api.SetAliasRequest(tenant_id="acme", alias="budgeting", target=arm("main", "budget", "v1"))
    )
    s = stack.stub
    not_found = [
        s.Generate(generate("nope@v1")),
        s.Generate(generate("ghost")),
        s.Generate(generate("acme/budgeting", tenant="globex")),
        s.Generate(generate("budget@v1", tenant="globex")),
        s.Generate(generate("globex/budgeting")),
        s.GetAdapter(api.GetAdapterRequest(tenant_id="globex", adapter=ref("budget", "v1"))),
        s.LoadAdapter(api.LoadAdapterRequest(tenant_id="globex", adapter=ref("budget", "v1"))),
        s.GetAlias(api.GetAliasRequest(tenant_id="globex", alias="acme/budgeting")),
        s.GetAlias(api.GetAliasRequest(tenant_id="globex", alias="budgeting")),
        s.Promote(
            api.PromoteRequest(
                tenant_id="globex", alias="acme/budgeting", adapter=ref("budget", "v1")
            )
        ),
        s.DeleteAlias(api.DeleteAliasRequest(tenant_id="globex", alias="acme/budgeting")),
    ]
    for call in not_found:
        assert await status_of(call) == grpc.StatusCode.NOT_FOUND
    stream = s.GenerateStream(api.GenerateStreamRequest(request=generate("nope@v1")))
    assert await status_of(anext(aiter(stream))) == grpc.StatusCode.NOT_FOUND
    # The alias is untouched by the other tenant's attempts.
    got = await s.GetAlias(api.GetAliasRequest(tenant_id="acme", alias="budgeting"))
    assert got.alias.revision == 1


async def test_invalid_requests(stack: Stack) -> None:
    s = stack.stub
    other = tr.AdapterManifest()
    other.CopyFrom(stack.manifest("budget@v1"))
    other.tenant_id = "globex"
    bad_schema = ri.ResponseFormat(json_schema="{not json")
    invalid = [
        s.RegisterAdapter(api.RegisterAdapterRequest(tenant_id="acme", manifest=other)),
        s.RegisterAdapter(api.RegisterAdapterRequest(tenant_id="acme")),
        s.GetAdapter(api.GetAdapterRequest(tenant_id="", adapter=ref("budget", "v1"))),
        s.GetAdapter(api.GetAdapterRequest(tenant_id="acme", adapter=ref("budget", ""))),
        s.Generate(api.GenerateRequest(tenant_id="acme", model=str(stack.fleet.base))),
        s.Generate(generate("", tenant="acme")),
        s.Generate(generate(str(stack.fleet.base), response_format=bad_schema)),
        # JSON, but not a schema the engine accepts: its 400 is the caller's problem.
        s.Generate(
            generate(
                str(stack.fleet.base), response_format=ri.ResponseFormat(json_schema='{"type": 5}')
            )
        ),
        s.SetSplit(api.SetSplitRequest(tenant_id="acme", alias="budgeting")),
        s.SetAlias(
            api.SetAliasRequest(
                tenant_id="acme", alias="Bad Name!", target=arm("main", "budget", "v1")
            )
        ),
    ]
    for call in invalid:
        assert await status_of(call) == grpc.StatusCode.INVALID_ARGUMENT


async def test_engine_down_is_unavailable(stack: Stack, tmp_path: Path) -> None:
    sessions = stack.sessions
    registry = AdapterRegistry(sessions)
    dead = EngineClient(f"http://127.0.0.1:{free_port()}", timeout_s=5)
    loader = AdapterLoader(dead, stack.fleet.store, registry, stack.fleet.facts, tmp_path / "c",
                           max_rank=64, max_loaded=8)  # fmt: skip
    service = InferenceService(
        dead, loader, registry, AliasStore(sessions), GenerationLog(sessions),
        base_model=str(stack.fleet.base), replica=REPLICA,
    )  # fmt: skip
    try:
        async with serving(service) as stub:
            request = generate(str(stack.fleet.base))
            assert await status_of(stub.Generate(request)) == grpc.StatusCode.UNAVAILABLE
            stream = stub.GenerateStream(api.GenerateStreamRequest(request=request))
            assert await status_of(anext(aiter(stream))) == grpc.StatusCode.UNAVAILABLE
            register = stub.RegisterAdapter(
                api.RegisterAdapterRequest(tenant_id="acme", manifest=stack.manifest("budget@v1"),
                                           load=True)
            )  # fmt: skip
            assert await status_of(register) == grpc.StatusCode.UNAVAILABLE
    finally:
        await dead.close()


async def test_composite_arm_is_served_as_one_concatenated_adapter(
    stack: Stack, tmp_path: Path
) -> None:
    """An arm naming two weighted adapters is served by their rank-concatenated composite:
    the same greedy text as that composite loaded directly, unlike either component."""
    await register(stack, "budget@v1", "budget@v2")
    parts = [
        WeightedAdapter(adapter=ref("budget", "v1"), weight=0.7),
        WeightedAdapter(adapter=ref("budget", "v2"), weight=0.3),
    ]
    target = ri.TrafficArm(label="blend", weight=1.0, adapters=parts)
    await stack.stub.SetAlias(api.SetAliasRequest(tenant_id="acme", alias="blend", target=target))
    response = await stack.stub.Generate(generate("acme/blend", max_tokens=12))
    assert not response.served_by.HasField("adapter")
    assert list(response.served_by.components) == parts
    log = await logged(stack.sessions)
    assert list(log[response.choices[0].generation_id].composed_adapters) == parts

    # The reference: compose the published files by hand and load that on the engine.
    folders = []
    for key, weight in (("budget@v1", 0.7), ("budget@v2", 0.3)):
        manifest = stack.fleet.manifests[key]
        folder = tmp_path / key.replace("@", "-")
        for digest in manifest.files:
            copy_out(stack.fleet.store, f"{stack.fleet.store.key_of(manifest.artifact.uri)}/"
                     f"{digest.path}", folder / digest.path)  # fmt: skip
        folders.append((folder, weight))
    reference = compose_cat(folders, tmp_path / "reference", base_model_id=str(stack.fleet.base))
    engine = EngineClient(stack.fleet.url, timeout_s=60)
    try:
        await engine.load_adapter("reference-blend", str(reference))
        question = {"role": "user", "content": "Split a $5,000 budget across Amazon and Walmart."}
        body = {"model": "reference-blend", "max_tokens": 12, "temperature": 0,
                "messages": [question]}  # fmt: skip
        expected = (await engine.complete("/v1/chat/completions", body))["choices"][0]
        await engine.unload_adapter("reference-blend")
    finally:
        await engine.close()
    assert response.choices[0].text == expected["message"]["content"]
    singles = [
        (await stack.stub.Generate(generate(f"budget@{v}", max_tokens=12))).choices[0].text
        for v in ("v1", "v2")
    ]
    assert response.choices[0].text not in singles
