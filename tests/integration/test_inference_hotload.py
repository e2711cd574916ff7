"""Hot-loading under load, on PostgreSQL and real Kafka (`flywheel up` as processes).

Four request loops (``openai.AsyncOpenAI``) keep an alias busy while adapters arrive the
way the trainer publishes them: files and manifest.json into the artifact store, then
``adapter.published`` produced with core's `KafkaBus` to ``flywheel.adapters.v1``, which
the inference service consumes in its own consumer group.

1. ``v1`` is published and the alias routes to it; the loops start.
2. ``v2`` is published; once it is routable the alias is promoted to it. Through the
   inference gRPC API (``Promote``) when the service serves it; while that API is not
   wired yet, with the service's own `AliasStore` on its PostgreSQL schema, the very code
   the API calls (the service reads the alias on every request, so the switch is live).
   Nothing may fail, and every request started after the promotion is served by ``v2``.
3. Corrupt adapters are published one by one: a truncated safetensors file, a manifest
   naming another base model, a rank above ``FLYWHEEL_INFERENCE_MAX_LORA_RANK``, a pickle
   (``adapter_model.bin``) listed in the manifest, and ``../`` in the adapter name. Each
   must come back as ``adapter.rejected`` on Kafka with its reason code, while the loops
   keep getting 200s served by ``v2``.
"""

from __future__ import annotations

import asyncio
import pickle
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import openai
import pytest
from kafka import KafkaConsumer

from flywheel.contracts.common.v1.common_pb2 import AdapterRef, WeightedAdapter
from flywheel.contracts.feedback.v1 import service_pb2 as fbapi
from flywheel.contracts.feedback.v1.service_pb2_grpc import FeedbackServiceStub
from flywheel.contracts.inference.v1 import events_pb2 as ie
from flywheel.contracts.inference.v1 import resources_pb2 as ri
from flywheel.contracts.inference.v1 import service_pb2 as infapi
from flywheel.contracts.inference.v1.service_pb2_grpc import InferenceServiceStub
from flywheel.contracts.trainer.v1 import resources_pb2 as tr
from flywheel.core.artifacts import LocalArtifactStore
from flywheel.core.db import create_engine, session_factory
from flywheel.core.events.envelope import parse, unpack
from flywheel.core.events.kafka import KafkaBus, ensure_topics
from flywheel.core.events.topics import EventType, Topic
from flywheel.core.layout import adapter_prefix
from flywheel.core.testing.local_infra import LocalKafka
from flywheel.core.testing.stack import Stack, running_stack
from flywheel.inference.aliases import AliasStore
from flywheel.inference.routing import Arm, WeightedRef
from flywheel.inference.testing import (
    adapter_manifest,
    published_record,
    random_lora_adapter,
    tiny_base_model,
)
from flywheel.trainer import manifest as trainer_manifest

pytestmark = pytest.mark.integration

# Other tests share the broker and its topics: this run's events are told by the tenant.
TENANT = f"hotload-{uuid.uuid4().hex[:8]}"
NAME = "support-lora"
ALIAS = "support"
MAX_RANK = 16
LOOPS = 4
RANK, ALPHA = 8, 16
PROMPT = "Write a headline for a sparkling water brand on Target Roundel."
DEADLINE_S = 60.0

T = TypeVar("T")


# --- adapters, published the trainer's way --------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """An adapter folder and its manifest, ready to be stored and announced."""

    folder: Path
    manifest: tr.AdapterManifest
    expected_code: str = ""  # the reason code of its rejection; empty: must load


