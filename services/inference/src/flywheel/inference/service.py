"""The inference service's domain logic: route a request, serve it, log what was served.

Transport-free: the OpenAI HTTP API and the gRPC API both call ``InferenceService``.
A request names the base model, an adapter version ("name@version") or an alias; aliases
pick an arm (sticky per user), an arm's adapters are loaded on demand (several become
one composite), the engine generates, and every choice is logged as a generation whose
id is known before the engine starts, so a streamed answer can carry it.
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import struct_pb2
from prometheus_client import Counter

from flywheel.contracts.common.v1 import common_pb2 as cm
from flywheel.contracts.feedback.v1.service_pb2 import GenerationInput
from flywheel.contracts.inference.v1 import events_pb2 as ie
from flywheel.contracts.inference.v1 import resources_pb2 as ri
from flywheel.contracts.trainer.v1 import events_pb2 as te
from flywheel.core.errors import Conflict, DomainError, FieldError, InvalidArgument
from flywheel.core.events.bus import EventRecord
from flywheel.core.events.envelope import parse, unpack
from flywheel.core.events.topics import EventType
from flywheel.core.ids import generation_id_for
from flywheel.inference.aliases import AliasStore
from flywheel.inference.engine_client import EngineClient, EngineError
from flywheel.inference.generation_log import GenerationLog
from flywheel.inference.hotload import AdapterLoader
from flywheel.inference.openai_protocol import model_card
from flywheel.inference.registry import AdapterRegistry
from flywheel.inference.routing import (
    AdapterVersion,
    AliasName,
    Arm,
    WeightedRef,
    choose_arm,
    parse_model_name,
)
from flywheel.inference.validation import AdapterRejected

log = logging.getLogger(__name__)
SKIPPED_EVENTS = Counter(
    "flywheel_inference_adapter_events_skipped_total",
    "Adapter events that could not be applied (invalid; logged, not retried).",
)
USABLE = (ri.ADAPTER_STATUS_ROUTABLE, ri.ADAPTER_STATUS_UNLOADED)
DEFAULT_TASK = "general"
MARK_USED_INTERVAL_S = 60.0


@dataclass(frozen=True)
class Route:
    """Where a request goes and what served it."""

    engine_model: str
    base_model: str
    adapter: WeightedRef | None = None
    components: tuple[WeightedRef, ...] = ()
    alias: str | None = None
    arm: str | None = None

    def served_by(self, replica: str) -> dict[str, Any]:
        """The ``served_by`` object every response carries."""
        return {
            "base_model": self.base_model,
            "adapter": None
            if self.adapter is None
            else {"name": self.adapter.name, "version": self.adapter.version},
            "components": [
                {"name": c.name, "version": c.version, "weight": c.weight} for c in self.components
            ],
            "alias": self.alias,
            "traffic_arm": self.arm,
            "replica": replica,
        }


@dataclass
class Caller:
    """Who asks: tenant (set by the gateway), end user, task, free metadata."""

    tenant_id: str
    user_id: str | None = None
    task: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    skip_logging: bool = False


@dataclass
class Served:
    """A finished completion: the engine's body with Flywheel's fields added."""

    body: dict[str, Any]
    route: Route
    generation_ids: list[str]


class InferenceService:
    """Routing, serving and logging over one engine replica."""

    def __init__(
        self,
        engine: EngineClient,
        loader: AdapterLoader,
        registry: AdapterRegistry,
        aliases: AliasStore,
        log: GenerationLog,
        *,
        base_model: str,
        replica: str,
        rng: random.Random | None = None,
    ) -> None:
        self.engine = engine
        self.loader = loader
        self.registry = registry
        self.aliases = aliases
        self.log = log
        self.base_model = base_model
        self.replica = replica
        self.rng = rng or random.Random()
        self.ready = False
        self._marked: dict[tuple[str, str, str], float] = {}

    async def start(self) -> int:
        """Restore this replica's routable adapters, then report ready; how many loaded."""
        restored = await self.loader.restore()
        self.ready = True
        return restored

    async def apply(self, records: Sequence[EventRecord]) -> int:
        """Apply adapter events (every replica sees all of them): load each published
        adapter, follow promotions made elsewhere. Returns how many were handled."""
        handled = 0
        for record in records:
            try:
                if record.event_type == EventType.ADAPTER_PUBLISHED:
                    manifest = unpack(parse(record.value), te.AdapterPublished).manifest
                    await self.loader.publish(manifest.tenant_id, manifest)
                elif record.event_type == EventType.ADAPTER_PROMOTED:
                    await self.aliases.apply_promoted_event(
                        unpack(parse(record.value), ie.AdapterPromoted)
                    )
                else:
                    continue
            except DomainError as error:
                # The event itself is wrong (a version republished with other content, a
                # bad manifest): retrying cannot help, and raising would hold back every
                # later adapter event of this replica.
                SKIPPED_EVENTS.inc()
                log.error("adapter event %s skipped: %s", record.event_id, error)
                continue
            handled += 1
        return handled

    async def model_cards(self, tenant_id: str, created: int) -> list[dict[str, Any]]:
        """``/v1/models`` for a tenant: base model, servable adapter versions, aliases."""
        cards = [model_card(self.base_model, root=self.base_model, parent=None, created=created)]
        cursor = ""
        while True:
            page = await self.registry.list(tenant_id, statuses=list(USABLE), cursor=cursor)
            for entry in page.items:
                ref = entry.manifest.adapter
                parent = entry.manifest.lineage.parent_adapter
                name = f"{ref.name}@{ref.version}"
                card = model_card(name, root=name, parent=self.base_model, created=created)
                if parent.name:
                    card["parent_adapter"] = f"{parent.name}@{parent.version}"
                cards.append(card)
            if not page.next_cursor:
                break
            cursor = page.next_cursor
        cursor = ""
        while True:
            aliases = await self.aliases.list(tenant_id, cursor=cursor)
            cards += [
                model_card(a.qualified_name, root=a.qualified_name, parent=self.base_model,
                           created=created)
                for a in aliases.items
            ]  # fmt: skip
            if not aliases.next_cursor:
                break
            cursor = aliases.next_cursor
        return cards

    # ---- routing ---------------------------------------------------------------------

    async def route(self, caller: Caller, model: str) -> Route:
        """Resolve ``model`` for the caller's tenant and make sure the engine has it."""
        target = parse_model_name(model, tenant=caller.tenant_id, base_models=[self.base_model])
        if isinstance(target, AdapterVersion):
            ref = WeightedRef(target.name, target.version)
            return Route(await self._load(caller.tenant_id, [ref]), self.base_model, ref)
        if isinstance(target, AliasName):
            alias = await self.aliases.get(caller.tenant_id, target.name)
            arm = choose_arm(alias, caller.user_id, self.rng)
            return await self._route_arm(caller.tenant_id, alias.qualified_name, arm)
        return Route(self.base_model, self.base_model)

    async def _route_arm(self, tenant_id: str, alias: str, arm: Arm) -> Route:
        refs = list(arm.adapters)
        if not refs:
            return Route(self.base_model, self.base_model, alias=alias, arm=arm.label)
        engine_model = await self._load(tenant_id, refs)
        if len(refs) == 1:
            return Route(engine_model, self.base_model, refs[0], alias=alias, arm=arm.label)
        return Route(engine_model, self.base_model, None, tuple(refs), alias=alias, arm=arm.label)

    async def _load(self, tenant_id: str, refs: list[WeightedRef]) -> str:
        for ref in refs:
            entry = await self.registry.get(tenant_id, ref.name, ref.version)
            if entry.status not in USABLE:
                raise Conflict(
                    f"adapter {ref.name}@{ref.version} is not servable "
                    f"({ri.AdapterStatus.Name(entry.status)}"
                    + (f": {entry.reject_reason})" if entry.reject_reason else ")")
                )
        try:
            if len(refs) == 1:
                ref = refs[0]
                name = await self.loader.ensure(tenant_id, ref.name, ref.version)
                await self._mark_used(tenant_id, ref)
                return name
            return await self.loader.ensure_composite(tenant_id, refs)
        except AdapterRejected as rejected:
            # Files that validated once and no longer do (changed in the store): never
            # serve them again, and say so on the adapters topic.
            if len(refs) == 1:
                await self.registry.set_status(
                    tenant_id, refs[0].name, refs[0].version, ri.ADAPTER_STATUS_REJECTED,
                    reject_code=rejected.code, reject_reason=rejected.reason,
                )  # fmt: skip
            raise Conflict(f"adapter cannot be served: {rejected.reason}") from rejected

    # ---- serving ---------------------------------------------------------------------

    async def complete(self, caller: Caller, path: str, body: dict[str, Any]) -> Served:
        """A non-streamed chat or text completion, logged; OpenAI body + Flywheel fields."""
        route, client_ids = await self._prepare(caller, body)
        started = time.perf_counter()
        try:
            result = await self.engine.complete(path, self._engine_body(route, body))
        except EngineError as error:
            route = await self._after_engine_error(error, caller, route, body)
            result = await self.engine.complete(path, self._engine_body(route, body))
        latency = time.perf_counter() - started
        chat = path.endswith("chat/completions")
        choices = result.get("choices", [])
        outputs = [choice_text(c, chat) for c in choices]
        ids = await self._log(
            caller, route, body, outputs, client_ids, result.get("usage"), latency
        )
        for choice, generation_id in zip(choices, ids, strict=False):
            choice["generation_id"] = generation_id
        result["model"] = body["model"]
        result["served_by"] = route.served_by(self.replica)
        return Served(result, route, ids)

    async def stream(
        self, caller: Caller, path: str, body: dict[str, Any]
    ) -> tuple[Route, list[str], AsyncIterator[str]]:
        """A streamed completion: route, generation ids, and the SSE ``data`` payloads.

        The generation ids are known before the first token (they derive from client ids
        made here), so every chunk carries its choice's id.
        """
        route, client_ids = await self._prepare(caller, body)
        payloads = self.engine.stream(path, self._engine_body(route, body))
        try:  # fail before the response starts, not in the middle of the stream
            first = await anext(payloads)
        except EngineError as error:
            route = await self._after_engine_error(error, caller, route, body)
            payloads = self.engine.stream(path, self._engine_body(route, body))
            first = await anext(payloads)
        ids = self._generation_ids(caller, client_ids)
        chat = path.endswith("chat/completions")
        relay = self._relay(caller, route, body, chat, client_ids, ids, first, payloads)
        return route, ids, relay

    async def _relay(
        self,
        caller: Caller,
        route: Route,
        body: dict[str, Any],
        chat: bool,
        client_ids: list[str],
        ids: list[str],
        first: str,
        payloads: AsyncIterator[str],
    ) -> AsyncIterator[str]:
        started = time.perf_counter()
        texts = ["" for _ in client_ids]
        usage: dict[str, Any] | None = None
        served_by = route.served_by(self.replica)
        payload: str | None = first
        while payload is not None and payload != "[DONE]":
            chunk = json.loads(payload)
            for choice in chunk.get("choices", []):
                index = int(choice.get("index", 0))
                if index < len(texts):
                    texts[index] += delta_text(choice, chat)
                    if ids:
                        choice["generation_id"] = ids[index]
            usage = chunk.get("usage") or usage
            chunk["model"] = body["model"]
            chunk["served_by"] = served_by
            yield json.dumps(chunk)
            payload = await anext(payloads, None)
        latency = time.perf_counter() - started
        await self._log(caller, route, body, texts, client_ids, usage, latency)
        yield "[DONE]"

    async def _mark_used(self, tenant_id: str, ref: WeightedRef) -> None:
        """Record use (restores load the most recently used first), at most once a minute
        per adapter: a database write on every request would sit on the serving path."""
        key = (tenant_id, ref.name, ref.version)
        now = time.monotonic()
        if now - self._marked.get(key, -MARK_USED_INTERVAL_S) < MARK_USED_INTERVAL_S:
            return
        self._marked[key] = now
        await self.registry.mark_used(tenant_id, ref.name, ref.version)

    async def _prepare(self, caller: Caller, body: dict[str, Any]) -> tuple[Route, list[str]]:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidArgument(FieldError("model", "required"))
        route = await self.route(caller, model)
        n = int(body.get("n") or 1)
        return route, [str(uuid.uuid4()) for _ in range(n)]

    def _generation_ids(self, caller: Caller, client_ids: list[str]) -> list[str]:
        if caller.skip_logging:
            return []
        return [generation_id_for(caller.tenant_id, c) for c in client_ids]

    async def _after_engine_error(
        self, error: EngineError, caller: Caller, route: Route, body: dict[str, Any]
    ) -> Route:
        """The route to retry on once, if the engine lost the adapter (it restarted)."""
        if error.status != 404 or route.engine_model == self.base_model:
            raise error
        await self.loader.forget(route.engine_model)
        return await self.route(caller, str(body["model"]))

    def _engine_body(self, route: Route, body: dict[str, Any]) -> dict[str, Any]:
        request = {k: v for k, v in body.items() if k not in FLYWHEEL_FIELDS}
        request["model"] = route.engine_model
        return request

    async def _log(
        self,
        caller: Caller,
        route: Route,
        body: dict[str, Any],
        outputs: list[str],
        client_ids: list[str],
        usage: dict[str, Any] | None,
        latency_s: float,
    ) -> list[str]:
        """Record each choice as a generation (durably, locally); their ids."""
        if caller.skip_logging:
            return []
        prompt = _prompt(body)
        sampling = _sampling(body)
        usage = usage or {}
        items = []
        for index, output in enumerate(outputs[: len(client_ids)]):
            item = GenerationInput(
                client_generation_id=client_ids[index],
                task=caller.task or _task_of(route),
                prompt=prompt,
                output=output,
                model=str(body["model"]),
                base_model=route.base_model,
                sampling=sampling,
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0) // max(1, len(outputs)),
            )
            item.latency.FromNanoseconds(int(latency_s * 1e9))
            if route.adapter is not None:
                item.adapter.CopyFrom(
                    cm.AdapterRef(name=route.adapter.name, version=route.adapter.version)
                )
            for part in route.components:
                item.composed_adapters.add(
                    adapter=cm.AdapterRef(name=part.name, version=part.version), weight=part.weight
                )
            if route.alias is not None:
                item.alias = route.alias
            if route.arm is not None:
                item.traffic_arm = route.arm
            if caller.user_id:
                item.user_id = caller.user_id
            if caller.metadata:
                metadata = struct_pb2.Struct()
                metadata.update(caller.metadata)
                item.metadata.CopyFrom(metadata)
            items.append((caller.tenant_id, item))
        return await self.log.record(items)


