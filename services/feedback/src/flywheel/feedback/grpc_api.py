"""gRPC transport of the feedback service: messages in, one domain call, messages out.

Domain errors become statuses in :class:`flywheel.core.rpc.DomainErrorInterceptor`; this
module only maps shapes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC
from typing import Any

from flywheel.contracts.common.v1.common_pb2 import AdapterRef, PageResponse
from flywheel.contracts.feedback.v1 import resources_pb2 as pb
from flywheel.contracts.feedback.v1 import service_pb2 as api
from flywheel.contracts.feedback.v1.service_pb2_grpc import FeedbackServiceServicer
from flywheel.core.errors import DomainError, FieldError, InvalidArgument, Unauthenticated
from flywheel.feedback import mapping
from flywheel.feedback.models import FeedbackRow, GenerationRow
from flywheel.feedback.service import FeedbackInput, FeedbackService, Page

STATS_GROUPS = {
    api.STATS_GROUP_BY_ADAPTER: "adapter",
    api.STATS_GROUP_BY_TASK: "task",
    api.STATS_GROUP_BY_SOURCE_KIND: "source_kind",
}


def _page(page: Page[Any]) -> PageResponse:
    return PageResponse(next_cursor=page.next_cursor)


def export_line(
    feedback: FeedbackRow, generation: GenerationRow, generation_b: GenerationRow | None = None
) -> dict[str, Any]:
    """One JSONL line of an export: the feedback with the generation(s) it judges."""
    line = mapping.to_json(mapping.feedback_message(feedback))
    line["source"] = mapping.source_string(feedback.source_kind, feedback.critic)
    line["kind"] = feedback.kind
    line["generation"] = mapping.to_json(mapping.generation_message(generation))
    if generation_b is not None:
        line["generation_b"] = mapping.to_json(mapping.generation_message(generation_b))
    return dict(line)


def feedback_input(request: api.RecordFeedbackRequest) -> FeedbackInput:
    """A RecordFeedbackRequest as the domain's input."""
    return FeedbackInput(
        tenant_id=request.tenant_id,
        generation_id=request.generation_id,
        value=request.value,
        source=request.source,
        user_id=request.user_id if request.HasField("user_id") else None,
        dimension_scores=request.dimension_scores,
        client_feedback_id=request.client_feedback_id
        if request.HasField("client_feedback_id")
        else None,
        metadata=mapping.to_json(request.metadata),
    )


def _batch_result(
    result: tuple[FeedbackRow, bool] | DomainError,
) -> api.BatchRecordFeedbackResult:
    if isinstance(result, DomainError):
        violations = result.errors if isinstance(result, InvalidArgument) else []
        return api.BatchRecordFeedbackResult(
            error=api.ItemError(
                code=result.code.value[0],
                message=result.message,
                field_violations=[
                    api.FieldViolation(field=v.field, message=v.message) for v in violations
                ],
            )
        )
    row, created = result
    return api.BatchRecordFeedbackResult(
        recorded=api.RecordFeedbackResponse(feedback=mapping.feedback_message(row), created=created)
    )


