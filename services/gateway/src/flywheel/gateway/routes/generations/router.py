"""Generations of the caller's tenant: log (one or a batch), read, list."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query, Response

from flywheel.contracts.feedback.v1 import service_pb2
from flywheel.gateway.deps import FeedbackRpcDep, GenerationReaderDep, GenerationWriterDep
from flywheel.gateway.routes.common import Cursor, Limit, Page, Timestamp
from flywheel.gateway.routes.generations.mapping import (
    batch_fields,
    filter_fields,
    generation_fields,
    generation_filter,
    generation_input,
    generation_of,
)
from flywheel.gateway.routes.generations.protocol import (
    BatchItem,
    BatchResult,
    Generation,
    GenerationBatch,
    GenerationCreate,
)
from flywheel.gateway.routing import json_response, next_cursor, page_request, v1_router

router = v1_router(tags=["generations"], extra_problems=(404,))

_Filter = Annotated[str | None, Query(max_length=200)]


@router.post(
    "/generations",
    status_code=201,
    response_model=Generation,
    summary="Log a generation",
    description="Integrator or service keys. 201 when logged; 200 with the first record "
    "when `client_generation_id` was logged before.",
    responses={200: {"description": "Already logged under this client_generation_id"}},
)
async def log_generation(
    body: GenerationCreate, caller: GenerationWriterDep, rpc: FeedbackRpcDep
) -> Response:
    reply = await rpc(
        rpc.stub.LogGeneration,
        service_pb2.LogGenerationRequest(
            tenant_id=caller.tenant_id, generation=generation_input(body)
        ),
        fields=generation_fields,
    )
    generation = generation_of(reply.generation)
    return json_response(
        generation,
        status_code=201 if reply.created else 200,
        headers={"Location": f"/v1/generations/{generation.generation_id}"},
    )


@router.post(
    "/generations/batch",
    response_model=BatchResult,
    summary="Log generations in one transaction",
    description="Integrator or service keys. All or none; one result per generation, in "
    "request order, each saying whether it was new. At most 1000 per batch.",
)
async def log_generations(
    body: GenerationBatch, caller: GenerationWriterDep, rpc: FeedbackRpcDep
) -> BatchResult:
    reply = await rpc(
        rpc.stub.BatchLogGenerations,
        service_pb2.BatchLogGenerationsRequest(
            tenant_id=caller.tenant_id,
            generations=[generation_input(g) for g in body.generations],
        ),
        fields=batch_fields,
    )
    return BatchResult(
        results=[
            BatchItem(generation=generation_of(r.generation), created=r.created)
            for r in reply.results
        ]
    )


@router.get(
    "/generations/{generation_id}",
    response_model=Generation,
    summary="Get a generation",
    description="Rater or integrator keys. 404 for unknown ids and other tenants' ids alike.",
)
async def get_generation(
    generation_id: Annotated[str, Path(min_length=1, max_length=200)],
    caller: GenerationReaderDep,
    rpc: FeedbackRpcDep,
) -> Generation:
    reply = await rpc(
        rpc.stub.GetGeneration,
        service_pb2.GetGenerationRequest(tenant_id=caller.tenant_id, generation_id=generation_id),
    )
    return generation_of(reply.generation)


@router.get(
    "/generations",
    response_model=Page[Generation],
    summary="List generations",
    description="Rater or integrator keys. Newest first; every filter is optional. "
    "Cursor pagination: pass `next_cursor` back as `cursor` with the same filters.",
)
async def list_generations(
    caller: GenerationReaderDep,
    rpc: FeedbackRpcDep,
    task: _Filter = None,
    user_id: _Filter = None,
    adapter: Annotated[str | None, Query(max_length=200, description="Adapter name.")] = None,
    adapter_version: Annotated[
        str | None, Query(max_length=200, description="Adapter version (with `adapter`).")
    ] = None,
    alias: _Filter = None,
    prompt_hash: _Filter = None,
    client_generation_id: _Filter = None,
    created_after: Annotated[Timestamp | None, Query(description="Inclusive.")] = None,
    created_before: Annotated[Timestamp | None, Query(description="Exclusive.")] = None,
    cursor: Cursor = None,
    limit: Limit = 50,
) -> Page[Generation]:
    reply = await rpc(
        rpc.stub.ListGenerations,
        service_pb2.ListGenerationsRequest(
            tenant_id=caller.tenant_id,
            filter=generation_filter(
                task=task,
                user_id=user_id,
                adapter=adapter,
                adapter_version=adapter_version,
                alias=alias,
                prompt_hash=prompt_hash,
                client_generation_id=client_generation_id,
                created_after=created_after,
                created_before=created_before,
            ),
            page=page_request(cursor, limit),
        ),
        fields=filter_fields,
    )
    return Page[Generation](
        items=[generation_of(g) for g in reply.generations], next_cursor=next_cursor(reply.page)
    )
