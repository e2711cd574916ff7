"""Jobs at rest: rows, state changes and the events that announce them.

Every state change writes the job row and a `JobStatusChanged` event in one transaction
(outbox), so what consumers hear is exactly what the table says.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from flywheel.contracts.common.v1.common_pb2 import AdapterRef
from flywheel.contracts.trainer.v1 import events_pb2 as te
from flywheel.contracts.trainer.v1 import resources_pb2 as tr
from flywheel.core.db import SessionFactory
from flywheel.core.errors import Conflict, NotFound
from flywheel.core.events.outbox import add_event
from flywheel.core.paging import Page, newest_first_page
from flywheel.trainer import specs
from flywheel.trainer.models import AdapterRow, JobRow

SOURCE_SERVICE = "trainer"
FINISHED = (tr.JOB_STATE_SUCCEEDED, tr.JOB_STATE_FAILED, tr.JOB_STATE_CANCELLED)


def now() -> datetime:
    return datetime.now(UTC)


def to_message(row: JobRow) -> tr.Job:
    """The job as the API shows it."""
    job = tr.Job(
        job_id=row.job_id,
        tenant_id=row.tenant_id,
        spec=specs.from_json(row.spec),
        state=row.state,  # type: ignore[arg-type]
        state_reason=row.state_reason,
        priority=row.priority,
        attempt=row.attempt,
        device=row.device,
        progress=json_format.ParseDict(row.progress or {}, tr.JobProgress()),
    )
    if row.retry_of_job_id:
        job.retry_of_job_id = row.retry_of_job_id
    if row.training_request_id:
        job.training_request_id = row.training_request_id
    if row.last_checkpoint_step is not None:
        job.last_checkpoint_step = row.last_checkpoint_step
    if row.adapter_name and row.adapter_version:
        job.adapter.CopyFrom(AdapterRef(name=row.adapter_name, version=row.adapter_version))
    for field, value in (("created_at", row.created_at), ("started_at", row.started_at),
                         ("finished_at", row.finished_at)):  # fmt: skip
        if value is not None:
            getattr(job, field).FromDatetime(value)
    return job


class JobStore:
    """The jobs table, within one tenant for callers and across tenants for the scheduler."""

    def __init__(self, sessions: SessionFactory, *, on_commit: Callable[[], None]) -> None:
        self.sessions = sessions
        self.on_commit = on_commit

    async def _announce(self, session: AsyncSession, row: JobRow, previous: int) -> None:
        event = te.JobStatusChanged(job=to_message(row), previous_state=previous)  # type: ignore[arg-type]
        add_event(session, row.tenant_id, event, source_service=SOURCE_SERVICE)

    async def create(
        self,
        tenant_id: str,
        spec: tr.TrainingSpec,
        *,
        priority: int = 0,
        client_request_id: str | None = None,
        training_request_id: str | None = None,
        retry_of: JobRow | None = None,
    ) -> tuple[tr.Job, bool]:
        """A new queued job, or the one already made for the same request id."""
        existing = await self._by_request(tenant_id, client_request_id, training_request_id)
        if existing is not None:
            return to_message(existing), False
        row = JobRow(
            job_id=str(uuid.uuid4()), tenant_id=tenant_id, spec=specs.to_json(spec),
            task=spec.task, method=spec.method, state=tr.JOB_STATE_QUEUED, state_reason="",
            priority=priority, attempt=retry_of.attempt + 1 if retry_of else 1,
            retry_of_job_id=retry_of.job_id if retry_of else None,
            client_request_id=client_request_id, training_request_id=training_request_id,
            progress={}, device="", cancel_requested=False, created_at=now(),
        )  # fmt: skip
        try:
            async with self.sessions() as session, session.begin():
                session.add(row)
                await session.flush()
                await self._announce(session, row, tr.JOB_STATE_UNSPECIFIED)
        except IntegrityError:
            # A concurrent submit of the same request id won the race: return its job.
            existing = await self._by_request(tenant_id, client_request_id, training_request_id)
            if existing is None:
                raise
            return to_message(existing), False
        self.on_commit()
        return to_message(row), True

    async def _by_request(
        self, tenant_id: str, client_request_id: str | None, training_request_id: str | None
    ) -> JobRow | None:
        conditions = []
        if client_request_id:
            conditions.append(JobRow.client_request_id == client_request_id)
        if training_request_id:
            conditions.append(JobRow.training_request_id == training_request_id)
        if not conditions:
            return None
        async with self.sessions() as session:
            statement = select(JobRow).where(JobRow.tenant_id == tenant_id, or_(*conditions))
            return (await session.scalars(statement)).first()

    async def row(self, tenant_id: str | None, job_id: str) -> JobRow:
        """The job's row; `NotFound` outside ``tenant_id`` (None: any tenant)."""
        async with self.sessions() as session:
            row = await session.get(JobRow, job_id)
        if row is None or (tenant_id is not None and row.tenant_id != tenant_id):
            raise NotFound("job", job_id)
        return row

    async def list_jobs(
        self, tenant_id: str, *, states: list[int], task: str | None, method: int | None,
        page_size: int, cursor: str,
    ) -> Page[tr.Job]:  # fmt: skip
        """The tenant's jobs, newest first."""
        j = JobRow
        statement = select(j).where(j.tenant_id == tenant_id)
        if states:
            statement = statement.where(j.state.in_(states))
        if task is not None:
            statement = statement.where(j.task == task)
        if method:
            statement = statement.where(j.method == method)
        async with self.sessions() as session:
            rows, next_cursor = await newest_first_page(
                session, statement, created=j.created_at, ident=j.job_id,
                position_of=lambda r: (r.created_at, r.job_id), page_size=page_size, cursor=cursor,
            )  # fmt: skip
        return Page([to_message(r) for r in rows], next_cursor)

    async def change(self, job_id: str, **values: Any) -> tr.Job:
        """Update the job; a new state is announced with the change, in one transaction."""
        async with self.sessions() as session, session.begin():
            row = await session.get(JobRow, job_id, with_for_update=True)
            if row is None:
                raise NotFound("job", job_id)
            previous = row.state
            for key, value in values.items():
                setattr(row, key, value)
            if "state" in values and values["state"] != previous:
                await self._announce(session, row, previous)
            message = to_message(row)
        self.on_commit()
        return message

    async def request_cancel(self, tenant_id: str, job_id: str, reason: str) -> tr.Job:
        """Cancel a queued job at once; a running one is flagged for the scheduler to stop."""
        async with self.sessions() as session, session.begin():
            row = await session.get(JobRow, job_id, with_for_update=True)
            if row is None or row.tenant_id != tenant_id:
                raise NotFound("job", job_id)
            if row.state in FINISHED:
                raise Conflict(f"job {job_id} has already finished")
            previous = row.state
            row.state_reason = reason
            if row.state == tr.JOB_STATE_QUEUED:
                row.state, row.finished_at = tr.JOB_STATE_CANCELLED, now()
                await self._announce(session, row, previous)
            else:
                row.cancel_requested = True
            message = to_message(row)
        self.on_commit()
        return message

    async def next_queued(self) -> JobRow | None:
        """The job to run next: highest priority, then first come."""
        statement = (
            select(JobRow)
            .where(JobRow.state == tr.JOB_STATE_QUEUED)
            .order_by(JobRow.priority.desc(), JobRow.created_at, JobRow.job_id)
            .limit(1)
        )
        async with self.sessions() as session:
            return (await session.scalars(statement)).first()

    async def in_state(self, state: int) -> list[JobRow]:
        async with self.sessions() as session:
            return list((await session.scalars(select(JobRow).where(JobRow.state == state))).all())

    async def publish_adapter(
        self,
        job_id: str,
        manifest: tr.AdapterManifest,
        add_files: Callable[[tr.AdapterManifest], tr.AdapterManifest],
    ) -> tr.AdapterManifest:
        """Give the adapter its version, store its files, and in one transaction record it,
        mark the job succeeded and stage ``adapter.published`` and the status change."""
        async with self.sessions() as session, session.begin():
            row = await session.get(JobRow, job_id, with_for_update=True)
            if row is None:
                raise NotFound("job", job_id)
            count = await session.scalar(
                select(func.count())
                .select_from(AdapterRow)
                .where(
                    AdapterRow.tenant_id == row.tenant_id, AdapterRow.name == manifest.adapter.name
                )
            )
            number = int(count or 0) + 1
            manifest.adapter.version = f"v{number}"
            manifest = add_files(manifest)
            ref = manifest.adapter
            session.add(AdapterRow(
                tenant_id=row.tenant_id, name=ref.name, version=ref.version,
                number=number, task=manifest.task, job_id=job_id,
                manifest=json_format.MessageToDict(manifest, preserving_proto_field_name=True),
                created_at=now(),
            ))  # fmt: skip
            previous = row.state
            row.state, row.finished_at, row.state_reason = tr.JOB_STATE_SUCCEEDED, now(), ""
            row.adapter_name, row.adapter_version = manifest.adapter.name, manifest.adapter.version
            add_event(session, row.tenant_id, te.AdapterPublished(manifest=manifest),
                      source_service=SOURCE_SERVICE)  # fmt: skip
            await self._announce(session, row, previous)
        self.on_commit()
        return manifest


