"""The trainer's domain: jobs from requests, their lifecycle, their logs and adapters.

Free of gRPC and Kafka: the transport calls these methods, the consumer hands over event
records, and the scheduler (scheduler.py) runs what is queued.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import prometheus_client

from flywheel.contracts.dataset.v1 import events_pb2 as de
from flywheel.contracts.trainer.v1 import resources_pb2 as tr
from flywheel.core.errors import Conflict, DomainError
from flywheel.core.events.bus import EventRecord
from flywheel.core.events.envelope import parse, unpack
from flywheel.core.events.topics import EventType
from flywheel.core.paging import Page
from flywheel.trainer import checkpoints, specs
from flywheel.trainer.jobs import FINISHED, AdapterStore, JobStore, to_message
from flywheel.trainer.scheduler import LOG_FILE, work_dir_of

log = logging.getLogger(__name__)
REJECTED_REQUESTS = prometheus_client.Counter(
    "flywheel_trainer_rejected_requests_total", "training.requested events whose spec was invalid"
)
WATCH_POLL_S = 0.5


class TrainerService:
    """Training jobs and adapters of each tenant."""

    def __init__(
        self,
        jobs: JobStore,
        adapters: AdapterStore,
        *,
        work_root: Path,
        default_base_model: str,
        wake_scheduler: Callable[[], None],
    ) -> None:
        self.jobs = jobs
        self.adapters = adapters
        self.work_root = work_root
        self.default_base_model = default_base_model
        self.wake_scheduler = wake_scheduler

    async def submit(
        self,
        tenant_id: str,
        spec: tr.TrainingSpec,
        *,
        priority: int = 0,
        client_request_id: str | None = None,
        training_request_id: str | None = None,
    ) -> tr.Job:
        """Queue a job (or return the one already queued for the same request id)."""
        checked = specs.check(spec, default_base_model=self.default_base_model)
        job, created = await self.jobs.create(
            tenant_id, checked, priority=priority,
            client_request_id=client_request_id, training_request_id=training_request_id,
        )  # fmt: skip
        if created:
            self.wake_scheduler()
        return job

    async def apply(self, records: Sequence[EventRecord]) -> int:
        """Queue a job for each ``training.requested`` in the batch; returns how many were new
        or repeated. Other events on the topic (the trainer's own) are skipped; a request
        with an invalid spec is counted and logged, never retried forever."""
        handled = 0
        for record in records:
            if record.event_type != EventType.TRAINING_REQUESTED:
                continue
            request = unpack(parse(record.value), de.TrainingRequested).request
            try:
                await self.submit(
                    request.tenant_id, request.spec, priority=request.priority,
                    training_request_id=request.training_request_id,
                )  # fmt: skip
            except DomainError as exc:
                REJECTED_REQUESTS.inc()
                log.warning("training request %s rejected: %s", request.training_request_id, exc)
                continue
            handled += 1
        return handled

    async def get(self, tenant_id: str, job_id: str) -> tr.Job:
        return to_message(await self.jobs.row(tenant_id, job_id))

    async def list_jobs(
        self, tenant_id: str, *, states: list[int], task: str | None, method: int | None,
        page_size: int, cursor: str,
    ) -> Page[tr.Job]:  # fmt: skip
        return await self.jobs.list_jobs(
            tenant_id, states=states, task=task, method=method, page_size=page_size, cursor=cursor
        )

    async def cancel(self, tenant_id: str, job_id: str, reason: str) -> tr.Job:
        job = await self.jobs.request_cancel(tenant_id, job_id, reason or "cancelled by request")
        self.wake_scheduler()
        return job

    async def retry(self, tenant_id: str, job_id: str, *, from_scratch: bool) -> tr.Job:
        """A new attempt of a failed or cancelled job, resuming from its last complete
        checkpoint unless ``from_scratch``."""
        row = await self.jobs.row(tenant_id, job_id)
        if row.state not in (tr.JOB_STATE_FAILED, tr.JOB_STATE_CANCELLED):
            raise Conflict(f"only failed or cancelled jobs can be retried; {job_id} is "
                           + tr.JobState.Name(row.state).removeprefix("JOB_STATE_").lower())  # type: ignore[arg-type]  # fmt: skip
        job, _ = await self.jobs.create(
            tenant_id, specs.from_json(row.spec), priority=row.priority, retry_of=row
        )
        if not from_scratch:
            self._carry_checkpoint(row.job_id, job.job_id)
        self.wake_scheduler()
        return job

    def _carry_checkpoint(self, old_job_id: str, new_job_id: str) -> None:
        old = work_dir_of(self.work_root, old_job_id) / "checkpoints"
        latest = checkpoints.latest_complete(old)
        if latest is None:
            return
        target = work_dir_of(self.work_root, new_job_id) / "checkpoints" / latest.name
        shutil.copytree(latest, target)

    async def watch(self, tenant_id: str, job_id: str) -> AsyncIterator[tr.Job]:
        """The job now, then after every change, until it finishes."""
        last = b""
        while True:
            job = await self.get(tenant_id, job_id)
            current = job.SerializeToString(deterministic=True)
            if current != last:
                last = current
                yield job
            if job.state in FINISHED:
                return
            await asyncio.sleep(WATCH_POLL_S)

    async def logs(
        self, tenant_id: str, job_id: str, *, follow: bool, tail_lines: int
    ) -> AsyncIterator[tuple[datetime, str]]:
        """The job's log lines (the last ``tail_lines``, 0: all), then new ones if ``follow``."""
        await self.jobs.row(tenant_id, job_id)  # NotFound outside the tenant
        path = work_dir_of(self.work_root, job_id) / LOG_FILE
        offset = 0
        first = True
        while True:
            lines, offset = _read_lines(path, offset)
            if first and tail_lines:
                lines = lines[-tail_lines:]
            first = False
            for line in lines:
                yield datetime.now(UTC), line
            if not follow:
                return
            # Following ends once the job has finished and its log has no more lines.
            if not lines and (await self.get(tenant_id, job_id)).state in FINISHED:
                return
            await asyncio.sleep(WATCH_POLL_S)


def _read_lines(path: Path, offset: int) -> tuple[list[str], int]:
    """Whole lines of ``path`` after ``offset``, and the offset after them."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:
        return [], offset
    complete = chunk[: chunk.rfind(b"\n") + 1]
    text = complete.decode(errors="replace")
    return text.splitlines(), offset + len(complete)