class FeedbackServicer(FeedbackServiceServicer):
    """FeedbackService over the domain."""

    def __init__(self, service: FeedbackService) -> None:
        self.service = service

    async def CreateTenant(self, request: Any, context: Any) -> api.CreateTenantResponse:
        row = await self.service.accounts.create_tenant(request.tenant_id, request.display_name)
        return api.CreateTenantResponse(tenant=mapping.tenant_message(row))

    async def GetTenant(self, request: Any, context: Any) -> api.GetTenantResponse:
        row = await self.service.accounts.get_tenant(request.tenant_id)
        return api.GetTenantResponse(tenant=mapping.tenant_message(row))

    async def ListTenants(self, request: Any, context: Any) -> api.ListTenantsResponse:
        page = await self.service.accounts.list_tenants(request.page.page_size, request.page.cursor)
        return api.ListTenantsResponse(
            tenants=[mapping.tenant_message(r) for r in page.items], page=_page(page)
        )

    async def CreateUser(self, request: Any, context: Any) -> api.CreateUserResponse:
        row = await self.service.accounts.create_user(
            request.tenant_id, request.external_id, request.display_name
        )
        return api.CreateUserResponse(user=mapping.user_message(row))

    async def ListUsers(self, request: Any, context: Any) -> api.ListUsersResponse:
        page = await self.service.accounts.list_users(
            request.tenant_id, request.page.page_size, request.page.cursor
        )
        return api.ListUsersResponse(
            users=[mapping.user_message(r) for r in page.items], page=_page(page)
        )

    async def CreateApiKey(self, request: Any, context: Any) -> api.CreateApiKeyResponse:
        role = mapping.ROLE_NAMES.get(request.role)
        if role is None:
            raise InvalidArgument(FieldError("role", "must be rater, integrator, admin or service"))
        row, secret = await self.service.accounts.create_api_key(
            request.tenant_id,
            role,
            request.name,
            user_id=request.user_id if request.HasField("user_id") else None,
            expires_at=request.expires_at.ToDatetime(UTC)
            if request.HasField("expires_at")
            else None,
        )
        return api.CreateApiKeyResponse(api_key=mapping.api_key_message(row), secret=secret)

    async def ListApiKeys(self, request: Any, context: Any) -> api.ListApiKeysResponse:
        page = await self.service.accounts.list_api_keys(
            request.tenant_id, request.include_revoked, request.page.page_size, request.page.cursor
        )
        return api.ListApiKeysResponse(
            api_keys=[mapping.api_key_message(r) for r in page.items], page=_page(page)
        )

    async def RevokeApiKey(self, request: Any, context: Any) -> api.RevokeApiKeyResponse:
        row = await self.service.accounts.revoke_api_key(request.tenant_id, request.key_id)
        return api.RevokeApiKeyResponse(api_key=mapping.api_key_message(row))

    async def AuthenticateApiKey(
        self, request: Any, context: Any
    ) -> api.AuthenticateApiKeyResponse:
        row = await self.service.accounts.authenticate(request.secret)
        if row is None:
            raise Unauthenticated("invalid, revoked or expired API key")
        return api.AuthenticateApiKeyResponse(api_key=mapping.api_key_message(row))

    async def CreateTaskType(self, request: Any, context: Any) -> api.CreateTaskTypeResponse:
        row = await self.service.accounts.create_task_type(
            request.tenant_id, request.name, request.description, request.domain
        )
        return api.CreateTaskTypeResponse(task_type=mapping.task_type_message(row))

    async def ListTaskTypes(self, request: Any, context: Any) -> api.ListTaskTypesResponse:
        page = await self.service.accounts.list_task_types(
            request.tenant_id, request.page.page_size, request.page.cursor
        )
        return api.ListTaskTypesResponse(
            task_types=[mapping.task_type_message(r) for r in page.items], page=_page(page)
        )

    async def LogGeneration(self, request: Any, context: Any) -> api.LogGenerationResponse:
        [(row, created)] = await self.service.generations.log_generations(
            request.tenant_id, [request.generation]
        )
        return api.LogGenerationResponse(
            generation=mapping.generation_message(row), created=created
        )

    async def BatchLogGenerations(
        self, request: Any, context: Any
    ) -> api.BatchLogGenerationsResponse:
        results = await self.service.generations.log_generations(
            request.tenant_id, request.generations
        )
        return api.BatchLogGenerationsResponse(
            results=[
                api.LogGenerationResponse(
                    generation=mapping.generation_message(row), created=created
                )
                for row, created in results
            ]
        )

    async def GetGeneration(self, request: Any, context: Any) -> api.GetGenerationResponse:
        row = await self.service.generations.get_generation(
            request.tenant_id, request.generation_id
        )
        return api.GetGenerationResponse(generation=mapping.generation_message(row))

    async def ListGenerations(self, request: Any, context: Any) -> api.ListGenerationsResponse:
        page = await self.service.generations.list_generations(
            request.tenant_id, request.filter, request.page.page_size, request.page.cursor
        )
        return api.ListGenerationsResponse(
            generations=[mapping.generation_message(r) for r in page.items], page=_page(page)
        )

    async def RecordFeedback(self, request: Any, context: Any) -> api.RecordFeedbackResponse:
        row, created = await self.service.feedback.record_feedback(feedback_input(request))
        return api.RecordFeedbackResponse(feedback=mapping.feedback_message(row), created=created)

    async def BatchRecordFeedback(
        self, request: Any, context: Any
    ) -> api.BatchRecordFeedbackResponse:
        results = await self.service.feedback.record_feedback_batch(
            [feedback_input(r) for r in request.requests]
        )
        return api.BatchRecordFeedbackResponse(results=[_batch_result(r) for r in results])

    async def EditFeedback(self, request: Any, context: Any) -> api.EditFeedbackResponse:
        row = await self.service.feedback.edit_feedback(
            request.tenant_id,
            request.feedback_id,
            request.value,
            expected_revision=request.expected_revision
            if request.HasField("expected_revision")
            else None,
            reason=request.reason if request.HasField("reason") else None,
        )
        return api.EditFeedbackResponse(feedback=mapping.feedback_message(row))

    async def RetractFeedback(self, request: Any, context: Any) -> api.RetractFeedbackResponse:
        row = await self.service.feedback.retract_feedback(
            request.tenant_id,
            request.feedback_id,
            reason=request.reason if request.HasField("reason") else None,
        )
        return api.RetractFeedbackResponse(feedback=mapping.feedback_message(row))

    async def GetFeedback(self, request: Any, context: Any) -> api.GetFeedbackResponse:
        row = await self.service.feedback.get_feedback(request.tenant_id, request.feedback_id)
        return api.GetFeedbackResponse(feedback=mapping.feedback_message(row))

    async def ListFeedback(self, request: Any, context: Any) -> api.ListFeedbackResponse:
        page = await self.service.feedback.list_feedback(
            request.tenant_id, request.filter, request.page.page_size, request.page.cursor
        )
        return api.ListFeedbackResponse(
            feedback=[mapping.feedback_message(r) for r in page.items], page=_page(page)
        )

    async def GetFeedbackStats(self, request: Any, context: Any) -> api.GetFeedbackStatsResponse:
        groups = [STATS_GROUPS[g] for g in request.group_by if g in STATS_GROUPS]
        buckets = await self.service.reports.stats(request.tenant_id, request.filter, groups)
        return api.GetFeedbackStatsResponse(
            buckets=[
                api.FeedbackStatsBucket(
                    task=b["task"],
                    adapter=AdapterRef(name=b["adapter_name"], version=b["adapter_version"] or "")
                    if b["adapter_name"]
                    else None,
                    source_kind=mapping.SOURCE_KINDS.get(
                        b["source_kind"] or "", pb.SOURCE_KIND_UNSPECIFIED
                    ),
                    generation_count=b["generations"],
                    count_by_kind=b["count_by_kind"],
                    mean_rating=b["mean_rating"],
                    thumbs_down_rate=b["thumbs_down_rate"],
                    preference_win_rate=b["preference_win_rate"],
                )
                for b in buckets
            ]
        )

    async def ExportFeedback(
        self, request: Any, context: Any
    ) -> AsyncIterator[api.ExportFeedbackResponse]:
        async for chunk in self.service.reports.export(request.tenant_id, request.filter):
            lines = [json.dumps(export_line(*row), ensure_ascii=False) for row in chunk]
            yield api.ExportFeedbackResponse(
                jsonl_chunk=("\n".join(lines) + "\n").encode(), line_count=len(lines)
            )
