"""The protobuf contracts: generated code is complete and current, events travel in the
envelope, services have their rpcs, and the .proto files alone suffice to decode events.

Needs the generated package: run `scripts/gen_proto.sh` (`make proto`) first.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import (
    Descriptor,
    FieldDescriptor,
    FileDescriptor,
    ServiceDescriptor,
)
from google.protobuf.message import Message

REPO = Path(__file__).resolve().parents[3]
PROTO_ROOT = REPO / "proto"
PROTO_FILES = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in PROTO_ROOT.rglob("*.proto"))
SERVICE_FILES = [f for f in PROTO_FILES if f.endswith("/service.proto")]

try:
    from flywheel.contracts.common.v1 import common_pb2
    from flywheel.contracts.events.v1 import envelope_pb2
    from flywheel.contracts.feedback.v1 import events_pb2 as feedback_events_pb2
    from flywheel.contracts.feedback.v1 import resources_pb2 as feedback_pb2
except ImportError as exc:  # pragma: no cover - only without generated code
    raise ImportError(
        "flywheel.contracts is not generated: run scripts/gen_proto.sh (make proto)"
    ) from exc


def _module_name(proto_file: str, suffix: str = "_pb2") -> str:
    return proto_file.removesuffix(".proto").replace("/", ".") + suffix


def _modules() -> Iterator[ModuleType]:
    for f in PROTO_FILES:
        yield importlib.import_module(_module_name(f))


def _messages(desc: Descriptor | FileDescriptor) -> Iterator[Descriptor]:
    children = (
        desc.message_types_by_name.values()
        if isinstance(desc, FileDescriptor)
        else desc.nested_types
    )
    for child in children:
        yield child
        yield from _messages(child)


def _event_options(desc: Descriptor) -> envelope_pb2.EventOptions | None:
    options = desc.GetOptions()
    if not options.HasExtension(envelope_pb2.event):
        return None
    return options.Extensions[envelope_pb2.event]


def _event_messages() -> dict[str, tuple[envelope_pb2.EventOptions, str]]:
    """Full message name -> (its `event` option, its file), for every event message."""
    found = {}
    for module in _modules():
        for desc in _messages(module.DESCRIPTOR):
            opts = _event_options(desc)
            if opts is not None:
                found[desc.full_name] = (opts, desc.file.name)
    return found


def _wrap(event: Message, tenant: str, source_service: str) -> envelope_pb2.Envelope:
    """What a producer does: the envelope's type comes from the payload's own option."""
    desc = cast(Descriptor, event.DESCRIPTOR)
    opts = _event_options(desc)
    assert opts is not None, f"{event.DESCRIPTOR.full_name} is not an event"
    env = envelope_pb2.Envelope(
        event_id=str(uuid.uuid4()),
        type=opts.type,
        tenant=tenant,
        schema_version=1,
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        source_service=source_service,
    )
    env.occurred_at.GetCurrentTime()
    env.payload.Pack(event)
    return env


def _sample_feedback_recorded() -> feedback_events_pb2.FeedbackRecorded:
    prompt = common_pb2.Prompt(
        messages=common_pb2.ChatMessages(
            messages=[
                common_pb2.ChatMessage(role="system", content="You allocate ad budgets."),
                common_pb2.ChatMessage(role="user", content="Split $10k across 3 retailers."),
            ]
        )
    )
    adapter = common_pb2.AdapterRef(name="acme-budgeting-dpo", version="v3")
    gen_a = feedback_pb2.Generation(
        generation_id=str(uuid.uuid4()),
        tenant_id="acme",
        task="budgeting",
        prompt=prompt,
        prompt_hash="ab" * 32,
        output="Retailer A: 50%, B: 30%, C: 20%",
        model="acme/budgeting",
        base_model="flywheel-tiny",
        adapter=adapter,
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=128),
    )
    gen_b = feedback_pb2.Generation()
    gen_b.CopyFrom(gen_a)
    gen_b.generation_id = str(uuid.uuid4())
    gen_b.output = "Retailer A: 90%, B: 30%, C: 20%"
    gen_b.ClearField("adapter")
    feedback = feedback_pb2.Feedback(
        feedback_id=str(uuid.uuid4()),
        tenant_id="acme",
        generation_id=gen_a.generation_id,
        value=feedback_pb2.FeedbackValue(
            preference=feedback_pb2.Preference(
                generation_b_id=gen_b.generation_id,
                choice=feedback_pb2.PREFERENCE_CHOICE_A,
                strength=0.75,
            )
        ),
        source=feedback_pb2.FeedbackSource(
            kind=feedback_pb2.SOURCE_KIND_SYNTHETIC, critic="budget_checker"
        ),
        dimension_scores=[
            common_pb2.DimensionScore(
                dimension="budget_arithmetic", score=1.0, evaluator="retail_media.budget"
            )
        ],
        revision=1,
        task="budgeting",
        adapter=adapter,
    )
    feedback.metadata.update({"ui": "rater", "batch": 7})
    return feedback_events_pb2.FeedbackRecorded(
        feedback=feedback, generation=gen_a, generation_b=gen_b
    )


# --- (a) generated code: every module imports and matches the .proto files -----------


def test_proto_files_found() -> None:
    assert len(PROTO_FILES) >= 8, PROTO_FILES
    areas = {f.split("/")[2] for f in PROTO_FILES}
    assert {"events", "common", "feedback", "dataset", "trainer", "inference"} <= areas
    assert {"critic", "gateway"} <= areas


@pytest.mark.parametrize("proto_file", PROTO_FILES)
def test_every_generated_module_imports(proto_file: str) -> None:
    module = importlib.import_module(_module_name(proto_file))
    assert module.DESCRIPTOR.name == proto_file
    assert module.DESCRIPTOR.package == (
        "flywheel.contracts." + ".".join(proto_file.split("/")[2:4])
    )
    # Typed stubs sit next to the module, so imports from our code type-check.
    assert Path(module.__file__ or "").with_suffix(".pyi").is_file()
    if proto_file in SERVICE_FILES:
        grpc_module = importlib.import_module(_module_name(proto_file, "_pb2_grpc"))
        for service in module.DESCRIPTOR.services_by_name:
            assert hasattr(grpc_module, f"{service}Stub")
            assert hasattr(grpc_module, f"add_{service}Servicer_to_server")


def test_generated_package_is_typed() -> None:
    package = importlib.import_module("flywheel.contracts")
    assert (Path(package.__file__ or "").parent / "py.typed").is_file()


# --- (b) an event round-trips through the envelope -------------------------------------


def test_envelope_round_trips_feedback_recorded() -> None:
    event = _sample_feedback_recorded()
    env = _wrap(event, tenant="acme", source_service="feedback")

    wire = env.SerializeToString()
    decoded = envelope_pb2.Envelope.FromString(wire)

    assert decoded == env
    assert decoded.type == "feedback.recorded"
    assert decoded.tenant == "acme"
    assert str(uuid.UUID(decoded.event_id)) == decoded.event_id
    assert decoded.payload.type_url == (
        "type.googleapis.com/flywheel.contracts.feedback.v1.FeedbackRecorded"
    )
    assert decoded.payload.Is(feedback_events_pb2.FeedbackRecorded.DESCRIPTOR)
    assert not decoded.payload.Is(feedback_events_pb2.FeedbackRetracted.DESCRIPTOR)

    payload = feedback_events_pb2.FeedbackRecorded()
    assert decoded.payload.Unpack(payload)
    assert payload == event
    assert payload.feedback.value.WhichOneof("kind") == "preference"
    assert payload.feedback.value.preference.HasField("strength")
    assert payload.feedback.value.preference.strength == pytest.approx(0.75)
    assert payload.generation.adapter.version == "v3"
    # Presence survives the wire: B was served by the base model, not an adapter.
    assert not payload.generation_b.HasField("adapter")
    assert payload.generation.sampling.HasField("temperature")
    assert not payload.generation.sampling.HasField("top_p")
    assert payload.feedback.metadata["batch"] == 7


def test_unpack_into_wrong_type_is_refused() -> None:
    env = _wrap(_sample_feedback_recorded(), tenant="acme", source_service="feedback")
    wrong = feedback_events_pb2.GenerationLogged()
    assert not env.payload.Unpack(wrong)


# --- (c) services and events are structurally complete ---------------------------------

# rpcs the services' issues rely on; a service may have more.
EXPECTED_RPCS = {
    "flywheel.contracts.feedback.v1.FeedbackService": {
        "CreateTenant", "CreateApiKey", "AuthenticateApiKey", "RevokeApiKey",
        "LogGeneration", "GetGeneration", "ListGenerations",
        "RecordFeedback", "EditFeedback", "RetractFeedback", "ListFeedback",
        "GetFeedbackStats", "ExportFeedback",
    },
    "flywheel.contracts.dataset.v1.DatasetService": {
        "BuildSnapshot", "PreviewSnapshot", "GetSnapshot", "ListSnapshots",
        "DiffSnapshots", "DownloadSnapshot", "RequestTraining",
    },
    "flywheel.contracts.trainer.v1.TrainerService": {
        "SubmitJob", "GetJob", "ListJobs", "CancelJob", "RetryJob", "WatchJob",
        "ListAdapters", "GetAdapter",
    },
    "flywheel.contracts.inference.v1.InferenceService": {
        "RegisterAdapter", "LoadAdapter", "UnloadAdapter", "ListAdapters",
        "SetAlias", "SetSplit", "Promote", "Rollback", "Generate", "GenerateStream",
    },
    "flywheel.contracts.critic.v1.CriticService": {
        "Score", "ScoreBatch", "ListEvaluators", "GetActiveLearningQueue",
    },
    "flywheel.contracts.gateway.v1.GatewayService": {"GetRateLimitStatus"},
}  # fmt: skip

SERVER_STREAMING = {
    "FeedbackService.ExportFeedback",
    "DatasetService.DownloadSnapshot",
    "TrainerService.WatchJob",
    "TrainerService.StreamJobLogs",
    "InferenceService.GenerateStream",
}

# Requests that need no tenant_id, and why.
TENANTLESS_REQUESTS = {
    "ListTenantsRequest": "admin listing across tenants",
    "AuthenticateApiKeyRequest": "the secret determines the tenant",
    "ListEvaluatorsRequest": "evaluators come from installed plug-ins, not tenants",
    "GenerateStreamRequest": "wraps a GenerateRequest, which carries tenant_id",
    "BatchRecordFeedbackRequest": "wraps RecordFeedbackRequests, each with its tenant_id",
}


def _services() -> dict[str, ServiceDescriptor]:
    found = {}
    for f in SERVICE_FILES:
        module = importlib.import_module(_module_name(f))
        for service in module.DESCRIPTOR.services_by_name.values():
            found[service.full_name] = service
    return found


def test_every_service_has_its_rpcs() -> None:
    services = _services()
    assert set(services) == set(EXPECTED_RPCS)
    for name, expected in EXPECTED_RPCS.items():
        rpcs = {m.name for m in services[name].methods}
        assert expected <= rpcs, f"{name} lacks {sorted(expected - rpcs)}"


def test_rpcs_follow_request_response_conventions() -> None:
    streaming = set()
    for service in _services().values():
        for method in service.methods:
            assert method.input_type.name == f"{method.name}Request"
            assert method.output_type.name == f"{method.name}Response"
            assert method.input_type.file.package == service.file.package
            assert not method.client_streaming
            if method.server_streaming:
                streaming.add(f"{service.name}.{method.name}")
            if method.input_type.name not in TENANTLESS_REQUESTS:
                field = method.input_type.fields_by_name.get("tenant_id")
                assert field is not None, f"{method.full_name} takes no tenant_id"
                assert field.type == FieldDescriptor.TYPE_STRING
    assert streaming == SERVER_STREAMING


def test_generate_stream_request_is_tenant_scoped_through_generate_request() -> None:
    from flywheel.contracts.inference.v1 import service_pb2 as inference_pb2

    field = inference_pb2.GenerateStreamRequest.DESCRIPTOR.fields_by_name["request"]
    assert field.message_type is inference_pb2.GenerateRequest.DESCRIPTOR
    assert "tenant_id" in inference_pb2.GenerateRequest.DESCRIPTOR.fields_by_name


def test_events_declare_type_and_topic() -> None:
    events = _event_messages()
    types = {opts.type: name for name, (opts, _) in events.items()}
    assert len(types) == len(events), "two event messages share a type"
    assert set(types) >= {
        "feedback.recorded", "feedback.edited", "feedback.retracted", "generation.logged",
        "dataset.snapshot_created", "training.requested", "training.job_status_changed",
        "adapter.published", "adapter.rejected", "adapter.promoted",
    }  # fmt: skip
    topics = {
        "feedback": "flywheel.feedback.v1",
        "generation": "flywheel.generations.v1",
        "dataset": "flywheel.datasets.v1",
        "training": "flywheel.training.v1",
        "adapter": "flywheel.adapters.v1",
    }
    for name, (opts, file) in events.items():
        assert re.fullmatch(r"[a-z]+\.[a-z_]+", opts.type), f"{name}: bad type {opts.type!r}"
        entity = opts.type.split(".")[0]
        assert opts.topic == topics[entity], f"{name}: {opts.type} on {opts.topic}"
        # Events live in their area's events.proto, apart from its rpc messages.
        assert file.endswith("/events.proto"), f"{name} is defined in {file}"


# --- (d) the .proto files alone are enough for an outside consumer ----------------------


@pytest.fixture(scope="module")
def raw_descriptor_set(
    tmp_path_factory: pytest.TempPathFactory,
) -> descriptor_pb2.FileDescriptorSet:
    """Compiles the raw .proto files with protoc, as another team would."""
    out = tmp_path_factory.mktemp("outside") / "contracts.binpb"
    result = subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--descriptor_set_out={out}",
            "--include_imports",
            *PROTO_FILES,
        ],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _without_json_names(
    file: descriptor_pb2.FileDescriptorProto,
) -> descriptor_pb2.FileDescriptorProto:
    """protoc's Python generator leaves out json_name (derivable); drop it to compare."""
    copy = descriptor_pb2.FileDescriptorProto()
    copy.CopyFrom(file)
    pending = list(copy.message_type)
    while pending:
        msg = pending.pop()
        for field in [*msg.field, *msg.extension]:
            field.ClearField("json_name")
        pending.extend(msg.nested_type)
    for ext in copy.extension:
        ext.ClearField("json_name")
    return copy


