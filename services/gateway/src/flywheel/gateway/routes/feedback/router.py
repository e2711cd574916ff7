"""Feedback of the caller's tenant: record, edit, retract, read, list, stats, export."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, Header, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import StringConstraints

from flywheel.contracts.feedback.v1 import service_pb2
from flywheel.gateway.auth import Principal, Role
from flywheel.gateway.deps import (
    FeedbackEditorDep,
    FeedbackReaderDep,
    FeedbackRpcDep,
    FeedbackWriterDep,
)
from flywheel.gateway.problems import ProblemError, validation_problem
from flywheel.gateway.routes.common import Cursor, Limit, Page, Timestamp
from flywheel.gateway.routes.feedback.mapping import (
    bucket_of,
    feedback_filter,
    feedback_of,
    feedback_value,
    filter_fields,
    group_by,
    one_kind,
    record_request,
    value_fields,
)
from flywheel.gateway.routes.feedback.protocol import (
    Feedback,
    FeedbackCreate,
    FeedbackEdit,
    FeedbackKind,
    FeedbackRetract,
    FeedbackStats,
    GroupBy,
    SourceKind,
)
from flywheel.gateway.routing import json_response, next_cursor, page_request, v1_router
from flywheel.gateway.state import state_of
from flywheel.gateway.upstream import Rpc

router = v1_router(tags=["feedback"], extra_problems=(404, 409))

FeedbackId = Annotated[str, Path(min_length=1, max_length=200)]
_Filter = Annotated[str | None, Query(max_length=200)]


def _choices(values: type[Any]) -> str:
    names = "|".join(v.value for v in values)
    return rf"^({names})(,({names}))*$"


KindList = list[Annotated[str, StringConstraints(pattern=_choices(FeedbackKind))]]
SourceList = list[Annotated[str, StringConstraints(pattern=_choices(SourceKind))]]
GroupList = list[Annotated[str, StringConstraints(pattern=_choices(GroupBy))]]


def _split(values: list[str] | None) -> list[str]:
    return [part for value in values or () for part in value.split(",") if part]


async def feedback_query(
    task: _Filter = None,
    user_id: _Filter = None,
    adapter: Annotated[str | None, Query(max_length=200, description="Adapter name.")] = None,
    adapter_version: Annotated[
        str | None, Query(max_length=200, description="Adapter version (with `adapter`).")
    ] = None,
    generation_id: _Filter = None,
    kind: Annotated[
        KindList | None,
        Query(description="Feedback kinds; repeat or comma-separate (`kind=thumbs,rating`)."),
    ] = None,
    source: Annotated[SourceList | None, Query(description="`human` and/or `synthetic`.")] = None,
    created_after: Annotated[Timestamp | None, Query(description="Inclusive.")] = None,
    created_before: Annotated[Timestamp | None, Query(description="Exclusive.")] = None,
    include_retracted: Annotated[bool, Query(description="Also retracted feedback.")] = False,
) -> Any:
    """The feedback filter of the query parameters shared by list, stats and export."""
    return feedback_filter(
        task=task,
        user_id=user_id,
        adapter=adapter,
        adapter_version=adapter_version,
        generation_id=generation_id,
        kinds=[FeedbackKind(k) for k in _split(kind)],
        sources=[SourceKind(s) for s in _split(source)],
        created_after=created_after,
        created_before=created_before,
        include_retracted=include_retracted,
    )


FeedbackFilterDep = Annotated[Any, Depends(feedback_query)]


def _etag(response: Response, feedback: Feedback) -> Feedback:
    response.headers["ETag"] = f'"{feedback.revision}"'
    return feedback


def _check_source(principal: Principal, source: str) -> None:
    synthetic = source.startswith("synthetic:")
    if synthetic and principal.role is not Role.SERVICE:
        raise ProblemError(403, "forbidden", "Only service keys may record synthetic feedback.")
    if not synthetic and principal.role is Role.SERVICE:
        raise ProblemError(
            403, "forbidden", 'Service keys record synthetic feedback only ("synthetic:<critic>").'
        )


def _user_of(principal: Principal, user_id: str | None) -> str | None:
    if principal.user_id is None:
        return user_id
    if user_id is not None and user_id != principal.user_id:
        raise ProblemError(
            403, "forbidden", "This API key acts as one user and may not record for another."
        )
    return principal.user_id


async def _check_owner(caller: Principal, rpc: Rpc, feedback_id: str) -> None:
    """A key that acts as one user changes only that user's feedback (403 otherwise)."""
    if caller.user_id is None:
        return
    reply = await rpc(
        rpc.stub.GetFeedback,
        service_pb2.GetFeedbackRequest(tenant_id=caller.tenant_id, feedback_id=feedback_id),
    )
    if reply.feedback.user_id != caller.user_id:
        raise ProblemError(
            403, "forbidden", "This API key acts as one user and may only change its feedback."
        )


