"""The dataset service over gRPC, fed by a real feedback service on the same event log.

Both services run in the test's event loop on SQLite and the embedded log (the one-machine
default): feedback recorded, edited and retracted through the feedback service reaches the
dataset service's consumer; snapshots are built, read, downloaded and loaded with
``datasets``; ``flywheel dataset build`` from a feedback export and from the database gives
the same snapshot id as the service.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import datasets
import grpc
import pytest
from prometheus_client import REGISTRY

from flywheel.cli.main import main as flywheel
from flywheel.contracts.common.v1.common_pb2 import Prompt
from flywheel.contracts.dataset.v1 import resources_pb2 as ds
from flywheel.contracts.dataset.v1 import service_pb2 as dsapi
from flywheel.contracts.dataset.v1.service_pb2_grpc import DatasetServiceStub
from flywheel.contracts.feedback.v1 import resources_pb2 as fb
from flywheel.contracts.feedback.v1 import service_pb2 as fbapi
from flywheel.contracts.feedback.v1.service_pb2_grpc import FeedbackServiceStub
from flywheel.contracts.trainer.v1 import resources_pb2 as tr
from flywheel.core.errors import field_errors_of
from flywheel.core.testing.local_infra import free_port
from flywheel.core.testing.services import serving
from flywheel.dataset.server import build as build_dataset
from flywheel.feedback.server import build as build_feedback

CUTOFF = datetime(2099, 1, 1, tzinfo=UTC)


@dataclass
class Stack:
    feedback: FeedbackServiceStub
    dataset: DatasetServiceStub
    data_dir: Path


@pytest.fixture
async def stack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> AsyncIterator[Stack]:
    monkeypatch.setenv("FLYWHEEL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FLYWHEEL_METRICS_PORT", "0")
    monkeypatch.setenv("FLYWHEEL_POLICY_ENABLED", "false")
    # A test may set more of the environment with indirect parametrisation.
    for name, value in getattr(request, "param", {}).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FLYWHEEL_GRPC_PORT", str(free_port()))
    feedback_runtime = build_feedback()
    monkeypatch.setenv("FLYWHEEL_GRPC_PORT", str(free_port()))
    dataset_runtime = build_dataset()
    async with (
        serving(feedback_runtime),
        serving(dataset_runtime),
        grpc.aio.insecure_channel(f"127.0.0.1:{feedback_runtime.settings.grpc_port}") as f,
        grpc.aio.insecure_channel(f"127.0.0.1:{dataset_runtime.settings.grpc_port}") as d,
    ):
        yield Stack(FeedbackServiceStub(f), DatasetServiceStub(d), tmp_path / "data")


def spec(kind: ds.DatasetKind.ValueType, **fields: object) -> ds.SnapshotSpec:
    s = ds.SnapshotSpec(kind=kind, eval_fraction=0.25, seed=1, **fields)  # type: ignore[arg-type]
    s.cutoff.FromDatetime(CUTOFF)
    return s


async def record(stack: Stack, tenant: str, generation_id: str, value: fb.FeedbackValue) -> str:
    reply = await stack.feedback.RecordFeedback(
        fbapi.RecordFeedbackRequest(tenant_id=tenant, generation_id=generation_id, value=value)
    )
    return str(reply.feedback.feedback_id)


async def populate(stack: Stack) -> None:
    """Two tenants; for acme 12 prompts with rated outputs, preferences, an edit, a retraction."""
    for tenant in ("acme", "globex"):
        await stack.feedback.CreateTenant(fbapi.CreateTenantRequest(tenant_id=tenant))
    for p in range(12):
        ids = []
        for o in range(3):
            logged = await stack.feedback.LogGeneration(
                fbapi.LogGenerationRequest(
                    tenant_id="acme",
                    generation=fbapi.GenerationInput(
                        task="budgeting",
                        prompt=Prompt(text=f"Split budget {p} across retailers."),
                        output=f"Option {o} for budget {p}: {10 * (o + 1)}% to search.",
                        model="tiny",
                    ),
                )
            )
            ids.append(logged.generation.generation_id)
        for o, gid in enumerate(ids):
            await record(stack, "acme", gid, fb.FeedbackValue(rating=fb.Rating(value=5 - 2 * o)))
        pref = await record(
            stack,
            "acme",
            ids[0],
            fb.FeedbackValue(
                preference=fb.Preference(generation_b_id=ids[1], choice=fb.PREFERENCE_CHOICE_A)
            ),
        )
        if p == 0:  # the edit flips the pair; the retraction removes another one
            await stack.feedback.EditFeedback(
                fbapi.EditFeedbackRequest(
                    tenant_id="acme",
                    feedback_id=pref,
                    value=fb.FeedbackValue(
                        preference=fb.Preference(
                            generation_b_id=ids[1], choice=fb.PREFERENCE_CHOICE_B
                        )
                    ),
                )
            )
        if p == 1:
            await stack.feedback.RetractFeedback(
                fbapi.RetractFeedbackRequest(tenant_id="acme", feedback_id=pref)
            )


async def consumed(stack: Stack, rows: int) -> None:
    """Wait until a preview of the preference snapshot has ``rows`` rows."""
    for _ in range(200):
        preview = await stack.dataset.PreviewSnapshot(
            dsapi.PreviewSnapshotRequest(tenant_id="acme", spec=spec(ds.DATASET_KIND_PREFERENCE))
        )
        if preview.stats.train_rows + preview.stats.eval_rows == rows:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"preview never reached {rows} rows: {preview.stats}")


async def download(
    stack: Stack,
    snapshot_id: str,
    split: ds.Split.ValueType,
    fmt: ds.ExportFormat.ValueType = ds.EXPORT_FORMAT_TRL_JSONL,
) -> tuple[ds.SnapshotFile, bytes]:
    header, body = None, b""
    async for message in stack.dataset.DownloadSnapshot(
        dsapi.DownloadSnapshotRequest(
            tenant_id="acme",
            snapshot_id=snapshot_id,
            split=split,
            format=fmt,
        )
    ):
        if message.HasField("file"):
            header = message.file
        else:
            body += message.chunk
    assert header is not None
    return header, body


async def test_feedback_becomes_snapshots_the_cli_rebuilds_identically(
    stack: Stack, tmp_path: Path
) -> None:
    await populate(stack)
    # Per prompt: explicit a>b (p0: b>a after the edit; p1: retracted, so derived 5 vs 3?
    # no: margin rule pairs 5 >= 4 with 1 <= 2), derived a>c; and b>c never (3 is neither).
    await consumed(stack, rows=12 + 11)

    built = await stack.dataset.BuildSnapshot(
        dsapi.BuildSnapshotRequest(tenant_id="acme", spec=spec(ds.DATASET_KIND_PREFERENCE))
    )
    snapshot = built.snapshot
    assert built.created
    assert snapshot.snapshot_id.startswith("sha256:")
    assert snapshot.stats.train_rows + snapshot.stats.eval_rows == 23
    assert snapshot.stats.eval_rows > 0
    again = await stack.dataset.BuildSnapshot(
        dsapi.BuildSnapshotRequest(tenant_id="acme", spec=spec(ds.DATASET_KIND_PREFERENCE))
    )
    assert (again.created, again.snapshot.snapshot_id) == (False, snapshot.snapshot_id)

    header, body = await download(stack, snapshot.snapshot_id, ds.SPLIT_TRAIN)
    assert header.artifact.sha256 == hashlib.sha256(body).hexdigest()
    assert header.rows == snapshot.stats.train_rows
    train_file = tmp_path / "train.jsonl"
    train_file.write_bytes(body)
    loaded = datasets.load_dataset("json", data_files=str(train_file), split="train")
    assert loaded.column_names == ["chosen", "prompt", "rejected"]
    assert loaded.num_rows == snapshot.stats.train_rows
    flipped = [r for r in loaded if r["prompt"] == "Split budget 0 across retailers."]
    pairs = {(r["chosen"][:8], r["rejected"][:8]) for r in flipped}
    assert ("Option 1", "Option 0") in pairs or not flipped  # the edit won
    _, openai = await download(
        stack, snapshot.snapshot_id, ds.SPLIT_TRAIN, ds.EXPORT_FORMAT_OPENAI_PREFERENCE_JSONL
    )
    first = json.loads(openai.splitlines()[0])
    assert set(first) == {"input", "preferred_output", "non_preferred_output"}
    assert first["preferred_output"][0]["role"] == "assistant"

    listed = await stack.dataset.ListSnapshots(dsapi.ListSnapshotsRequest(tenant_id="acme"))
    assert [s.snapshot_id for s in listed.snapshots] == [snapshot.snapshot_id]

    # Another tenant learns nothing of it.
    with pytest.raises(grpc.aio.AioRpcError) as other:
        await stack.dataset.GetSnapshot(
            dsapi.GetSnapshotRequest(tenant_id="globex", snapshot_id=snapshot.snapshot_id)
        )
    assert other.value.code() == grpc.StatusCode.NOT_FOUND

    # The same build by hand: from a feedback export, and from the dataset database.
    export = tmp_path / "feedback.jsonl"
    with export.open("wb") as out:
        async for chunk in stack.feedback.ExportFeedback(
            fbapi.ExportFeedbackRequest(tenant_id="acme")
        ):
            out.write(chunk.jsonl_chunk)
    common = ["--kind", "dpo", "--eval-fraction", "0.25", "--seed", "1",
              "--cutoff", CUTOFF.isoformat()]  # fmt: skip
    # In a thread: the command runs its own event loop, as it does from a shell.
    assert await asyncio.to_thread(flywheel, ["dataset", "build", "--from-export", str(export),
                     "--output", str(tmp_path / "cli-export"), *common]) == 0  # fmt: skip
    from_export = json.loads((tmp_path / "cli-export" / "snapshot.json").read_text())
    assert from_export["snapshot_id"] == snapshot.snapshot_id
    db = f"sqlite+aiosqlite:///{stack.data_dir / 'dataset.sqlite3'}"
    by_hand = ["dataset", "build", "--database-url", db, "--tenant", "acme",
               "--output", str(tmp_path / "cli-db"), *common]  # fmt: skip
    assert await asyncio.to_thread(flywheel, by_hand) == 0
    from_db = json.loads((tmp_path / "cli-db" / "snapshot.json").read_text())
    assert from_db["snapshot_id"] == snapshot.snapshot_id
    assert (tmp_path / "cli-db" / "train.trl_jsonl.jsonl").read_bytes() == body

    # A new rating changes the data, so the next snapshot differs and diffs against this one.
    gen = await stack.feedback.LogGeneration(
        fbapi.LogGenerationRequest(
            tenant_id="acme",
            generation=fbapi.GenerationInput(
                task="budgeting",
                prompt=Prompt(text="Split budget 5 across retailers."),
                output="A brand new terrible answer.",
                model="tiny",
            ),
        )
    )
    await record(
        stack, "acme", gen.generation.generation_id, fb.FeedbackValue(rating=fb.Rating(value=1))
    )
    await consumed(stack, rows=24)
    newer = await stack.dataset.BuildSnapshot(
        dsapi.BuildSnapshotRequest(tenant_id="acme", spec=spec(ds.DATASET_KIND_PREFERENCE))
    )
    assert newer.created
    assert newer.snapshot.previous_snapshot_id == snapshot.snapshot_id
    diff = await stack.dataset.DiffSnapshots(
        dsapi.DiffSnapshotsRequest(
            tenant_id="acme",
            base_snapshot_id=snapshot.snapshot_id,
            target_snapshot_id=newer.snapshot.snapshot_id,
            sample_size=5,
        )
    )
    assert (diff.rows_added, diff.rows_removed, diff.rows_unchanged) == (1, 0, 23)
    assert diff.added_sample[0]["rejected"] == "A brand new terrible answer."


async def test_bad_requests_name_their_fields(stack: Stack) -> None:
    await populate(stack)
    await consumed(stack, rows=23)
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stack.dataset.PreviewSnapshot(
            dsapi.PreviewSnapshotRequest(
                tenant_id="acme",
                spec=spec(ds.DATASET_KIND_PREFERENCE, min_rating_chosen=9, tokenizer="/nope.json"),
            )
        )
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.min_rating_chosen" in {e.field for e in field_errors_of(bad.value)}

    for probe in ("/etc/passwd", "../../etc/hostname", "/definitely/missing.json"):
        with pytest.raises(grpc.aio.AioRpcError) as files:
            await stack.dataset.PreviewSnapshot(
                dsapi.PreviewSnapshotRequest(
                    tenant_id="acme", spec=spec(ds.DATASET_KIND_SFT, tokenizer=probe)
                )
            )
        # The same answer whether the file exists or not: callers cannot probe the server.
        assert [e.field for e in field_errors_of(files.value)] == ["spec.tokenizer"]
        assert "FLYWHEEL_DATASET_TOKENIZER_DIRS" in files.value.details()

    with pytest.raises(grpc.aio.AioRpcError) as empty:
        await stack.dataset.BuildSnapshot(
            dsapi.BuildSnapshotRequest(tenant_id="globex", spec=spec(ds.DATASET_KIND_SFT))
        )
    assert empty.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    snapshot = (
        await stack.dataset.BuildSnapshot(
            dsapi.BuildSnapshotRequest(tenant_id="acme", spec=spec(ds.DATASET_KIND_PREFERENCE))
        )
    ).snapshot
    made = await stack.dataset.RequestTraining(
        dsapi.RequestTrainingRequest(
            tenant_id="acme",
            snapshot_id=snapshot.snapshot_id,
            training=tr.TrainingSpec(base_model="tiny", adapter_name="acme-dpo"),
        )
    )
    request = made.training_request
    assert (request.spec.method, request.spec.dataset_snapshot_id) == (
        tr.TRAINING_METHOD_DPO,
        snapshot.snapshot_id,
    )
    with pytest.raises(grpc.aio.AioRpcError) as wrong:
        await stack.dataset.RequestTraining(
            dsapi.RequestTrainingRequest(
                tenant_id="acme",
                snapshot_id=snapshot.snapshot_id,
                training=tr.TrainingSpec(method=tr.TRAINING_METHOD_KTO),
            )
        )
    assert "training.method" in {e.field for e in field_errors_of(wrong.value)}

    policy = (
        await stack.dataset.GetTriggerPolicy(
            dsapi.GetTriggerPolicyRequest(tenant_id="acme", task="budgeting")
        )
    ).policy
    assert policy.enabled is False  # FLYWHEEL_POLICY_ENABLED=false in these tests
    policy.enabled, policy.min_new_examples = True, 500
    await stack.dataset.UpdateTriggerPolicy(
        dsapi.UpdateTriggerPolicyRequest(tenant_id="acme", policy=policy)
    )
    stored = (
        await stack.dataset.GetTriggerPolicy(
            dsapi.GetTriggerPolicyRequest(tenant_id="acme", task="budgeting")
        )
    ).policy
    assert (stored.enabled, stored.min_new_examples) == (True, 500)
    policy.tenant_id = "globex"
    with pytest.raises(grpc.aio.AioRpcError) as foreign:
        await stack.dataset.UpdateTriggerPolicy(
            dsapi.UpdateTriggerPolicyRequest(tenant_id="acme", policy=policy)
        )
    assert foreign.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "stack",
    [
        {
            "FLYWHEEL_POLICY_ENABLED": "true",
            "FLYWHEEL_POLICY_MIN_NEW_EXAMPLES": "1",
            "FLYWHEEL_DATASET_TOKENIZER": "/no/such/tokenizer.json",
        }
    ],
    indirect=True,
)
async def test_a_failing_policy_does_not_hold_up_consumption(stack: Stack) -> None:
    # Every policy run fails (its default tokenizer cannot load), yet every batch is
    # handled (and its offsets committed) rather than failed and redelivered forever.
    def count(name: str, labels: dict[str, str]) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    handler_failures = ("flywheel_event_handler_failures_total", {"group": "dataset"})
    policy_failures: tuple[str, dict[str, str]] = ("flywheel_dataset_policy_failures_total", {})
    before = count(*handler_failures), count(*policy_failures)
    await populate(stack)
    fixed = spec(ds.DATASET_KIND_PREFERENCE, tokenizer="builtin:regex")
    for _ in range(200):
        preview = await stack.dataset.PreviewSnapshot(
            dsapi.PreviewSnapshotRequest(tenant_id="acme", spec=fixed)
        )
        if preview.stats.train_rows + preview.stats.eval_rows == 23:
            break
        await asyncio.sleep(0.1)
    assert preview.stats.train_rows + preview.stats.eval_rows == 23
    listed = await stack.dataset.ListSnapshots(dsapi.ListSnapshotsRequest(tenant_id="acme"))
    assert list(listed.snapshots) == []  # the policy never got to build one
    assert count(*handler_failures) == before[0]
    assert count(*policy_failures) > before[1]