def test_generated_code_is_current(raw_descriptor_set: descriptor_pb2.FileDescriptorSet) -> None:
    """A stale generated package (proto edited, gen_proto.sh not rerun) fails here."""
    raw = {f.name: f for f in raw_descriptor_set.file}
    for proto_file in PROTO_FILES:
        generated = descriptor_pb2.FileDescriptorProto.FromString(
            importlib.import_module(_module_name(proto_file)).DESCRIPTOR.serialized_pb
        )
        assert _without_json_names(generated) == _without_json_names(raw[proto_file]), (
            f"{proto_file} changed since generation: run scripts/gen_proto.sh"
        )


def test_outside_consumer_decodes_envelope_from_protos_alone(
    raw_descriptor_set: descriptor_pb2.FileDescriptorSet,
) -> None:
    event = _sample_feedback_recorded()
    wire = _wrap(event, tenant="acme", source_service="feedback").SerializeToString()

    # A pool of its own, built only from the compiled .proto files: nothing of our
    # generated package (or the default pool it registered into) is used below.
    pool = descriptor_pool.DescriptorPool()
    for file_proto in raw_descriptor_set.file:
        pool.Add(file_proto)
    envelope_cls = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("flywheel.contracts.events.v1.Envelope")
    )
    assert envelope_cls is not envelope_pb2.Envelope
    assert envelope_cls.DESCRIPTOR.file.pool is pool

    # Classes made at run time: no static types, as for any dynamic consumer.
    env: Any = envelope_cls.FromString(wire)
    assert env.type == "feedback.recorded"
    assert env.tenant == "acme"
    assert env.schema_version == 1

    # Resolve the Any the way any language does: type_url -> descriptor -> parse.
    type_name = env.payload.type_url.rsplit("/", 1)[-1]
    payload_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName(type_name))
    payload: Any = payload_cls.FromString(env.payload.value)
    assert payload.feedback.feedback_id == event.feedback.feedback_id
    assert payload.feedback.value.WhichOneof("kind") == "preference"
    assert payload.feedback.value.preference.generation_b_id == event.generation_b.generation_id
    assert payload.feedback.source.critic == "budget_checker"
    assert payload.generation.prompt.messages.messages[1].content.startswith("Split $10k")
    assert payload.SerializeToString(deterministic=True) == event.SerializeToString(
        deterministic=True
    )

    # JSON for humans and log pipelines, again with only the consumer's pool.
    as_json = json_format.MessageToDict(env, descriptor_pool=pool)
    assert as_json["payload"]["@type"].endswith(".FeedbackRecorded")
    assert as_json["payload"]["feedback"]["value"]["preference"]["choice"] == (
        "PREFERENCE_CHOICE_A"
    )