@router.post(
    "/feedback",
    status_code=201,
    response_model=Feedback,
    summary="Record feedback on a generation",
    description="Rater, integrator or service keys. Exactly one of `thumbs` (`up`/`down`), "
    "`rating` (1-5), `comment`, `preference` (`{generation_b_id, choice: a|b|tie, "
    "strength}`, generation B of the same prompt) or `correction`. `source` is `human` "
    "(rater and integrator keys) or `synthetic:<critic>` (service keys). 201 when "
    "recorded; 200 with the first record when `client_feedback_id` was recorded before. "
    "404 when the generation (or generation B) is not the tenant's.",
    responses={200: {"description": "Already recorded under this client_feedback_id"}},
)
async def record_feedback(
    body: FeedbackCreate, http_request: Request, caller: FeedbackWriterDep
) -> Response:
    kind = one_kind(body)
    _check_source(caller, body.source)
    request = record_request(
        caller.tenant_id,
        generation_id=body.generation_id,
        value=feedback_value(body, kind),
        source=body.source,
        user_id=_user_of(caller, body.user_id),
        client_feedback_id=body.client_feedback_id,
        metadata=body.metadata,
        dimension_scores=body.dimension_scores,
    )
    # Concurrent POSTs are recorded together, in one transaction (see batching.py).
    recorder = state_of(http_request).recorder
    reply = await recorder.record(request, fields=value_fields(kind), caller=caller.caller)
    feedback = feedback_of(reply.feedback)
    # The hot path of ingest: answer the model as built, without FastAPI validating it again.
    return json_response(
        feedback,
        status_code=201 if reply.created else 200,
        headers={
            "Location": f"/v1/feedback/{feedback.feedback_id}",
            "ETag": f'"{feedback.revision}"',
        },
    )


@router.get(
    "/feedback",
    response_model=Page[Feedback],
    summary="List feedback",
    description="Rater or integrator keys. Newest first, latest revisions, retracted "
    "feedback only with `include_retracted=true`. Cursor pagination: pass `next_cursor` "
    "back as `cursor` with the same filters.",
)
async def list_feedback(
    caller: FeedbackReaderDep,
    rpc: FeedbackRpcDep,
    filter_: FeedbackFilterDep,
    cursor: Cursor = None,
    limit: Limit = 50,
) -> Page[Feedback]:
    reply = await rpc(
        rpc.stub.ListFeedback,
        service_pb2.ListFeedbackRequest(
            tenant_id=caller.tenant_id, filter=filter_, page=page_request(cursor, limit)
        ),
        fields=filter_fields,
    )
    return Page[Feedback](
        items=[feedback_of(f) for f in reply.feedback], next_cursor=next_cursor(reply.page)
    )


@router.get(
    "/feedback/stats",
    response_model=FeedbackStats,
    summary="Feedback statistics",
    description="Rater or integrator keys. Counts per kind, mean rating, thumbs-down rate "
    "and preference win rate of the filtered feedback, grouped by `group_by` "
    "(`adapter`, `task`, `source`; repeat or comma-separate; none: one bucket).",
)
async def feedback_stats(
    caller: FeedbackReaderDep,
    rpc: FeedbackRpcDep,
    filter_: FeedbackFilterDep,
    group_by_: Annotated[
        GroupList | None,
        Query(alias="group_by", description="`adapter`, `task` and/or `source`."),
    ] = None,
) -> FeedbackStats:
    reply = await rpc(
        rpc.stub.GetFeedbackStats,
        service_pb2.GetFeedbackStatsRequest(
            tenant_id=caller.tenant_id,
            filter=filter_,
            group_by=group_by([GroupBy(g) for g in _split(group_by_)]),
        ),
        fields=filter_fields,
    )
    return FeedbackStats(buckets=[bucket_of(b) for b in reply.buckets])