def prepare_adapters(base: Path, root: Path) -> dict[str, Prepared]:
    """v1, v2 and the corrupt versions, keyed by what they are."""
    base_model = str(base)

    def good(version: str, seed: int, rank: int = RANK) -> tuple[Path, tr.AdapterManifest]:
        folder = random_lora_adapter(
            base, root / f"{NAME}-{version}", rank=rank, alpha=ALPHA, seed=seed
        )
        return folder, adapter_manifest(
            folder,
            tenant=TENANT,
            alpha=ALPHA,
            name=NAME,
            version=version,
            base_model=base_model,
            rank=rank,
        )

    def corrupt(version: str, seed: int) -> Path:
        folder, _ = good(version, seed)
        return folder

    made = {}
    # v7: a good version published after the corrupt ones, which must still load.
    for key, version, seed in (("v1", "v1", 1), ("v2", "v2", 2), ("v7", "v7", 8)):
        folder, manifest = good(version, seed)
        made[key] = Prepared(folder, manifest)

    # Cut the weights in half; the manifest digests the cut file, so only reading the
    # safetensors header against the bytes that follow can tell.
    folder = corrupt("v3-truncated", 3)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    made["truncated"] = Prepared(
        folder,
        adapter_manifest(
            folder,
            tenant=TENANT,
            alpha=ALPHA,
            rank=RANK,
            name=NAME,
            version="v3-truncated",
            base_model=base_model,
        ),
        "not_safetensors",
    )

    folder = corrupt("v4-wrong-base", 4)
    manifest = adapter_manifest(
        folder,
        tenant=TENANT,
        alpha=ALPHA,
        rank=RANK,
        name=NAME,
        version="v4-wrong-base",
        base_model=base_model,
    )
    manifest.lineage.base_model = "someone/another-base-model"
    made["wrong_base"] = Prepared(folder, manifest, "base_mismatch")

    folder, manifest = good("v5-rank", 5, rank=2 * MAX_RANK)
    made["rank"] = Prepared(folder, manifest, "rank_too_high")

    folder = corrupt("v6-pickle", 6)
    (folder / "adapter_model.bin").write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
    made["pickle"] = Prepared(
        folder,
        adapter_manifest(
            folder,
            tenant=TENANT,
            alpha=ALPHA,
            rank=RANK,
            name=NAME,
            version="v6-pickle",
            base_model=base_model,
        ),
        "not_safetensors",
    )

    # A name that would climb out of the adapters folder. Its files sit under a harmless
    # key; the manifest is what an attacker controls.
    folder = corrupt("escape", 7)
    made["dotdot"] = Prepared(
        folder,
        adapter_manifest(
            folder,
            tenant=TENANT,
            alpha=ALPHA,
            rank=RANK,
            name="../escape",
            version="v1",
            base_model=base_model,
        ),
        "unsafe_path",
    )
    return made


def manifest_of(
    folder: Path, version: str, base_model: str, *, name: str = NAME, rank: int = RANK
) -> tr.AdapterManifest:
    """The trainer's manifest of the adapter files in ``folder``."""
    manifest: tr.AdapterManifest = adapter_manifest(
        folder, tenant=TENANT, name=name, version=version, base_model=base_model,
        rank=rank, alpha=ALPHA,
    )  # fmt: skip
    return manifest


def store_adapter(store: LocalArtifactStore, prepared: Prepared) -> tr.AdapterManifest:
    """Copy the files and manifest.json into the store (as `flywheel.trainer.manifest.publish`,
    which is used unless the name is one the store must never see as a key)."""
    manifest = tr.AdapterManifest()
    manifest.CopyFrom(prepared.manifest)
    if ".." not in manifest.adapter.name:
        return trainer_manifest.publish(store, manifest, prepared.folder)
    prefix = adapter_prefix(TENANT, "escape-files", manifest.adapter.version)
    for digest in manifest.files:
        store.put_file(f"{prefix}/{digest.path}", prepared.folder / digest.path)
    manifest.artifact.uri = store.uri(prefix)
    info = store.put_bytes(f"{prefix}/manifest.json", trainer_manifest.to_json(manifest).encode())
    manifest.artifact.sha256 = info.sha256
    return manifest


# --- the load --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    started: float
    ended: float
    status: int  # HTTP status; 0 when no response came
    version: str | None  # served_by.adapter.version
    error: str = ""


@dataclass
class Load:
    """The request loops and what each request got."""

    client: openai.AsyncOpenAI
    model: str
    outcomes: list[Outcome] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def loop(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                raw = await self.client.chat.completions.with_raw_response.create(
                    model=self.model,
                    messages=[{"role": "user", "content": PROMPT}],
                    max_tokens=4,
                    temperature=0.0,
                )
                served_by = (raw.parse().model_extra or {}).get("served_by") or {}
                adapter = served_by.get("adapter") or {}
                self.outcomes.append(
                    Outcome(started, time.monotonic(), raw.status_code, adapter.get("version"))
                )
            except openai.APIStatusError as error:
                self.outcomes.append(
                    Outcome(started, time.monotonic(), error.status_code, None, repr(error))
                )
            except openai.APIError as error:
                self.outcomes.append(Outcome(started, time.monotonic(), 0, None, repr(error)))

    def started_after(self, moment: float) -> list[Outcome]:
        return [o for o in self.outcomes if o.started > moment]

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != 200]