FLYWHEEL_FIELDS = frozenset({"task", "metadata", "skip_logging"})


def choice_text(choice: dict[str, Any], chat: bool) -> str:
    """A finished choice's text (chat message content or completion text)."""
    if chat:
        return str((choice.get("message") or {}).get("content") or "")
    return str(choice.get("text") or "")


def delta_text(choice: dict[str, Any], chat: bool) -> str:
    """The text a streamed chunk adds to its choice."""
    if chat:
        return str((choice.get("delta") or {}).get("content") or "")
    return str(choice.get("text") or "")


def _task_of(route: Route) -> str:
    """Default task: the alias's name ("acme/budgeting" -> "budgeting")."""
    if route.alias:
        return route.alias.rsplit("/", 1)[-1]
    return DEFAULT_TASK


def _prompt(body: dict[str, Any]) -> cm.Prompt:
    if "messages" in body:
        prompt = cm.Prompt()
        for message in body["messages"]:
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            prompt.messages.messages.add(role=str(message.get("role")), content=str(content or ""))
        return prompt
    raw = body.get("prompt")
    text = raw[0] if isinstance(raw, list) and raw and isinstance(raw[0], str) else raw
    return cm.Prompt(text=text if isinstance(text, str) else json.dumps(raw))


def _sampling(body: dict[str, Any]) -> cm.SamplingParams:
    params = cm.SamplingParams()
    for name in (
        "temperature",
        "top_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
    ):
        if isinstance(body.get(name), int | float):
            setattr(params, name, float(body[name]))
    if isinstance(body.get("top_k"), int):
        params.top_k = body["top_k"]
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int):
        params.max_tokens = limit
    if isinstance(body.get("seed"), int):
        params.seed = body["seed"]
    stop = body.get("stop")
    params.stop.extend([stop] if isinstance(stop, str) else list(stop or []))
    return params
