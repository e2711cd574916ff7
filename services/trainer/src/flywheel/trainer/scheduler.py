"""Runs queued jobs, one per device at a time, each in its own process (see runner.py).

The scheduler is the only writer of running jobs' rows. Each round it:
- starts the highest-priority queued job on every free device, after putting the job's
  data (snapshot files, parent adapter) into its work folder;
- follows running jobs' progress files into the table, `/metrics` and (at most every few
  seconds per job) `training.job_progress` events; stops jobs whose cancel was asked;
- finishes jobs whose process exited: publishes the adapter, or fails the job with the
  tail of its log as the reason.

When the service starts, jobs still marked RUNNING lost their supervisor (the service
died with them, or the machine went down): their processes are started again on the
same work folders, so they resume from their last complete checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

import prometheus_client
from google.protobuf import json_format

from flywheel.contracts.common.v1.common_pb2 import AdapterRef
from flywheel.contracts.trainer.v1 import events_pb2 as te
from flywheel.contracts.trainer.v1 import resources_pb2 as tr
from flywheel.core.artifacts import ArtifactStore, copy_out, sha256_file
from flywheel.core.events.outbox import add_event
from flywheel.core.layout import snapshot_file_key
from flywheel.trainer import checkpoints, manifest, specs
from flywheel.trainer.jobs import SOURCE_SERVICE, AdapterStore, JobStore, now
from flywheel.trainer.launch import devices_needed, job_command
from flywheel.trainer.models import JobRow
from flywheel.trainer.runner import ARTIFACTS_ENV, PROGRESS, SPEC, RecordedOutcome
from flywheel.trainer.spec import TrainSpec

log = logging.getLogger(__name__)
LOG_FILE = "job.log"

JOB_STEP = prometheus_client.Gauge(
    "flywheel_trainer_job_step", "Optimizer step of running jobs", ["tenant", "job"]
)
JOB_LOSS = prometheus_client.Gauge(
    "flywheel_trainer_job_loss", "Latest training loss of running jobs", ["tenant", "job"]
)
JOB_TOKENS = prometheus_client.Gauge(
    "flywheel_trainer_job_tokens_per_second",
    "Training throughput of running jobs",
    ["tenant", "job"],
)
JOBS_FINISHED = prometheus_client.Counter(
    "flywheel_trainer_jobs_finished_total", "Jobs that finished, by final state", ["state"]
)


class JobSetupError(Exception):
    """The job's inputs cannot be put in place (missing snapshot, bad parent adapter)."""