def manifest_of(row: AdapterRow) -> tr.AdapterManifest:
    return json_format.ParseDict(row.manifest, tr.AdapterManifest())


class AdapterStore:
    """Published adapters, within one tenant."""

    def __init__(self, sessions: SessionFactory) -> None:
        self.sessions = sessions

    async def get(self, tenant_id: str, name: str, version: str) -> tr.AdapterManifest:
        async with self.sessions() as session:
            if version:
                row = await session.get(AdapterRow, (tenant_id, name, version))
            else:  # the newest version of the name
                statement = (
                    select(AdapterRow)
                    .where(AdapterRow.tenant_id == tenant_id, AdapterRow.name == name)
                    .order_by(AdapterRow.number.desc())
                    .limit(1)
                )
                row = (await session.scalars(statement)).first()
        if row is None:
            raise NotFound("adapter", f"{name}@{version or 'latest'}")
        return manifest_of(row)

    async def list(
        self, tenant_id: str, *, task: str | None, name: str | None, page_size: int, cursor: str
    ) -> Page[tr.AdapterManifest]:
        a = AdapterRow
        statement = select(a).where(a.tenant_id == tenant_id)
        if task is not None:
            statement = statement.where(a.task == task)
        if name is not None:
            statement = statement.where(a.name == name)
        async with self.sessions() as session:
            rows, next_cursor = await newest_first_page(
                session, statement, created=a.created_at, ident=a.name + "@" + a.version,
                position_of=lambda r: (r.created_at, f"{r.name}@{r.version}"),
                page_size=page_size, cursor=cursor,
            )  # fmt: skip
        return Page([manifest_of(r) for r in rows], next_cursor)
