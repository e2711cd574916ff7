"""Feedback posted through the gateway becomes a snapshot, training is requested on time,
and the trainer turns the request into an adapter.

The real stack as separate processes (`flywheel up` on PostgreSQL + Kafka): REST -> feedback
service -> outbox -> Kafka -> dataset service (consumer group ``dataset``) -> snapshot ->
``training.requested`` on Kafka -> trainer (consumer group ``trainer``) -> job process ->
adapter in the artifact store -> ``adapter.published`` on Kafka. The policy is set to fire
at 6 usable examples: after 5 nothing may be requested; the 6th triggers one DPO request
on a preference snapshot whose rows and lineage (feedback event ids) are exactly what was
posted, and exactly one job and one adapter come of it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import grpc
import httpx
import pytest
from kafka import KafkaConsumer

from flywheel.contracts.dataset.v1 import events_pb2 as de
from flywheel.contracts.dataset.v1 import resources_pb2 as ds
from flywheel.contracts.dataset.v1 import service_pb2 as dsapi
from flywheel.contracts.dataset.v1.service_pb2_grpc import DatasetServiceStub
from flywheel.contracts.feedback.v1 import events_pb2 as fe
from flywheel.contracts.trainer.v1 import events_pb2 as te
from flywheel.contracts.trainer.v1 import resources_pb2 as tr
from flywheel.contracts.trainer.v1 import service_pb2 as trapi
from flywheel.contracts.trainer.v1.service_pb2_grpc import TrainerServiceStub
from flywheel.core.artifacts import LocalArtifactStore
from flywheel.core.events.envelope import parse, unpack
from flywheel.core.testing.local_infra import LocalKafka
from flywheel.core.testing.stack import running_stack
from flywheel.trainer.bootstrap import bootstrap_model
from flywheel.trainer.testing import TINY

pytestmark = pytest.mark.integration

TENANT = "pipeline"


def _consumer(kafka: LocalKafka, topic: str, group: str) -> KafkaConsumer:
    return KafkaConsumer(
        topic,
        bootstrap_servers=kafka.bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        # The topics appear only once the services publish: look again every second
        # rather than after kafka-python's default five minutes.
        metadata_max_age_ms=1000,
    )


def _drain(consumer: KafkaConsumer, seconds: float, want: int = 10**9) -> list[Any]:
    """This test's tenant's envelopes polled for ``seconds`` (or until ``want`` arrived).

    Other tests share the broker and its topics, so other tenants' events are skipped.
    """
    found: list[Any] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(found) < want:
        for records in consumer.poll(timeout_ms=500).values():
            found += [e for e in map(parse, (r.value for r in records)) if e.tenant == TENANT]
    return found


def _preview_rows(stub: DatasetServiceStub, kind: ds.DatasetKind.ValueType) -> int:
    reply = stub.PreviewSnapshot(
        dsapi.PreviewSnapshotRequest(tenant_id=TENANT, spec=ds.SnapshotSpec(kind=kind)),
        timeout=30,
    )
    return int(reply.stats.train_rows + reply.stats.eval_rows)


def _wait_for(condition: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def test_feedback_through_the_gateway_becomes_a_snapshot_and_a_training_request(
    tmp_path: Path, pg_url: str, kafka: LocalKafka
) -> None:
    base_model = bootstrap_model(tmp_path / "models", TINY, progress=False)
    policy = {
        "FLYWHEEL_POLICY_MIN_NEW_EXAMPLES": "6",
        "FLYWHEEL_POLICY_MIN_PREFERENCE_PAIRS": "2",
        "FLYWHEEL_POLICY_COOLDOWN_S": "0",
        "FLYWHEEL_POLICY_BASE_MODEL": str(base_model),
        "FLYWHEEL_DATASET_EVAL_FRACTION": "0",
        "FLYWHEEL_TRAINER_POLL_S": "0.3",
    }
    training = _consumer(kafka, "flywheel.training.v1", "test-training")
    adapters = _consumer(kafka, "flywheel.adapters.v1", "test-adapters")
    feedback_events = _consumer(kafka, "flywheel.feedback.v1", "test-feedback")
    with (
        running_stack(tmp_path, pg_url, kafka.bootstrap, policy) as stack,
        grpc.insecure_channel(stack.grpc("dataset")) as channel,
        httpx.Client(
            base_url=stack.gateway,
            headers={"Authorization": f"Bearer {stack.key(TENANT, 'integrator')}"},
            timeout=30,
        ) as client,
    ):
        dataset = DatasetServiceStub(channel)

        def generation(prompt: str, output: str) -> str:
            response = client.post(
                "/v1/generations",
                json={"task": "budgeting", "prompt": prompt, "output": output, "model": "m"},
            )
            assert response.status_code == 201, response.text
            return str(response.json()["generation_id"])

        def feedback_on(generation_id: str, value: dict[str, Any]) -> str:
            response = client.post("/v1/feedback", json={"generation_id": generation_id, **value})
            assert response.status_code == 201, response.text
            return str(response.json()["feedback_id"])

        a1 = generation("Split 10k across search and display.", "70% search, 30% display.")
        a2 = generation("Split 10k across search and display.", "All of it on TV.")
        b1 = generation("Split 5k for a beauty launch.", "60% social, 40% search.")
        b2 = generation("Split 5k for a beauty launch.", "Print ads only.")
        c1 = generation("Split 8k for the holidays.", "Half search, half display.")
        mine = {
            "thumbs": feedback_on(a1, {"thumbs": "up"}),
            "b1": feedback_on(b1, {"rating": 5}),
            "b2": feedback_on(b2, {"rating": 1}),
            "pref": feedback_on(a1, {"preference": {"generation_b_id": a2, "choice": "a"}}),
            "fix": feedback_on(c1, {"correction": "60% search, 40% display."}),
        }
        feedback_on(c1, {"comment": "too vague"})  # not usable: never counts

        # Five usable examples are in once the SFT preview sees its three rows.
        _wait_for(lambda: _preview_rows(dataset, ds.DATASET_KIND_SFT) == 3, 60, "consumption")
        assert _drain(training, 3.0) == [], "training requested below the threshold"

        mine["down"] = feedback_on(a2, {"thumbs": "down"})  # the sixth
        requests = [e for e in _drain(training, 60.0, want=2) if e.type == "training.requested"]
        assert len(requests) == 1
        request = unpack(requests[0], de.TrainingRequested).request
        assert request.tenant_id == TENANT
        assert request.spec.method == tr.TRAINING_METHOD_DPO
        assert request.spec.base_model == str(base_model)
        assert request.reason.startswith("policy: 6 new examples")

        snapshot = dataset.GetSnapshot(
            dsapi.GetSnapshotRequest(
                tenant_id=TENANT, snapshot_id=request.spec.dataset_snapshot_id
            ),
            timeout=30,
        ).snapshot
        assert snapshot.trigger == ds.SNAPSHOT_TRIGGER_POLICY
        assert snapshot.spec.kind == ds.DATASET_KIND_PREFERENCE
        chunks = list(
            dataset.DownloadSnapshot(
                dsapi.DownloadSnapshotRequest(
                    tenant_id=TENANT, snapshot_id=snapshot.snapshot_id, split=ds.SPLIT_TRAIN
                ),
                timeout=30,
            )
        )
        header, body = chunks[0].file, b"".join(c.chunk for c in chunks[1:])
        rows = [json.loads(line) for line in body.decode().splitlines()]
        assert sorted(rows, key=lambda r: r["prompt"]) == [
            {"prompt": "Split 10k across search and display.",
             "chosen": "70% search, 30% display.", "rejected": "All of it on TV."},
            {"prompt": "Split 5k for a beauty launch.",
             "chosen": "60% social, 40% search.", "rejected": "Print ads only."},
            {"prompt": "Split 8k for the holidays.",  # the correction beats the original
             "chosen": "60% search, 40% display.", "rejected": "Half search, half display."},
        ]  # fmt: skip
        assert header.rows == 3

        # Lineage: each row points at exactly the feedback events it came from.
        event_of = {
            unpack(e, fe.FeedbackRecorded).feedback.feedback_id: e.event_id
            for e in _drain(feedback_events, 30.0, want=7)
            if e.type == "feedback.recorded"
        }
        lineage_path = Path(unquote(urlparse(snapshot.lineage.uri).path))
        lineage = [json.loads(line) for line in lineage_path.read_text().splitlines()]
        expected = {
            frozenset({event_of[mine["pref"]]}),  # the explicit preference a1 > a2
            # b1 > b2 derived from their ratings; a2's thumbs down does not judge b.
            frozenset({event_of[mine["b1"]], event_of[mine["b2"]]}),
            frozenset({event_of[mine["fix"]]}),
        }
        assert {frozenset(line["event_ids"]) for line in lineage} == expected
        assert snapshot.source_event_count == 4

        # The trainer made one job of the request, and the job one adapter.
        (published,) = _drain(adapters, 180.0, want=1)
        manifest = unpack(published, te.AdapterPublished).manifest
        assert manifest.lineage.training_request_id == request.training_request_id
        assert manifest.lineage.dataset_snapshot_id == snapshot.snapshot_id
        assert manifest.adapter.version == "v1"
        store = LocalArtifactStore(stack.data_dir / "artifacts")
        prefix = store.key_of(manifest.artifact.uri)
        for digest in manifest.files:
            assert store.info(f"{prefix}/{digest.path}").sha256 == digest.sha256
        with grpc.insecure_channel(stack.grpc("trainer")) as trainer_channel:
            jobs = (
                TrainerServiceStub(trainer_channel)
                .ListJobs(trapi.ListJobsRequest(tenant_id=TENANT), timeout=30)
                .jobs
            )
        assert [(j.state, j.adapter) for j in jobs] == [(tr.JOB_STATE_SUCCEEDED, manifest.adapter)]

        # Nothing new arrived: the policy stays quiet.
        # (the trainer's job events share the topic).
        assert [e for e in _drain(training, 3.0) if e.type == "training.requested"] == []
        assert _drain(adapters, 1.0) == []
    adapters.close()
    training.close()
    feedback_events.close()
