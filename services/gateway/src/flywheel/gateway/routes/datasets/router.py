"""Datasets of the caller's tenant: snapshots (build, preview, read, diff, download),
training requests and trigger policies, through the dataset service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Path, Query, Response
from fastapi.responses import StreamingResponse

from flywheel.contracts.dataset.v1 import service_pb2
from flywheel.gateway.deps import DatasetBuildRpcDep, DatasetManagerDep, DatasetRpcDep
from flywheel.gateway.problems import ProblemError
from flywheel.gateway.routes.common import Cursor, Limit, Page
from flywheel.gateway.routes.datasets.mapping import (
    FORMAT_TO_PROTO,
    KIND_TO_PROTO,
    SPLIT_TO_PROTO,
    diff_fields,
    diff_of,
    list_fields,
    policy_fields,
    policy_of,
    preview_of,
    snapshot_of,
    snapshot_spec,
    training_fields,
    training_request,
    training_request_of,
    trigger_policy,
)
from flywheel.gateway.routes.datasets.protocol import (
    DatasetKind,
    ExportFormat,
    Snapshot,
    SnapshotBuild,
    SnapshotDiff,
    SnapshotPreview,
    SnapshotPreviewResult,
    Split,
    TrainingRequest,
    TrainingRequestCreate,
    TriggerPolicy,
    TriggerPolicyUpdate,
)
from flywheel.gateway.routes.training_spec import SNAPSHOT_ID_PATTERN
from flywheel.gateway.routing import next_cursor, page_request, v1_router

router = v1_router(tags=["datasets"], extra_problems=(404, 409))

_ROLES = "Integrator or admin keys (the key's own tenant)."

SnapshotId = Annotated[
    str,
    Path(pattern=SNAPSHOT_ID_PATTERN, description="`sha256:<hex>`, as the snapshot gives it."),
]
Task = Annotated[str, Path(min_length=1, max_length=63, description="Task type name.")]
SampleSize = Annotated[
    int, Query(ge=0, le=100, description="Example rows of each side to return; 0: none.")
]

SHA256_HEADER = "X-Content-SHA256"
ROWS_HEADER = "X-Row-Count"


@router.post(
    "/datasets/snapshots",
    status_code=201,
    response_model=Snapshot,
    summary="Build a snapshot",
    description=f"{_ROLES} Curates the tenant's feedback (as of now, or the spec's "
    "`cutoff`) into train and eval files of the spec's kind and stores them as an "
    "immutable snapshot whose id is the sha256 of its data. 201 when new; 200 with the "
    "existing snapshot when the same data was built before. 409 when no row survives "
    "curation (see the preview for why).",
    responses={200: {"description": "An identical snapshot existed and is returned"}},
)
async def build_snapshot(
    body: SnapshotBuild, response: Response, caller: DatasetManagerDep, rpc: DatasetBuildRpcDep
) -> Snapshot:
    reply = await rpc(
        rpc.stub.BuildSnapshot,
        service_pb2.BuildSnapshotRequest(tenant_id=caller.tenant_id, spec=snapshot_spec(body.spec)),
    )
    snapshot = snapshot_of(reply.snapshot)
    response.status_code = 201 if reply.created else 200
    response.headers["Location"] = f"/v1/datasets/snapshots/{snapshot.snapshot_id}"
    return snapshot


@router.post(
    "/datasets/snapshots/preview",
    response_model=SnapshotPreviewResult,
    summary="Preview a snapshot",
    description=f"{_ROLES} What building the spec now would give: its stats, the rows "
    "dropped by reason, and up to `sample_size` (0-100) rows in TRL's columns. Nothing "
    "is stored.",
)
async def preview_snapshot(
    body: SnapshotPreview, caller: DatasetManagerDep, rpc: DatasetBuildRpcDep
) -> SnapshotPreviewResult:
    reply = await rpc(
        rpc.stub.PreviewSnapshot,
        service_pb2.PreviewSnapshotRequest(
            tenant_id=caller.tenant_id,
            spec=snapshot_spec(body.spec),
            sample_size=body.sample_size,
        ),
    )
    return preview_of(reply)


@router.get(
    "/datasets/snapshots",
    response_model=Page[Snapshot],
    summary="List snapshots",
    description=f"{_ROLES} Newest first, optionally of one task and kind. Cursor "
    "pagination: pass `next_cursor` back as `cursor` with the same filters.",
)
async def list_snapshots(
    caller: DatasetManagerDep,
    rpc: DatasetRpcDep,
    task: Annotated[str | None, Query(max_length=63, description="Task type name.")] = None,
    kind: Annotated[DatasetKind | None, Query(description="Dataset kind.")] = None,
    cursor: Cursor = None,
    limit: Limit = 50,
) -> Page[Snapshot]:
    request = service_pb2.ListSnapshotsRequest(
        tenant_id=caller.tenant_id, page=page_request(cursor, limit)
    )
    if task is not None:
        request.task = task
    if kind is not None:
        request.kind = KIND_TO_PROTO[kind]
    reply = await rpc(rpc.stub.ListSnapshots, request, fields=list_fields)
    return Page[Snapshot](
        items=[snapshot_of(s) for s in reply.snapshots], next_cursor=next_cursor(reply.page)
    )


@router.get(
    "/datasets/snapshots/{snapshot_id}",
    response_model=Snapshot,
    summary="Get a snapshot",
    description=f"{_ROLES} Its resolved spec, stats, quality report, files (with their "
    "sha256) and lineage.",
)
async def get_snapshot(
    snapshot_id: SnapshotId, caller: DatasetManagerDep, rpc: DatasetRpcDep
) -> Snapshot:
    reply = await rpc(
        rpc.stub.GetSnapshot,
        service_pb2.GetSnapshotRequest(tenant_id=caller.tenant_id, snapshot_id=snapshot_id),
    )
    return snapshot_of(reply.snapshot)


@router.get(
    "/datasets/snapshots/{snapshot_id}/diff",
    response_model=SnapshotDiff,
    summary="Compare two snapshots",
    description=f"{_ROLES} Rows (matched by content) added in this snapshot since `base`, "
    "removed from it, and unchanged, with both sides' stats and up to `sample_size` "
    "example rows of each change.",
)
async def diff_snapshots(
    snapshot_id: SnapshotId,
    caller: DatasetManagerDep,
    rpc: DatasetBuildRpcDep,
    base: Annotated[
        str, Query(pattern=SNAPSHOT_ID_PATTERN, description="Snapshot to compare against.")
    ],
    sample_size: SampleSize = 0,
) -> SnapshotDiff:
    reply = await rpc(
        rpc.stub.DiffSnapshots,
        service_pb2.DiffSnapshotsRequest(
            tenant_id=caller.tenant_id,
            base_snapshot_id=base,
            target_snapshot_id=snapshot_id,
            sample_size=sample_size,
        ),
        fields=diff_fields,
    )
    return diff_of(reply, base, snapshot_id)


@router.get(
    "/datasets/snapshots/{snapshot_id}/files/{split}",
    response_class=StreamingResponse,
    summary="Download a snapshot file",
    description=f"{_ROLES} Streams the split's file as JSON lines: `trl_jsonl` (TRL's "
    "columns, loadable with `datasets.load_dataset('json', ...)`) or "
    "`openai_preference_jsonl` (preference kinds only). "
    f"`{SHA256_HEADER}` holds the hex sha256 of the whole file and `{ROWS_HEADER}` its "
    "rows: check them once the body is read, since a stream cut short by a server error "
    "ends early.",
    responses={
        200: {
            "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
            "headers": {
                SHA256_HEADER: {
                    "description": "Hex sha256 of the file.",
                    "schema": {"type": "string"},
                },
                ROWS_HEADER: {"description": "Rows in the file.", "schema": {"type": "integer"}},
            },
        }
    },
)
async def download_snapshot_file(
    snapshot_id: SnapshotId,
    split: Annotated[Split, Path(description="`train` or `eval`.")],
    caller: DatasetManagerDep,
    rpc: DatasetRpcDep,
    format_: Annotated[
        ExportFormat, Query(alias="format", description="File layout.")
    ] = ExportFormat.TRL_JSONL,
) -> StreamingResponse:
    messages = await rpc.stream(
        rpc.stub.DownloadSnapshot,
        service_pb2.DownloadSnapshotRequest(
            tenant_id=caller.tenant_id,
            snapshot_id=snapshot_id,
            split=SPLIT_TO_PROTO[split],
            format=FORMAT_TO_PROTO[format_],
        ),
    )
    # The service sends the file's metadata first: headers go out before any byte.
    header: Any = await anext(messages, None)
    if header is None or header.WhichOneof("content") != "file":
        await messages.aclose()
        raise ProblemError(502, "upstream-error", "A service behind the gateway failed.")
    file = header.file

    async def body() -> AsyncIterator[bytes]:
        async for message in messages:
            if message.chunk:
                yield bytes(message.chunk)

    name = f"{snapshot_id.removeprefix('sha256:')[:16]}-{split.value}.{format_.value}.jsonl"
    return StreamingResponse(
        body(),
        media_type="application/x-ndjson",
        headers={
            SHA256_HEADER: file.artifact.sha256,
            ROWS_HEADER: str(file.rows),
            "Content-Disposition": f'attachment; filename="{name}"',
        },
    )


@router.post(
    "/datasets/training-requests",
    status_code=201,
    response_model=TrainingRequest,
    summary="Request training",
    description=f"{_ROLES} Asks the trainer to train on a snapshot (`snapshot_id`) or on "
    "one built now from `snapshot_spec`. `training.method` must suit the snapshot's kind "
    "(sft: sft, grpo, rloo; preference: dpo, orpo, grpo, rloo; unpaired: kto; reward: "
    "reward); null picks the kind's usual one. 404 for an unknown snapshot, 409 when a "
    "spec gives no usable rows.",
)
async def request_training(
    body: TrainingRequestCreate, caller: DatasetManagerDep, rpc: DatasetBuildRpcDep
) -> TrainingRequest:
    reply = await rpc(
        rpc.stub.RequestTraining,
        training_request(caller.tenant_id, body),
        fields=training_fields,
    )
    return training_request_of(reply.training_request)


@router.get(
    "/datasets/policies/{task}",
    response_model=TriggerPolicy,
    summary="Get a task's trigger policy",
    description=f"{_ROLES} When the dataset service requests training for this task by "
    "itself; the service's defaults until one is set.",
)
async def get_policy(task: Task, caller: DatasetManagerDep, rpc: DatasetRpcDep) -> TriggerPolicy:
    reply = await rpc(
        rpc.stub.GetTriggerPolicy,
        service_pb2.GetTriggerPolicyRequest(tenant_id=caller.tenant_id, task=task),
    )
    return policy_of(reply.policy)


@router.put(
    "/datasets/policies/{task}",
    response_model=TriggerPolicy,
    summary="Set a task's trigger policy",
    description=f"{_ROLES} Replaces the task's policy whole: after `min_new_examples` "
    "new usable feedback (or `max_interval_s` seconds with some), and not within "
    "`cooldown_s` of the last time, the service builds a snapshot and requests training "
    "on it (DPO once there are `min_preference_pairs` pairs, else SFT).",
)
async def update_policy(
    task: Task, body: TriggerPolicyUpdate, caller: DatasetManagerDep, rpc: DatasetRpcDep
) -> TriggerPolicy:
    reply = await rpc(
        rpc.stub.UpdateTriggerPolicy,
        service_pb2.UpdateTriggerPolicyRequest(
            tenant_id=caller.tenant_id, policy=trigger_policy(task, body)
        ),
        fields=policy_fields,
    )
    return policy_of(reply.policy)