@dataclass
class Running:
    """A job process the scheduler follows."""

    job_id: str
    tenant_id: str
    device: str
    work_dir: Path
    process: asyncio.subprocess.Process
    log_file: IO[bytes]
    progress_offset: int = 0
    last_event_at: float = 0.0
    stopping: bool = False
    labels: tuple[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.labels = (self.tenant_id, self.job_id)


def work_dir_of(root: Path, job_id: str) -> Path:
    return root / job_id


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log, for a failure's reason."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


class Scheduler:
    """Starts, follows and finishes job processes on a fixed set of devices."""

    def __init__(
        self,
        jobs: JobStore,
        adapters: AdapterStore,
        store: ArtifactStore,
        *,
        work_root: Path,
        artifacts_dir: Path,
        devices: list[str],
        checkpoint_every: int,
        poll_s: float = 1.0,
        progress_event_interval_s: float = 5.0,
    ) -> None:
        self.jobs, self.adapters, self.store = jobs, adapters, store
        self.work_root = work_root
        self.artifacts_dir = artifacts_dir
        self.devices = devices
        self.checkpoint_every = checkpoint_every
        self.poll_s = poll_s
        self.progress_event_interval_s = progress_event_interval_s
        self.running: dict[str, Running] = {}
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Look at the queue now rather than at the next poll."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Schedule until ``stop``; running job processes are stopped with the service
        (they resume from their checkpoints when it starts again)."""
        await self._resume_orphans()
        try:
            while not stop.is_set():
                await self.round()
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(_first(stop, self._wake), self.poll_s)
        finally:
            for running in list(self.running.values()):
                await self._terminate(running)

    async def round(self) -> None:
        """One pass: follow and finish running jobs, then start queued ones in priority
        order while the next one's devices are free."""
        for running in list(self.running.values()):
            await self._follow(running)
        while (row := await self.jobs.next_queued()) is not None:
            wanted = max(1, devices_needed(specs.from_json(row.spec).resources))
            if wanted > len(self.devices):
                reason = f"asks for {wanted} GPUs; this trainer has {len(self.devices)} devices"
                await self._finish(row.job_id, tr.JOB_STATE_FAILED, reason)
                continue
            devices = self._free_devices(wanted)
            if devices is None:
                return
            await self._start(row, ",".join(devices))

    def _busy(self) -> set[str]:
        return {d for r in self.running.values() for d in r.device.split(",")}

    def _free_devices(self, wanted: int) -> list[str] | None:
        free = [d for d in self.devices if d not in self._busy()]
        return free[:wanted] if len(free) >= wanted else None

    async def _resume_orphans(self) -> None:
        for row in await self.jobs.in_state(tr.JOB_STATE_RUNNING):
            devices = row.device.split(",")
            if not set(devices) <= set(self.devices) or set(devices) & self._busy():
                # Its devices are gone or taken: back in the queue, ahead of later jobs.
                await self.jobs.change(
                    row.job_id, state=tr.JOB_STATE_QUEUED, state_reason="requeued after restart"
                )
                continue
            log.info("resuming job %s on %s after a restart", row.job_id, row.device)
            await self._spawn(row, row.device)

    # -- starting ---------------------------------------------------------------------------

    async def _start(self, row: JobRow, device: str) -> None:
        try:
            await self._prepare(row)
        except JobSetupError as exc:
            await self._finish(row.job_id, tr.JOB_STATE_FAILED, str(exc))
            return
        await self.jobs.change(
            row.job_id, state=tr.JOB_STATE_RUNNING, device=device, started_at=now(), state_reason=""
        )
        await self._spawn(row, device)

    async def _prepare(self, row: JobRow) -> None:
        """The job's work folder with spec.json, its data and its parent adapter."""
        spec = specs.from_json(row.spec)
        work_dir = work_dir_of(self.work_root, row.job_id)
        data_dir = work_dir / "data"
        train_key = snapshot_file_key(row.tenant_id, spec.dataset_snapshot_id, "train")
        if not self.store.exists(train_key):
            raise JobSetupError(
                f"dataset snapshot {spec.dataset_snapshot_id} is not in the artifact store"
            )
        copy_out(self.store, train_key, data_dir / "train.jsonl")
        eval_file = None
        eval_key = snapshot_file_key(row.tenant_id, spec.dataset_snapshot_id, "eval")
        if self.store.exists(eval_key) and self.store.info(eval_key).size:
            eval_file = data_dir / "eval.jsonl"
            copy_out(self.store, eval_key, eval_file)
        parent = None
        if spec.HasField("parent_adapter"):
            parent = await self._fetch_parent(
                row.tenant_id, spec.parent_adapter, work_dir / "parent"
            )
        run_spec = specs.train_spec(
            spec, adapter_name=spec.adapter_name or specs.default_adapter_name(row.tenant_id, spec),
            train_file=data_dir / "train.jsonl", eval_file=eval_file, parent_adapter=parent,
            default_checkpoint_every=self.checkpoint_every,
        )  # fmt: skip
        (work_dir / SPEC).write_text(json.dumps(run_spec.to_json(), indent=1))

    async def _fetch_parent(self, tenant_id: str, ref: AdapterRef, target: Path) -> Path:
        """The parent adapter's files, each checked against its manifest's sha256."""
        try:
            parent = await self.adapters.get(tenant_id, ref.name, ref.version)
        except Exception as exc:
            raise JobSetupError(f"parent adapter {ref.name}@{ref.version}: {exc}") from exc
        prefix = self.store.key_of(parent.artifact.uri)
        for digest in parent.files:
            path = target / digest.path
            copy_out(self.store, f"{prefix}/{digest.path}", path)
            if sha256_file(path) != digest.sha256:
                raise JobSetupError(
                    f"parent adapter file {digest.path} does not match its manifest"
                )
        (target / manifest.MANIFEST).write_text(manifest.to_json(parent))
        return target

    async def _spawn(self, row: JobRow, device: str) -> None:
        work_dir = work_dir_of(self.work_root, row.job_id)
        env = {**os.environ, ARTIFACTS_ENV: str(self.artifacts_dir)}
        # The job sees only its own GPUs (none for "cpu").
        gpus = [d.removeprefix("cuda:") for d in device.split(",") if d.startswith("cuda:")]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        log_file = (work_dir / LOG_FILE).open("ab")
        command = job_command(specs.from_json(row.spec).resources, work_dir)
        process = await asyncio.create_subprocess_exec(
            *command, stdout=log_file, stderr=asyncio.subprocess.STDOUT, env=env,
            start_new_session=True,  # a cancel signals the job's whole process group
        )  # fmt: skip
        progress = work_dir / PROGRESS
        offset = progress.stat().st_size if progress.exists() else 0
        self.running[row.job_id] = Running(
            row.job_id, row.tenant_id, device, work_dir, process, log_file, offset
        )

    # -- following --------------------------------------------------------------------------

    async def _follow(self, running: Running) -> None:
        await self._read_progress(running)
        if running.process.returncode is None:
            row = await self.jobs.row(None, running.job_id)
            if row.cancel_requested and not running.stopping:
                running.stopping = True
                await self._terminate(running)
            return
        await self._exited(running)

    async def _read_progress(self, running: Running) -> None:
        path = running.work_dir / PROGRESS
        if not path.exists():
            return
        with path.open("rb") as f:
            f.seek(running.progress_offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written waits for the next round
        running.progress_offset += len(complete)
        lines = [json.loads(line) for line in complete.splitlines() if line.strip()]
        if not lines:
            return
        latest = lines[-1]
        progress = _progress_message(latest)
        JOB_STEP.labels(*running.labels).set(progress.step)
        JOB_TOKENS.labels(*running.labels).set(progress.tokens_per_second)
        if progress.HasField("loss"):
            JOB_LOSS.labels(*running.labels).set(progress.loss)
        step = checkpoints.last_marked_step(running.work_dir / "checkpoints")
        await self.jobs.change(
            running.job_id,
            progress=json_format.MessageToDict(progress),
            last_checkpoint_step=step,
        )
        if time.monotonic() - running.last_event_at >= self.progress_event_interval_s:
            running.last_event_at = time.monotonic()
            await self._progress_event(running, progress)

    async def _progress_event(self, running: Running, progress: tr.JobProgress) -> None:
        event = te.JobProgressReported(
            job_id=running.job_id, tenant_id=running.tenant_id, progress=progress
        )
        async with self.jobs.sessions() as session, session.begin():
            add_event(session, running.tenant_id, event, source_service=SOURCE_SERVICE)
        self.jobs.on_commit()

    async def _terminate(self, running: Running) -> None:
        """SIGTERM the job's process group, SIGKILL after a grace period."""
        if running.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(running.process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(running.process.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(running.process.pid, signal.SIGKILL)
            await running.process.wait()

    # -- finishing --------------------------------------------------------------------------

    async def _exited(self, running: Running) -> None:
        del self.running[running.job_id]
        running.log_file.close()
        for gauge in (JOB_STEP, JOB_LOSS, JOB_TOKENS):
            with contextlib.suppress(KeyError):
                gauge.remove(*running.labels)
        row = await self.jobs.row(None, running.job_id)
        code = running.process.returncode
        if row.cancel_requested:
            await self._finish(row.job_id, tr.JOB_STATE_CANCELLED, row.state_reason or "cancelled")
            return
        outcome = RecordedOutcome.read(running.work_dir) if code == 0 else None
        if outcome is None:
            how = (
                f"killed by signal {-code}"
                if code is not None and code < 0
                else f"exit status {code}"
            )
            reason = f"job process ended ({how})\n{tail(running.work_dir / LOG_FILE)}"
            await self._finish(row.job_id, tr.JOB_STATE_FAILED, reason)
            return
        try:
            await self._publish(row, outcome)
        except Exception as exc:  # a broken artifact store must fail the job, not the scheduler
            log.exception("publishing the adapter of job %s failed", row.job_id)
            await self._finish(
                row.job_id, tr.JOB_STATE_FAILED, f"publishing the adapter failed: {exc}"
            )
            return
        JOBS_FINISHED.labels("succeeded").inc()

    async def _publish(self, row: JobRow, outcome: RecordedOutcome) -> None:
        run_spec = TrainSpec.from_json(
            json.loads((work_dir_of(self.work_root, row.job_id) / SPEC).read_text())
        )
        spec = specs.from_json(row.spec)
        parent = AdapterRef()
        if spec.HasField("parent_adapter"):
            parent.CopyFrom(spec.parent_adapter)
        built = manifest.build_manifest(
            run_spec, outcome, tenant_id=row.tenant_id,
            adapter=AdapterRef(name=run_spec.adapter_name), parent=parent if parent.name else None,
            job_id=row.job_id, training_request_id=row.training_request_id or "",
        )  # fmt: skip
        await self.jobs.publish_adapter(
            row.job_id, built, lambda m: manifest.publish(self.store, m, outcome.adapter_dir)
        )

    async def _finish(self, job_id: str, state: int, reason: str) -> None:
        await self.jobs.change(job_id, state=state, state_reason=reason[-4000:], finished_at=now())
        JOBS_FINISHED.labels(tr.JobState.Name(state).removeprefix("JOB_STATE_").lower()).inc()  # type: ignore[arg-type]


def _progress_message(data: dict[str, Any]) -> tr.JobProgress:
    """A progress line of the job process (a `Progress` as JSON) as the API's message."""
    progress = tr.JobProgress(
        step=int(data["step"]),
        total_steps=int(data["total_steps"]),
        epoch=float(data["epoch"]),
        tokens_per_second=float(data["tokens_per_second"]),
        metrics={k: float(v) for k, v in (data.get("metrics") or {}).items()},
    )
    for name in ("loss", "reward_margin"):
        if data.get(name) is not None:
            setattr(progress, name, float(data[name]))
    progress.eta.FromTimedelta(timedelta(seconds=float(data["eta_seconds"])))
    progress.updated_at.FromDatetime(now())
    return progress


async def _first(*events: asyncio.Event) -> None:
    """Return when any of ``events`` is set."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
