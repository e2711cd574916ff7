"""Training jobs of the caller's tenant (submit, read, list, cancel, retry, logs) and the
adapters they published, through the trainer service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Path, Query, Request, Response
from fastapi.responses import StreamingResponse

from flywheel.contracts.common.v1 import common_pb2
from flywheel.contracts.trainer.v1 import service_pb2
from flywheel.gateway.deps import TrainerRpcDep, TrainingManagerDep
from flywheel.gateway.routes.common import Cursor, Limit, Page
from flywheel.gateway.routes.training.mapping import (
    STATE_TO_PROTO,
    adapter_fields,
    client_request_id,
    job_of,
    log_fields,
    manifest_of,
    submit_fields,
    submit_request,
)
from flywheel.gateway.routes.training.protocol import (
    AdapterManifest,
    JobState,
    TrainingJob,
    TrainingJobCancel,
    TrainingJobCreate,
    TrainingJobRetry,
)
from flywheel.gateway.routes.training_spec import METHOD_TO_PROTO, TrainingMethod
from flywheel.gateway.routing import (
    IDEMPOTENCY_HEADER,
    next_cursor,
    page_fields,
    page_request,
    v1_router,
)

router = v1_router(tags=["training"], extra_problems=(404, 409))

_ROLES = "Integrator or admin keys (the key's own tenant)."
LATEST = "latest"

JobId = Annotated[str, Path(min_length=1, max_length=200, description="The job's `job_id`.")]
AdapterName = Annotated[str, Path(min_length=1, max_length=200, description="Adapter name.")]
AdapterVersion = Annotated[
    str,
    Path(
        min_length=1,
        max_length=200,
        description=f'Version ("v3"), or `{LATEST}` for the newest.',
        examples=["v1", LATEST],
    ),
]
TaskFilter = Annotated[str | None, Query(max_length=63, description="Task type name.")]


def _located(response: Response, job: TrainingJob) -> TrainingJob:
    response.headers["Location"] = f"/v1/training/jobs/{job.job_id}"
    return job


@router.post(
    "/training/jobs",
    status_code=201,
    response_model=TrainingJob,
    summary="Submit a training job",
    description=f"{_ROLES} Queues a job that trains one LoRA adapter on a dataset snapshot "
    "with the given recipe; queued jobs start on free devices, highest `priority` first. The job "
    "fails (state `failed`, the reason in `state_reason`) if its snapshot, parent adapter "
    "or hyperparameters turn out unusable when it starts; poll "
    "`GET /v1/training/jobs/{job_id}` or follow its logs. With an `Idempotency-Key`, a "
    "retry returns the same job.",
)
async def submit_job(
    body: TrainingJobCreate,
    request: Request,
    response: Response,
    caller: TrainingManagerDep,
    rpc: TrainerRpcDep,
) -> TrainingJob:
    key = request.headers.get(IDEMPOTENCY_HEADER)
    request_id = client_request_id(caller.key_id, key) if key is not None else None
    reply = await rpc(
        rpc.stub.SubmitJob,
        submit_request(caller.tenant_id, body, request_id),
        fields=submit_fields,
    )
    return _located(response, job_of(reply.job))


@router.get(
    "/training/jobs",
    response_model=Page[TrainingJob],
    summary="List training jobs",
    description=f"{_ROLES} Newest first, optionally only in some states (repeat `state`), "
    "of one task or of one method. Cursor pagination: pass `next_cursor` back as `cursor` "
    "with the same filters.",
)
async def list_jobs(
    caller: TrainingManagerDep,
    rpc: TrainerRpcDep,
    state: Annotated[
        list[JobState] | None,
        Query(
            description="Only jobs in these states; repeat for several "
            "(`state=queued&state=running`)."
        ),
    ] = None,
    task: TaskFilter = None,
    method: Annotated[TrainingMethod | None, Query(description="Training recipe.")] = None,
    cursor: Cursor = None,
    limit: Limit = 50,
) -> Page[TrainingJob]:
    request = service_pb2.ListJobsRequest(
        tenant_id=caller.tenant_id,
        states=[STATE_TO_PROTO[s] for s in state or ()],
        page=page_request(cursor, limit),
    )
    if task is not None:
        request.task = task
    if method is not None:
        request.method = METHOD_TO_PROTO[method]
    reply = await rpc(rpc.stub.ListJobs, request, fields=page_fields)
    return Page[TrainingJob](
        items=[job_of(job) for job in reply.jobs], next_cursor=next_cursor(reply.page)
    )


@router.get(
    "/training/jobs/{job_id}",
    response_model=TrainingJob,
    summary="Get a training job",
    description=f"{_ROLES} Its spec, state (and why), latest progress (step, loss, "
    "throughput, ETA), last checkpoint and, once it succeeded, the adapter it published.",
)
async def get_job(job_id: JobId, caller: TrainingManagerDep, rpc: TrainerRpcDep) -> TrainingJob:
    reply = await rpc(
        rpc.stub.GetJob, service_pb2.GetJobRequest(tenant_id=caller.tenant_id, job_id=job_id)
    )
    return job_of(reply.job)


@router.post(
    "/training/jobs/{job_id}/cancel",
    response_model=TrainingJob,
    summary="Cancel a training job",
    description=f"{_ROLES} A queued job is `cancelled` at once; a running one stays "
    "`running` until its process has stopped, then turns `cancelled` (its checkpoints are "
    "kept for a retry). The optional `reason` becomes its `state_reason`. 409 once the job "
    "has finished (succeeded, failed or cancelled).",
)
async def cancel_job(
    job_id: JobId,
    caller: TrainingManagerDep,
    rpc: TrainerRpcDep,
    body: TrainingJobCancel | None = None,
) -> TrainingJob:
    request = service_pb2.CancelJobRequest(tenant_id=caller.tenant_id, job_id=job_id)
    if body is not None and body.reason is not None:
        request.reason = body.reason
    reply = await rpc(rpc.stub.CancelJob, request)
    return job_of(reply.job)


@router.post(
    "/training/jobs/{job_id}/retry",
    status_code=201,
    response_model=TrainingJob,
    summary="Retry a training job",
    description=f"{_ROLES} Queues a new attempt of a failed or cancelled job (a new job, "
    "`attempt` one higher, `retry_of_job_id` pointing back) with the same spec and "
    "priority. It resumes from the old job's last complete checkpoint unless "
    "`from_scratch` is true. 409 for a job that is queued, running or succeeded.",
)
async def retry_job(
    job_id: JobId,
    response: Response,
    caller: TrainingManagerDep,
    rpc: TrainerRpcDep,
    body: TrainingJobRetry | None = None,
) -> TrainingJob:
    reply = await rpc(
        rpc.stub.RetryJob,
        service_pb2.RetryJobRequest(
            tenant_id=caller.tenant_id,
            job_id=job_id,
            from_scratch=body.from_scratch if body is not None else False,
        ),
    )
    return _located(response, job_of(reply.job))


@router.get(
    "/training/jobs/{job_id}/logs",
    response_class=StreamingResponse,
    summary="Read or follow a job's log",
    description=f"{_ROLES} The job's log as plain text, one line per line (the last "
    "`tail` lines; 0: all). With `follow=true` the response stays open and new lines are "
    "sent as the job writes them (chunked), until the job finishes or the client hangs "
    "up; a queued job's log is empty until it starts. A stream cut short by a server "
    "error ends without its final chunk.",
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def job_logs(
    job_id: JobId,
    caller: TrainingManagerDep,
    rpc: TrainerRpcDep,
    tail: Annotated[
        int, Query(ge=0, le=1_000_000, description="Only the last N lines; 0: all.")
    ] = 0,
    follow: Annotated[
        bool, Query(description="Keep sending new lines until the job finishes.")
    ] = False,
) -> StreamingResponse:
    request = service_pb2.StreamJobLogsRequest(
        tenant_id=caller.tenant_id, job_id=job_id, follow=follow, tail_lines=tail
    )
    headers = {}
    if follow:
        # A followed log may send nothing for a long time (a queued job): the job is
        # checked first (404 before any byte), then the response starts at once.
        await rpc(
            rpc.stub.GetJob, service_pb2.GetJobRequest(tenant_id=caller.tenant_id, job_id=job_id)
        )
        messages = rpc.stream_lazily(rpc.stub.StreamJobLogs, request, fields=log_fields)
        # Proxies must pass each line on rather than wait for the whole response.
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    else:
        messages = await rpc.stream(rpc.stub.StreamJobLogs, request, fields=log_fields)

    async def body() -> AsyncIterator[bytes]:
        async for message in messages:
            yield (message.line + "\n").encode()

    return StreamingResponse(body(), media_type="text/plain", headers=headers)


@router.get(
    "/adapters",
    response_model=Page[AdapterManifest],
    summary="List adapters",
    description=f"{_ROLES} Manifests of the adapter versions the tenant's jobs published, "
    "newest first, optionally of one task or one adapter name. Cursor pagination: pass "
    "`next_cursor` back as `cursor` with the same filters.",
)
async def list_adapters(
    caller: TrainingManagerDep,
    rpc: TrainerRpcDep,
    task: TaskFilter = None,
    adapter_name: Annotated[
        str | None, Query(max_length=200, description="Only versions of this adapter name.")
    ] = None,
    cursor: Cursor = None,
    limit: Limit = 50,
) -> Page[AdapterManifest]:
    request = service_pb2.ListAdaptersRequest(
        tenant_id=caller.tenant_id, page=page_request(cursor, limit)
    )
    if task is not None:
        request.task = task
    if adapter_name is not None:
        request.adapter_name = adapter_name
    reply = await rpc(rpc.stub.ListAdapters, request, fields=page_fields)
    return Page[AdapterManifest](
        items=[manifest_of(m) for m in reply.adapters], next_cursor=next_cursor(reply.page)
    )


@router.get(
    "/adapters/{name}/versions/{version}",
    response_model=AdapterManifest,
    summary="Get an adapter version",
    description=f"{_ROLES} The manifest of one adapter version: what it was trained for "
    "and how (task, type, method, LoRA settings, hyperparameters), its lineage (base "
    "model, snapshot, parent adapter, job), final metrics and the sha256 and size of "
    f"every file. `{LATEST}` as the version: the newest one.",
)
async def get_adapter(
    name: AdapterName,
    version: AdapterVersion,
    caller: TrainingManagerDep,
    rpc: TrainerRpcDep,
) -> AdapterManifest:
    ref: Any = common_pb2.AdapterRef(name=name, version="" if version == LATEST else version)
    reply = await rpc(
        rpc.stub.GetAdapter,
        service_pb2.GetAdapterRequest(tenant_id=caller.tenant_id, adapter=ref),
        fields=adapter_fields,
    )
    return manifest_of(reply.adapter)