@router.get(
    "/feedback/export",
    response_class=StreamingResponse,
    summary="Export feedback as JSON lines",
    description="Rater or integrator keys. Streams the tenant's filtered feedback, each "
    "line one feedback joined with its generation (UTF-8 JSON lines). A stream cut short "
    "by a server error ends without its final chunk.",
    responses={200: {"content": {"application/x-ndjson": {"schema": {"type": "string"}}}}},
)
async def export_feedback(
    caller: FeedbackReaderDep, rpc: FeedbackRpcDep, filter_: FeedbackFilterDep
) -> StreamingResponse:
    chunks = await rpc.stream(
        rpc.stub.ExportFeedback,
        service_pb2.ExportFeedbackRequest(tenant_id=caller.tenant_id, filter=filter_),
        fields=filter_fields,
    )

    async def body() -> AsyncIterator[bytes]:
        async for chunk in chunks:
            if chunk.jsonl_chunk:
                yield bytes(chunk.jsonl_chunk)

    return StreamingResponse(body(), media_type="application/x-ndjson")


@router.get(
    "/feedback/{feedback_id}",
    response_model=Feedback,
    summary="Get a feedback",
    description="Rater or integrator keys. The latest revision; its number is the ETag.",
)
async def get_feedback(
    feedback_id: FeedbackId, response: Response, caller: FeedbackReaderDep, rpc: FeedbackRpcDep
) -> Feedback:
    reply = await rpc(
        rpc.stub.GetFeedback,
        service_pb2.GetFeedbackRequest(tenant_id=caller.tenant_id, feedback_id=feedback_id),
    )
    return _etag(response, feedback_of(reply.feedback))


_IF_MATCH = re.compile(r'^\s*(?:W/)?"(\d{1,10})"\s*$')


def _expected_revision(if_match: str | None, in_body: int | None) -> int | None:
    header = None
    if if_match is not None and if_match.strip() != "*":
        match = _IF_MATCH.match(if_match)
        if match is None or not 1 <= int(match.group(1)) < 2**32:
            raise validation_problem([("If-Match", 'must be a revision ETag such as "3"')])
        header = int(match.group(1))
    if header is not None and in_body is not None and header != in_body:
        raise validation_problem(
            [("If-Match", "does not agree with expected_revision in the body")]
        )
    return header if header is not None else in_body


@router.patch(
    "/feedback/{feedback_id}",
    response_model=Feedback,
    summary="Edit a feedback",
    description="Rater or integrator keys (a key bound to a user: only that user's feedback, "
    "403 otherwise). Replaces the value (same kind) as a new "
    "revision; the old one is kept as an event, never overwritten silently. Send "
    '`If-Match: "<revision>"` (or `expected_revision`) to edit only if nobody edited it '
    "since: 409 otherwise. 409 also for a retracted feedback.",
)
async def edit_feedback(
    feedback_id: FeedbackId,
    body: FeedbackEdit,
    response: Response,
    caller: FeedbackEditorDep,
    rpc: FeedbackRpcDep,
    if_match: Annotated[
        str | None, Header(description='Revision ETag, e.g. "3".', max_length=100)
    ] = None,
) -> Feedback:
    await _check_owner(caller, rpc, feedback_id)
    kind = one_kind(body)
    request = service_pb2.EditFeedbackRequest(
        tenant_id=caller.tenant_id, feedback_id=feedback_id, value=feedback_value(body, kind)
    )
    expected = _expected_revision(if_match, body.expected_revision)
    if expected is not None:
        request.expected_revision = expected
    if body.reason is not None:
        request.reason = body.reason
    reply = await rpc(rpc.stub.EditFeedback, request, fields=value_fields(kind))
    return _etag(response, feedback_of(reply.feedback))


@router.post(
    "/feedback/{feedback_id}/retract",
    response_model=Feedback,
    summary="Retract a feedback",
    description="Rater or integrator keys (a key bound to a user: only that user's feedback, "
    "403 otherwise). Withdraws it from datasets and statistics (an "
    "event, not a deletion); retracting twice changes nothing.",
)
async def retract_feedback(
    feedback_id: FeedbackId,
    response: Response,
    caller: FeedbackEditorDep,
    rpc: FeedbackRpcDep,
    body: FeedbackRetract | None = None,
) -> Feedback:
    await _check_owner(caller, rpc, feedback_id)
    request = service_pb2.RetractFeedbackRequest(
        tenant_id=caller.tenant_id, feedback_id=feedback_id
    )
    if body is not None and body.reason is not None:
        request.reason = body.reason
    reply = await rpc(rpc.stub.RetractFeedback, request)
    return _etag(response, feedback_of(reply.feedback))
