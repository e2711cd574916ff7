"""gRPC transport of the inference service: messages in, domain calls, messages out.

Adapters (registry + hot-loading), aliases (the alias store) and generation (the same
``InferenceService`` the OpenAI HTTP API calls). Domain errors become statuses in
:class:`flywheel.core.rpc.DomainErrorInterceptor`; the engine's failures are mapped here:
its 4xx answers are the caller's problem (INVALID_ARGUMENT, NOT_FOUND), anything else
(5xx, an engine that does not answer) is UNAVAILABLE, so callers retry.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
from google.protobuf import json_format

from flywheel.contracts.common.v1.common_pb2 import AdapterRef, PageResponse, WeightedAdapter
from flywheel.contracts.inference.v1 import resources_pb2 as ri
from flywheel.contracts.inference.v1 import service_pb2 as api
from flywheel.contracts.inference.v1.service_pb2_grpc import InferenceServiceServicer
from flywheel.core.errors import Conflict, FieldError, InvalidArgument, NotFound
from flywheel.core.paging import MAX_PAGE_SIZE
from flywheel.inference.aliases import to_proto as alias_to_proto
from flywheel.inference.engine_client import EngineError
from flywheel.inference.hotload import engine_name
from flywheel.inference.routing import Arm, arm_from_proto
from flywheel.inference.service import Caller, InferenceService, choice_text, delta_text
from flywheel.inference.validation import AdapterRejected

SERVICE_NAME = "flywheel.contracts.inference.v1.InferenceService"
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
FINISH_REASONS = {
    "stop": ri.FINISH_REASON_STOP,
    "length": ri.FINISH_REASON_LENGTH,
    "abort": ri.FINISH_REASON_ABORT,
    "cancelled": ri.FINISH_REASON_ABORT,
}
# Proto3-optional sampling fields, copied to the OpenAI body only when set.
SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "max_tokens", "seed",
    "presence_penalty", "frequency_penalty", "repetition_penalty",
)  # fmt: skip
# Engine answers that mean "try again later" although they are 4xx.
RETRYABLE_ENGINE_STATUSES = frozenset({408, 429})


def _required(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(FieldError(field, "is required"))
    return value


def _ref(ref: AdapterRef, field: str = "adapter") -> tuple[str, str]:
    """(name, version) of a required adapter reference."""
    errors = [
        FieldError(f"{field}.{part}", "is required")
        for part in ("name", "version")
        if not getattr(ref, part)
    ]
    if errors:
        raise InvalidArgument(errors)
    return ref.name, ref.version


def _alias(tenant_id: str, alias: str, field: str = "alias") -> str:
    """The bare alias name of ``alias`` ("tenant/name" or "name"); another tenant's is
    `NotFound`, as its ids are everywhere else."""
    _required(alias, field)
    owner, slash, name = alias.rpartition("/")
    if slash and owner != tenant_id:
        raise NotFound("alias", alias)
    return name if slash else alias


def _page_size(size: int) -> int:
    # common.v1.PageRequest: services clamp page_size to their maximum rather than failing.
    return min(size, MAX_PAGE_SIZE)


@contextlib.asynccontextmanager
async def _engine_errors(context: Any, model: str = "") -> AsyncIterator[None]:
    """Map what the engine (or an adapter check on the way to it) refused or failed."""
    try:
        yield
    except EngineError as error:
        if error.status == 404:
            raise NotFound("model", model or str(error)) from error
        if 400 <= error.status < 500 and error.status not in RETRYABLE_ENGINE_STATUSES:
            raise InvalidArgument(FieldError("request", str(error))) from error
        await context.abort(
            grpc.StatusCode.UNAVAILABLE, f"the engine failed ({error.status}): {error}"
        )
    except httpx.HTTPError as error:  # the engine did not answer at all
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"the engine is unreachable: {error}")
    except AdapterRejected as error:  # an adapter failed its checks when (re)loaded
        raise Conflict(f"adapter rejected ({error.code}): {error.reason}") from error


def _served_by(data: dict[str, Any]) -> ri.ServedBy:
    message = ri.ServedBy(base_model=str(data["base_model"]), replica=str(data.get("replica", "")))
    adapter = data.get("adapter")
    if adapter:
        message.adapter.CopyFrom(AdapterRef(name=adapter["name"], version=adapter["version"]))
    for part in data.get("components") or ():
        message.components.append(
            WeightedAdapter(
                adapter=AdapterRef(name=part["name"], version=part["version"]),
                weight=float(part["weight"]),
            )
        )
    if data.get("alias") is not None:
        message.alias = str(data["alias"])
    if data.get("traffic_arm") is not None:
        message.traffic_arm = str(data["traffic_arm"])
    return message


def _usage(data: dict[str, Any]) -> ri.Usage:
    return ri.Usage(
        prompt_tokens=int(data.get("prompt_tokens") or 0),
        completion_tokens=int(data.get("completion_tokens") or 0),
    )


def _finish_reason(value: Any) -> ri.FinishReason.ValueType:
    return FINISH_REASONS.get(str(value), ri.FINISH_REASON_UNSPECIFIED)


def _response_format(message: ri.ResponseFormat) -> dict[str, Any] | None:
    kind = message.WhichOneof("kind")
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        try:
            schema = json.loads(message.json_schema)
        except ValueError as error:
            raise InvalidArgument(
                FieldError("response_format.json_schema", f"is not JSON ({error})")
            ) from error
        return {"type": "json_schema", "json_schema": {"name": "response", "schema": schema}}
    if kind == "text":
        return {"type": "text"}
    return None


def _request(request: api.GenerateRequest) -> tuple[Caller, str, dict[str, Any]]:
    """The caller, engine path and OpenAI body of a GenerateRequest."""
    tenant_id = _required(request.tenant_id, "tenant_id")
    body: dict[str, Any] = {"model": _required(request.model, "model")}
    prompt = request.prompt
    kind = prompt.WhichOneof("kind")
    if kind == "messages":
        if not prompt.messages.messages:
            raise InvalidArgument(FieldError("prompt.messages", "must hold at least one message"))
        messages = []
        for m in prompt.messages.messages:
            message = {"role": m.role, "content": m.content}
            if m.HasField("name"):
                message["name"] = m.name
            messages.append(message)
        body["messages"] = messages
        path = CHAT_PATH
    elif kind == "text":
        body["prompt"] = prompt.text
        path = COMPLETIONS_PATH
    else:
        raise InvalidArgument(FieldError("prompt", "is required (text or messages)"))
    sampling: Any = request.sampling  # fields named at run time
    for name in SAMPLING_FIELDS:
        if sampling.HasField(name):
            value = getattr(sampling, name)
            # float32 on the wire: 0.7 arrives as 0.699999988; send (and log) 0.7.
            body[name] = float(f"{value:.7g}") if isinstance(value, float) else value
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    if request.n:
        body["n"] = request.n
    response_format = _response_format(request.response_format)
    if response_format is not None:
        body["response_format"] = response_format
    user_id = request.user_id if request.HasField("user_id") else None
    if user_id:
        body["user"] = user_id
    caller = Caller(
        tenant_id=tenant_id,
        user_id=user_id or None,
        task=request.task or None,
        metadata=json_format.MessageToDict(request.metadata)
        if request.HasField("metadata")
        else {},
        skip_logging=request.skip_logging,
    )
    return caller, path, body


class InferenceServicer(InferenceServiceServicer):
    """InferenceService over the domain."""

    def __init__(self, service: InferenceService) -> None:
        self.service = service
        self.registry = service.registry
        self.aliases = service.aliases
        self.loader = service.loader

    # ---- adapters ----------------------------------------------------------------------

    def _entry(self, entry: ri.RegisteredAdapter) -> ri.RegisteredAdapter:
        """The entry with its replica counts. This replica only: each replica loads for
        itself and none knows the others', so it is 1/1 when loaded here, else 0/1."""
        ref = entry.manifest.adapter
        loaded = engine_name(entry.manifest.tenant_id, ref.name, ref.version) in set(
            self.loader.loaded()
        )
        entry.loaded_replicas = 1 if loaded else 0
        entry.total_replicas = 1
        return entry

    async def RegisterAdapter(self, request: Any, context: Any) -> api.RegisterAdapterResponse:
        tenant_id = _required(request.tenant_id, "tenant_id")
        if not request.HasField("manifest"):
            raise InvalidArgument(FieldError("manifest", "is required"))
        manifest = request.manifest
        if manifest.tenant_id and manifest.tenant_id != tenant_id:
            raise InvalidArgument(FieldError("manifest.tenant_id", "is another tenant's"))
        _ref(manifest.adapter, "manifest.adapter")
        if request.load:
            async with _engine_errors(context):
                entry = await self.loader.publish(tenant_id, manifest)
        else:
            entry, _ = await self.registry.register(tenant_id, manifest)
        return api.RegisterAdapterResponse(adapter=self._entry(entry))

    async def GetAdapter(self, request: Any, context: Any) -> api.GetAdapterResponse:
        tenant_id = _required(request.tenant_id, "tenant_id")
        entry = await self.registry.get(tenant_id, *_ref(request.adapter))
        return api.GetAdapterResponse(adapter=self._entry(entry))

    async def ListAdapters(self, request: Any, context: Any) -> api.ListAdaptersResponse:
        page = await self.registry.list(
            _required(request.tenant_id, "tenant_id"), statuses=list(request.statuses),
            page_size=_page_size(request.page.page_size), cursor=request.page.cursor,
        )  # fmt: skip
        return api.ListAdaptersResponse(
            adapters=[self._entry(e) for e in page.items],
            page=PageResponse(next_cursor=page.next_cursor),
        )

    async def LoadAdapter(self, request: Any, context: Any) -> api.LoadAdapterResponse:
        tenant_id = _required(request.tenant_id, "tenant_id")
        name, version = _ref(request.adapter)
        entry = await self.registry.get(tenant_id, name, version)
        if entry.status == ri.ADAPTER_STATUS_REJECTED:
            raise Conflict(
                f"adapter {name}@{version} was rejected ({entry.reject_reason}); it is never loaded"
            )
        async with _engine_errors(context):
            try:
                await self.loader.ensure(tenant_id, name, version, entry.manifest)
            except AdapterRejected as rejected:  # its files no longer pass: never serve it
                await self.registry.set_status(
                    tenant_id, name, version, ri.ADAPTER_STATUS_REJECTED,
                    reject_code=rejected.code, reject_reason=rejected.reason,
                )  # fmt: skip
                raise Conflict(
                    f"adapter {name}@{version} was rejected ({rejected.code}): {rejected.reason}"
                ) from rejected
        if entry.status != ri.ADAPTER_STATUS_ROUTABLE:
            entry = await self.registry.set_status(
                tenant_id, name, version, ri.ADAPTER_STATUS_ROUTABLE
            )
        return api.LoadAdapterResponse(adapter=self._entry(entry))

    async def UnloadAdapter(self, request: Any, context: Any) -> api.UnloadAdapterResponse:
        tenant_id = _required(request.tenant_id, "tenant_id")
        name, version = _ref(request.adapter)
        entry = await self.registry.get(tenant_id, name, version)
        await self._refuse_if_aliased(tenant_id, name, version)
        async with _engine_errors(context):
            await self.loader.unload(tenant_id, name, version)
        if entry.status != ri.ADAPTER_STATUS_REJECTED:  # a rejected one never was loaded
            entry = await self.registry.set_status(
                tenant_id, name, version, ri.ADAPTER_STATUS_UNLOADED
            )
        return api.UnloadAdapterResponse(adapter=self._entry(entry))

    async def _refuse_if_aliased(self, tenant_id: str, name: str, version: str) -> None:
        """`Conflict` while any arm of any of the tenant's aliases names the version."""
        cursor = ""
        while True:
            page = await self.aliases.list(tenant_id, page_size=MAX_PAGE_SIZE, cursor=cursor)
            for alias in page.items:
                for arm in alias.arms:
                    if any(r.name == name and r.version == version for r in arm.adapters):
                        raise Conflict(
                            f"alias {alias.qualified_name} (arm {arm.label!r}) routes to "
                            f"{name}@{version}; point it elsewhere before unloading"
                        )
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    # ---- aliases -------------------------------------------------------------------------

    async def SetAlias(self, request: Any, context: Any) -> api.SetAliasResponse:
        tenant_id = _required(request.tenant_id, "tenant_id")
        name = _alias(tenant_id, request.alias)
        target = arm_from_proto(request.target)
        if target.weight == 0:  # a single target gets all the traffic: its weight is moot
            target = Arm(target.label, 1.0, target.adapters)
        state = await self.aliases.set_alias(tenant_id, name, target, sticky=request.sticky)
        return api.SetAliasResponse(alias=alias_to_proto(state))

    async def GetAlias(self, request: Any, context: Any) -> api.GetAliasResponse:
        tenant_id = _required(request.tenant_id, "tenant_id")
        state = await self.aliases.get(tenant_id, _alias(tenant_id, request.alias))
        return api.GetAliasResponse(alias=alias_to_proto(state))

    async def ListAliases(self, request: Any, context: Any) -> api.ListAliasesResponse:
        page = await self.aliases.list(
            _required(request.tenant_id, "tenant_id"),
            page_size=_page_size(request.page.page_size), cursor=request.page.cursor,
        )  # fmt: skip
        return api.ListAliasesResponse(
            aliases=[alias_to_proto(a) for a in page.items],
            page=PageResponse(next_cursor=page.next_cursor),
        )

    async def DeleteAlias(self, request: Any, context: Any) -> api.DeleteAliasResponse:
        tenant_id = _required(request.tenant_id, "tenant_id")
        await self.aliases.delete(tenant_id, _alias(tenant_id, request.alias))
        return api.DeleteAliasResponse()

    async def SetSplit(self, request: Any, context: Any) -> api.SetSplitResponse:
        tenant_id = _required(request.tenant_id, "tenant_id")
        name = _alias(tenant_id, request.alias)
        expected = request.expected_revision if request.HasField("expected_revision") else None
        state = await self.aliases.set_split(
            tenant_id, name, [arm_from_proto(a) for a in request.arms], sticky=request.sticky,
            expected_revision=expected,
        )  # fmt: skip
        return api.SetSplitResponse(alias=alias_to_proto(state))

    async def Promote(self, request: Any, context: Any) -> api.PromoteResponse:
        tenant_id = _required(request.tenant_id, "tenant_id")
        name = _alias(tenant_id, request.alias)
        _ref(request.adapter)
        state = await self.aliases.promote(tenant_id, name, request.adapter, request.reason)
        return api.PromoteResponse(alias=alias_to_proto(state))

    async def Rollback(self, request: Any, context: Any) -> api.RollbackResponse:
        tenant_id = _required(request.tenant_id, "tenant_id")
        state = await self.aliases.rollback(
            tenant_id, _alias(tenant_id, request.alias), request.reason
        )
        return api.RollbackResponse(alias=alias_to_proto(state))

    # ---- generation ----------------------------------------------------------------------

    async def Generate(self, request: Any, context: Any) -> api.GenerateResponse:
        caller, path, body = _request(request)
        async with _engine_errors(context, request.model):
            served = await self.service.complete(caller, path, body)
        result = served.body
        chat = path == CHAT_PATH
        response = api.GenerateResponse(served_by=_served_by(result["served_by"]))
        for choice in sorted(result.get("choices", []), key=lambda c: int(c.get("index", 0))):
            response.choices.append(
                api.Choice(
                    index=int(choice.get("index", 0)),
                    text=choice_text(choice, chat),
                    finish_reason=_finish_reason(choice.get("finish_reason")),
                    generation_id=str(choice.get("generation_id") or ""),
                )
            )
        if result.get("usage"):
            response.usage.CopyFrom(_usage(result["usage"]))
        return response

    async def GenerateStream(
        self, request: Any, context: Any
    ) -> AsyncIterator[api.GenerateStreamResponse]:
        caller, path, body = _request(request.request)
        body["stream_options"] = {"include_usage": True}
        chat = path == CHAT_PATH
        async with _engine_errors(context, request.request.model):
            route, ids, payloads = await self.service.stream(caller, path, body)
        try:
            yield api.GenerateStreamResponse(
                served_by=_served_by(route.served_by(self.service.replica))
            )
            usage: dict[str, Any] | None = None
            async with _engine_errors(context, request.request.model):
                # Drained to the end: the generations are logged after the last chunk.
                async for payload in payloads:
                    if payload == "[DONE]":
                        continue
                    chunk = json.loads(payload)
                    if chunk.get("error"):  # the engine failed mid-stream
                        error = chunk["error"]
                        message = error.get("message") if isinstance(error, dict) else error
                        await context.abort(
                            grpc.StatusCode.UNAVAILABLE, f"the engine failed: {message}"
                        )
                    for choice in chunk.get("choices") or ():
                        index = int(choice.get("index", 0))
                        text = delta_text(choice, chat)
                        if text:
                            yield api.GenerateStreamResponse(
                                delta=api.ChoiceDelta(index=index, text=text)
                            )
                        if choice.get("finish_reason") is not None:
                            yield api.GenerateStreamResponse(
                                finished=api.Choice(
                                    index=index,
                                    finish_reason=_finish_reason(choice["finish_reason"]),
                                    generation_id=ids[index] if index < len(ids) else "",
                                )
                            )
                    usage = chunk.get("usage") or usage
            if usage:
                yield api.GenerateStreamResponse(usage=_usage(usage))
        finally:
            close = getattr(payloads, "aclose", None)
            if close is not None:  # a caller that went away stops the engine's decoding
                await close()
