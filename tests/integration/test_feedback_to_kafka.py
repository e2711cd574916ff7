"""Feedback end to end on the real stack, as separate processes:

REST (gateway) -> gRPC -> feedback service -> PostgreSQL (row + outbox, one transaction)
-> relay -> Kafka -> a plain kafka-python consumer that decodes the events with nothing but
the published .proto files (compiled here with protoc, not our generated package).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc_tools
import httpx
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from kafka import KafkaConsumer

from flywheel.core.testing.local_infra import LocalKafka, repo_root
from flywheel.core.testing.stack import running_stack

pytestmark = pytest.mark.integration

# A tenant of this test's own: the broker, and so the topics, are shared with other tests.
TENANT = "kafka-contract"


def _outside_pool(tmp_path: Path) -> descriptor_pool.DescriptorPool:
    """A descriptor pool built from the raw .proto files alone, as another team would."""
    proto_dir = repo_root() / "proto"
    files = sorted(str(p.relative_to(proto_dir)) for p in proto_dir.rglob("*.proto"))
    out = tmp_path / "contracts.pb"
    include = Path(grpc_tools.__file__).parent / "_proto"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}", f"-I{include}",
         "--include_imports", f"--descriptor_set_out={out}", *files],
        check=True, cwd=proto_dir,
    )  # fmt: skip
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file:
        pool.Add(file)
    return pool


def _decode(pool: descriptor_pool.DescriptorPool, value: bytes) -> dict[str, Any]:
    envelope_type = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("flywheel.contracts.events.v1.Envelope")
    )
    envelope: Any = envelope_type.FromString(value)  # a dynamic message: no static type
    payload_name = envelope.payload.type_url.split("/", 1)[1]
    payload: Any = message_factory.GetMessageClass(pool.FindMessageTypeByName(payload_name))()
    envelope.payload.Unpack(payload)
    return {
        "type": envelope.type,
        "tenant": envelope.tenant,
        "event_id": envelope.event_id,
        "payload": json_format.MessageToDict(payload, preserving_proto_field_name=True),
    }


def test_each_feedback_kind_reaches_kafka_decodable_from_the_protos(
    tmp_path: Path, pg_url: str, kafka: LocalKafka
) -> None:
    with running_stack(tmp_path, pg_url, kafka.bootstrap) as stack:
        headers = {"Authorization": f"Bearer {stack.key(TENANT, 'integrator')}"}
        with httpx.Client(base_url=stack.gateway, headers=headers, timeout=30) as client:
            generations = []
            for output in ("70% search", "50% search"):
                response = client.post(
                    "/v1/generations",
                    json={"task": "budgeting", "prompt": "Split 10k", "output": output,
                          "model": "acme/budgeting",
                          "adapter": {"name": "acme-budget", "version": "v1"}},
                )  # fmt: skip
                assert response.status_code == 201, response.text
                generations.append(response.json()["generation_id"])
            a, b = generations
            values: list[dict[str, Any]] = [
                {"thumbs": "up"},
                {"rating": 4},
                {"comment": "good split"},
                {"preference": {"generation_b_id": b, "choice": "b", "strength": 0.5}},
                {"correction": "60% search"},
            ]
            for value in values:
                body: dict[str, Any] = {"generation_id": a, **value}
                response = client.post("/v1/feedback", json=body)
                assert response.status_code == 201, response.text

        pool = _outside_pool(tmp_path)
        consumer = KafkaConsumer(
            "flywheel.feedback.v1",
            "flywheel.generations.v1",
            bootstrap_servers=kafka.bootstrap,
            group_id="outside-team",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + 60
        while len(events) < 7 and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=1000).values():
                decoded = [_decode(pool, r.value) | {"key": r.key} for r in records]
                # Other tests share the broker and its topics: only this tenant's count.
                events += [e for e in decoded if e["key"] == TENANT.encode()]
        consumer.close()

    logged = [e for e in events if e["type"] == "generation.logged"]
    recorded = [e for e in events if e["type"] == "feedback.recorded"]
    assert len(logged) == 2
    assert len(recorded) == 5
    assert all(e["tenant"] == TENANT for e in events)
    assert len({e["event_id"] for e in events}) == 7
    by_kind = {next(iter(e["payload"]["feedback"]["value"])): e["payload"] for e in recorded}
    assert by_kind["thumbs"]["feedback"]["value"] == {"thumbs": "THUMB_UP"}
    assert by_kind["rating"]["feedback"]["value"] == {"rating": {"value": 4}}
    assert by_kind["comment"]["feedback"]["value"] == {"comment": {"text": "good split"}}
    assert by_kind["correction"]["feedback"]["value"] == {"correction": {"output": "60% search"}}
    preference = by_kind["preference"]
    assert preference["feedback"]["value"]["preference"]["choice"] == "PREFERENCE_CHOICE_B"
    assert preference["generation_b"]["generation_id"] == b
    assert all(e["payload"]["generation"]["output"] == "70% search" for e in recorded)
    assert all(e["payload"]["feedback"]["adapter"]["name"] == "acme-budget" for e in recorded)