async def until(what: str, seconds: float, probe: Callable[[], Awaitable[T | None]]) -> T:
    """Poll ``probe`` until it returns something other than None; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        value = await probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds:.0f}s waiting for {what}")
        await asyncio.sleep(0.2)


# --- Kafka: what the inference service announces --------------------------------------------


def _consumer(kafka: LocalKafka) -> KafkaConsumer:
    return KafkaConsumer(
        Topic.ADAPTERS.value,
        bootstrap_servers=kafka.bootstrap,
        group_id=f"test-hotload-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        metadata_max_age_ms=1000,
    )


class AdapterEvents:
    """This tenant's adapter.rejected / adapter.promoted events, read as they come."""

    def __init__(self, consumer: KafkaConsumer) -> None:
        self.consumer = consumer
        self.rejected: dict[tuple[str, str], ie.AdapterRejected] = {}
        self.promoted: list[ie.AdapterPromoted] = []

    def _poll(self) -> None:
        for records in self.consumer.poll(timeout_ms=300).values():
            for envelope in (parse(r.value) for r in records):
                if envelope.tenant != TENANT:
                    continue
                if envelope.type == EventType.ADAPTER_REJECTED:
                    event = unpack(envelope, ie.AdapterRejected)
                    self.rejected[(event.adapter.name, event.adapter.version)] = event
                elif envelope.type == EventType.ADAPTER_PROMOTED:
                    self.promoted.append(unpack(envelope, ie.AdapterPromoted))

    async def poll(self) -> None:
        await asyncio.to_thread(self._poll)  # one call at a time: the consumer is not shared

    async def rejection(self, ref: AdapterRef, seconds: float) -> ie.AdapterRejected | None:
        deadline = time.monotonic() + seconds
        while (ref.name, ref.version) not in self.rejected and time.monotonic() < deadline:
            await self.poll()
        return self.rejected.get((ref.name, ref.version))


# --- aliases: the gRPC API when served, else the service's own store --------------------------


class Aliases:
    def __init__(self, stack: Stack, pg_url: str) -> None:
        self.stack = stack
        self.pg_url = pg_url
        self.used: list[str] = []

    async def _grpc(self, call: Callable[[InferenceServiceStub], Awaitable[Any]]) -> bool:
        async with grpc.aio.insecure_channel(self.stack.grpc("inference")) as channel:
            try:
                await call(InferenceServiceStub(channel))
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                return False
        self.used.append("grpc")
        return True

    async def _store(self, work: Callable[[AliasStore], Awaitable[Any]]) -> None:
        engine = create_engine(self.pg_url, schema="inference")  # the service's schema
        try:
            await work(AliasStore(session_factory(engine)))
        finally:
            await engine.dispose()
        self.used.append("database")

    async def set_alias(self, name: str, version: str) -> None:
        ref = AdapterRef(name=name, version=version)
        arm = ri.TrafficArm(label="main", weight=1.0, adapters=[WeightedAdapter(adapter=ref)])
        request = infapi.SetAliasRequest(tenant_id=TENANT, alias=ALIAS, target=arm)
        if not await self._grpc(lambda stub: stub.SetAlias(request, timeout=30)):
            target = Arm("main", 1.0, (WeightedRef(name, version),))
            await self._store(lambda store: store.set_alias(TENANT, ALIAS, target))

    async def promote(self, name: str, version: str) -> None:
        request = infapi.PromoteRequest(
            tenant_id=TENANT, alias=ALIAS, adapter=AdapterRef(name=name, version=version),
            reason="hot-load test",
        )  # fmt: skip
        if not await self._grpc(lambda stub: stub.Promote(request, timeout=30)):
            ref = WeightedRef(name, version)
            await self._store(lambda store: store.promote(TENANT, ALIAS, ref, "hot-load test"))


# --- the test ---------------------------------------------------------------------------------


def test_hot_load_under_load_and_rejections_on_kafka(
    tmp_path: Path, pg_url: str, kafka: LocalKafka
) -> None:
    base = tiny_base_model(tmp_path / "models")
    prepared = prepare_adapters(base, tmp_path / "adapters")
    ensure_topics(kafka.bootstrap, [Topic.ADAPTERS.value])
    consumer = _consumer(kafka)
    env = {
        "FLYWHEEL_INFERENCE_BASE_MODEL": str(base),
        "FLYWHEEL_INFERENCE_MAX_LORA_RANK": str(MAX_RANK),
    }
    try:
        with running_stack(tmp_path, pg_url, kafka.bootstrap, env) as stack:
            with grpc.insecure_channel(stack.grpc("feedback")) as channel:
                FeedbackServiceStub(channel).CreateTenant(
                    fbapi.CreateTenantRequest(tenant_id=TENANT, display_name=TENANT), timeout=30
                )
            asyncio.run(scenario(stack, pg_url, kafka, AdapterEvents(consumer), prepared))
    finally:
        consumer.close()


