"""gRPC transport of the trainer service: messages in, one domain call, messages out.

Domain errors become statuses in :class:`flywheel.core.rpc.DomainErrorInterceptor`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from flywheel.contracts.common.v1.common_pb2 import PageResponse
from flywheel.contracts.trainer.v1 import service_pb2 as api
from flywheel.contracts.trainer.v1.service_pb2_grpc import TrainerServiceServicer
from flywheel.core.errors import FieldError, InvalidArgument
from flywheel.trainer.service import TrainerService


def _required(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(FieldError(field, "is required"))
    return value


def _optional(request: Any, field: str) -> Any:
    return getattr(request, field) if request.HasField(field) else None


class TrainerServicer(TrainerServiceServicer):
    """TrainerService over the domain."""

    def __init__(self, service: TrainerService) -> None:
        self.service = service

    async def SubmitJob(self, request: Any, context: Any) -> api.SubmitJobResponse:
        job = await self.service.submit(
            _required(request.tenant_id, "tenant_id"), request.spec, priority=request.priority,
            client_request_id=_optional(request, "client_request_id"),
        )  # fmt: skip
        return api.SubmitJobResponse(job=job)

    async def GetJob(self, request: Any, context: Any) -> api.GetJobResponse:
        job = await self.service.get(
            _required(request.tenant_id, "tenant_id"), _required(request.job_id, "job_id")
        )
        return api.GetJobResponse(job=job)

    async def ListJobs(self, request: Any, context: Any) -> api.ListJobsResponse:
        page = await self.service.list_jobs(
            _required(request.tenant_id, "tenant_id"), states=list(request.states),
            task=_optional(request, "task"), method=_optional(request, "method"),
            page_size=request.page.page_size, cursor=request.page.cursor,
        )  # fmt: skip
        return api.ListJobsResponse(
            jobs=page.items, page=PageResponse(next_cursor=page.next_cursor)
        )

    async def CancelJob(self, request: Any, context: Any) -> api.CancelJobResponse:
        job = await self.service.cancel(
            _required(request.tenant_id, "tenant_id"), _required(request.job_id, "job_id"),
            _optional(request, "reason") or "",
        )  # fmt: skip
        return api.CancelJobResponse(job=job)

    async def RetryJob(self, request: Any, context: Any) -> api.RetryJobResponse:
        job = await self.service.retry(
            _required(request.tenant_id, "tenant_id"), _required(request.job_id, "job_id"),
            from_scratch=request.from_scratch,
        )  # fmt: skip
        return api.RetryJobResponse(job=job)

    async def WatchJob(self, request: Any, context: Any) -> AsyncIterator[api.WatchJobResponse]:
        jobs = self.service.watch(
            _required(request.tenant_id, "tenant_id"), _required(request.job_id, "job_id")
        )
        async for job in jobs:
            yield api.WatchJobResponse(job=job)

    async def StreamJobLogs(
        self, request: Any, context: Any
    ) -> AsyncIterator[api.StreamJobLogsResponse]:
        lines = self.service.logs(
            _required(request.tenant_id, "tenant_id"), _required(request.job_id, "job_id"),
            follow=request.follow, tail_lines=request.tail_lines,
        )  # fmt: skip
        async for when, line in lines:
            message = api.StreamJobLogsResponse(line=line)
            message.time.FromDatetime(when)
            yield message

    async def ListAdapters(self, request: Any, context: Any) -> api.ListAdaptersResponse:
        page = await self.service.adapters.list(
            _required(request.tenant_id, "tenant_id"), task=_optional(request, "task"),
            name=_optional(request, "adapter_name"), page_size=request.page.page_size,
            cursor=request.page.cursor,
        )  # fmt: skip
        return api.ListAdaptersResponse(
            adapters=page.items, page=PageResponse(next_cursor=page.next_cursor)
        )

    async def GetAdapter(self, request: Any, context: Any) -> api.GetAdapterResponse:
        manifest = await self.service.adapters.get(
            _required(request.tenant_id, "tenant_id"),
            _required(request.adapter.name, "adapter.name"),
            request.adapter.version,
        )
        return api.GetAdapterResponse(adapter=manifest)
