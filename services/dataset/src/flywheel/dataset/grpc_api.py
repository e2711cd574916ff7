"""gRPC transport of the dataset service: messages in, one domain call, messages out.

Domain errors become statuses in :class:`flywheel.core.rpc.DomainErrorInterceptor`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf.struct_pb2 import Struct

from flywheel.contracts.common.v1.common_pb2 import PageResponse
from flywheel.contracts.dataset.v1 import service_pb2 as api
from flywheel.contracts.dataset.v1.service_pb2_grpc import DatasetServiceServicer
from flywheel.core.errors import FieldError, InvalidArgument
from flywheel.dataset.service import DatasetService


def _structs(lines: list[str], size: int) -> list[Struct]:
    out = []
    for line in lines[:size]:
        row = Struct()
        row.update(json.loads(line))
        out.append(row)
    return out


def _required(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(FieldError(field, "is required"))
    return value


class DatasetServicer(DatasetServiceServicer):
    """DatasetService over the domain."""

    def __init__(self, service: DatasetService) -> None:
        self.service = service

    async def BuildSnapshot(self, request: Any, context: Any) -> api.BuildSnapshotResponse:
        snapshot, created = await self.service.build_snapshot(
            _required(request.tenant_id, "tenant_id"), request.spec
        )
        return api.BuildSnapshotResponse(snapshot=snapshot, created=created)

    async def PreviewSnapshot(self, request: Any, context: Any) -> api.PreviewSnapshotResponse:
        stats, quality, sample = await self.service.preview(
            _required(request.tenant_id, "tenant_id"), request.spec, request.sample_size
        )
        return api.PreviewSnapshotResponse(
            stats=stats, quality=quality, sample_rows=_structs(sample, len(sample))
        )

    async def GetSnapshot(self, request: Any, context: Any) -> api.GetSnapshotResponse:
        snapshot = await self.service.get(
            _required(request.tenant_id, "tenant_id"),
            _required(request.snapshot_id, "snapshot_id"),
        )
        return api.GetSnapshotResponse(snapshot=snapshot)

    async def ListSnapshots(self, request: Any, context: Any) -> api.ListSnapshotsResponse:
        page = await self.service.list_snapshots(
            _required(request.tenant_id, "tenant_id"),
            task=request.task if request.HasField("task") else None,
            kind=request.kind,
            page_size=request.page.page_size,
            cursor=request.page.cursor,
        )
        return api.ListSnapshotsResponse(
            snapshots=page.items, page=PageResponse(next_cursor=page.next_cursor)
        )

    async def DiffSnapshots(self, request: Any, context: Any) -> api.DiffSnapshotsResponse:
        base, target, added, removed, unchanged = await self.service.diff(
            _required(request.tenant_id, "tenant_id"),
            _required(request.base_snapshot_id, "base_snapshot_id"),
            _required(request.target_snapshot_id, "target_snapshot_id"),
            request.sample_size,
        )
        return api.DiffSnapshotsResponse(
            rows_added=len(added),
            rows_removed=len(removed),
            rows_unchanged=unchanged,
            base_stats=base.stats,
            target_stats=target.stats,
            added_sample=_structs(added, request.sample_size),
            removed_sample=_structs(removed, request.sample_size),
        )

    async def DownloadSnapshot(
        self, request: Any, context: Any
    ) -> AsyncIterator[api.DownloadSnapshotResponse]:
        file, chunks = await self.service.download(
            _required(request.tenant_id, "tenant_id"),
            _required(request.snapshot_id, "snapshot_id"),
            request.split,
            request.format,
        )
        yield api.DownloadSnapshotResponse(file=file)
        for chunk in chunks:
            yield api.DownloadSnapshotResponse(chunk=chunk)

    async def RequestTraining(self, request: Any, context: Any) -> api.RequestTrainingResponse:
        made = await self.service.request_training(
            _required(request.tenant_id, "tenant_id"),
            snapshot_id=request.snapshot_id if request.HasField("snapshot_id") else None,
            spec=request.snapshot_spec,
            training=request.training,
            priority=request.priority,
            reason=request.reason,
        )
        return api.RequestTrainingResponse(training_request=made)

    async def GetTriggerPolicy(self, request: Any, context: Any) -> api.GetTriggerPolicyResponse:
        found = await self.service.get_policy(
            _required(request.tenant_id, "tenant_id"), request.task
        )
        return api.GetTriggerPolicyResponse(policy=found)

    async def UpdateTriggerPolicy(
        self, request: Any, context: Any
    ) -> api.UpdateTriggerPolicyResponse:
        stored = await self.service.update_policy(
            _required(request.tenant_id, "tenant_id"), request.policy
        )
        return api.UpdateTriggerPolicyResponse(policy=stored)