async def scenario(
    stack: Stack,
    pg_url: str,
    kafka: LocalKafka,
    events: AdapterEvents,
    prepared: dict[str, Prepared],
) -> None:
    store = LocalArtifactStore(stack.data_dir / "artifacts")
    bus = KafkaBus(kafka.bootstrap, client_id="test-trainer")
    aliases = Aliases(stack, pg_url)
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{stack.services['inference']['http_port']}/v1",
        api_key="unused", max_retries=0, timeout=60.0,
        default_headers={"X-Flywheel-Tenant": TENANT},
    )  # fmt: skip
    load = Load(client, f"{TENANT}/{ALIAS}")
    loops: list[asyncio.Task[None]] = []

    async def publish(what: str) -> tr.AdapterManifest:
        manifest = store_adapter(store, prepared[what])
        await bus.publish([published_record(manifest)])
        return manifest

    async def listed(version: str) -> bool | None:
        ids = [m.id async for m in client.models.list()]
        return True if f"{NAME}@{version}" in ids else None

    async def routable(version: str) -> None:
        await until(f"{NAME}@{version} routable", DEADLINE_S, lambda: listed(version))

    async def becomes_routable(version: str, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not await listed(version):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.2)
        return True

    async def more_requests(count: int, what: str) -> None:
        """Wait until ``count`` more requests have completed (the load goes on)."""
        target = len(load.outcomes) + count

        async def done() -> bool | None:
            return True if len(load.outcomes) >= target else None

        await until(f"{count} more requests ({what})", DEADLINE_S, done)

    try:
        # 1. v1 through Kafka, the alias on it, the load on the alias.
        await publish("v1")
        await routable("v1")
        await aliases.set_alias(NAME, "v1")
        loops = [asyncio.create_task(load.loop()) for _ in range(LOOPS)]
        await more_requests(2 * LOOPS, "on v1")
        assert {o.version for o in load.outcomes} == {"v1"}, load.outcomes

        # 2. v2 hot-loaded while the alias is busy, then promoted.
        published_v2 = time.monotonic()
        await publish("v2")
        await routable("v2")
        await aliases.promote(NAME, "v2")
        switched = time.monotonic()
        await more_requests(3 * LOOPS, "after the promotion")
        before = [o for o in load.outcomes if o.ended < published_v2]
        assert before, "no request completed before v2 was published"
        assert all(o.version == "v1" for o in before if o.status == 200)
        after = load.started_after(switched)
        assert after, "no request started after the promotion"
        assert [o for o in after if o.version != "v2"] == [], "served by another than v2"

        async def promoted_event() -> bool | None:
            await events.poll()
            hit = [p for p in events.promoted if p.adapter.version == "v2"]
            return True if hit else None

        await until("adapter.promoted for v2 on Kafka", DEADLINE_S, promoted_event)

        # 3. Corrupt adapters, one by one, while the alias keeps serving v2.
        for what in ("truncated", "wrong_base", "rank", "pickle"):
            manifest = await publish(what)
            rejected = await events.rejection(manifest.adapter, DEADLINE_S)
            assert rejected is not None, f"no adapter.rejected for {what} within {DEADLINE_S}s"
            assert rejected.reason_code == prepared[what].expected_code, (what, rejected)
            assert rejected.reason, what
            # Not routable: asking for it directly is refused (409), not served.
            with pytest.raises(openai.ConflictError):
                await client.chat.completions.create(
                    model=f"{NAME}@{manifest.adapter.version}",
                    messages=[{"role": "user", "content": PROMPT}],
                    max_tokens=2,
                )
            await more_requests(LOOPS, f"after the {what} adapter")

        # ``../`` last, then a good v7: an event the service cannot handle must not stop
        # the adapters published after it.
        dotdot = await publish("dotdot")
        dotdot_rejected = await events.rejection(dotdot.adapter, 20.0)
        await publish("v7")
        v7_loaded = await becomes_routable("v7", 20.0)
        await more_requests(LOOPS, "after the ../ adapter")
    finally:
        load.stop.set()
        await asyncio.gather(*loops, return_exceptions=True)
        await client.close()
        await bus.close()

    assert load.failures() == [], f"{len(load.failures())} of {len(load.outcomes)} failed"
    after = load.started_after(switched)
    assert [o for o in after if o.version != "v2"] == [], "served by another than v2"
    assert len(load.outcomes) >= 10 * LOOPS, f"only {len(load.outcomes)} requests"
    print(f"{len(load.outcomes)} requests; aliases changed through {sorted(set(aliases.used))}")
    assert dotdot_rejected is not None, (
        "BUG: no adapter.rejected for an adapter named '../escape' within 20s: the registry "
        "refuses the name (InvalidArgument) before the loader can reject it, so "
        "InferenceService.apply raises and the adapters consumer redelivers the batch "
        f"forever (v7 published after it {'loaded' if v7_loaded else 'never loaded either'})"
    )
    assert dotdot_rejected.reason_code == "unsafe_path", dotdot_rejected
    assert v7_loaded, "v7, published after the ../ adapter, did not become routable in 20s"
