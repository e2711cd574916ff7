"""The dataset service's domain: consume feedback, build snapshots, request training.

Free of transport: the gRPC servicer and the consumer loop call this; it speaks in
messages of the contracts and domain errors.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import prometheus_client
from google.protobuf import json_format
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from flywheel.contracts.dataset.v1 import events_pb2 as de
from flywheel.contracts.dataset.v1 import resources_pb2 as ds
from flywheel.contracts.trainer.v1 import resources_pb2 as tr
from flywheel.core.artifacts import ArtifactStore
from flywheel.core.db import SessionFactory
from flywheel.core.errors import Conflict, FieldError, InvalidArgument
from flywheel.core.events.bus import EventRecord
from flywheel.core.events.outbox import add_event
from flywheel.core.paging import Page
from flywheel.dataset import ledger, policy
from flywheel.dataset.builder import BuildResult, build
from flywheel.dataset.curation import Votes
from flywheel.dataset.models import FeedbackVersion, TriggerPolicyRow
from flywheel.dataset.options import KIND_NAMES, BuildOptions, resolve
from flywheel.dataset.records import FeedbackFact, GenerationText
from flywheel.dataset.snapshots import SOURCE_SERVICE, SnapshotStore, stats_message
from flywheel.dataset.tokens import load_token_counter

log = logging.getLogger(__name__)
POLICY_FAILURES = prometheus_client.Counter(
    "flywheel_dataset_policy_failures_total", "Trigger policy evaluations that raised"
)

# What each kind of snapshot trains with, when a request does not say.
METHOD_OF_KIND = {
    "sft": tr.TRAINING_METHOD_SFT,
    "preference": tr.TRAINING_METHOD_DPO,
    "unpaired": tr.TRAINING_METHOD_KTO,
    "reward": tr.TRAINING_METHOD_REWARD,
}

# "name" or "owner/name", as the Hugging Face Hub spells model ids.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")

# Methods that can train on each kind of snapshot (online RL only needs its prompts).
ALLOWED_METHODS = {
    "sft": {tr.TRAINING_METHOD_SFT, tr.TRAINING_METHOD_GRPO, tr.TRAINING_METHOD_RLOO},
    "preference": {
        tr.TRAINING_METHOD_DPO,
        tr.TRAINING_METHOD_ORPO,
        tr.TRAINING_METHOD_GRPO,
        tr.TRAINING_METHOD_RLOO,
    },
    "unpaired": {tr.TRAINING_METHOD_KTO},
    "reward": {tr.TRAINING_METHOD_REWARD},
}


class DatasetService:
    """Snapshots, previews, diffs, training requests and the trigger policy of every tenant."""

    def __init__(
        self,
        sessions: SessionFactory,
        artifacts: ArtifactStore,
        *,
        build_defaults: BuildOptions,
        policy_defaults: policy.PolicyDefaults,
        tokenizer_roots: Sequence[Path] = (),
        on_commit: Callable[[], None] = lambda: None,
    ) -> None:
        self.sessions = sessions
        self.build_defaults = build_defaults
        # Folders whose tokenizer.json files specs may name by path.
        self.tokenizer_roots = list(tokenizer_roots)
        self.policy_defaults = policy_defaults
        self.on_commit = on_commit
        self.snapshots = SnapshotStore(sessions, artifacts, on_commit=on_commit)
        # One evaluation at a time: the consumer, the ticker and RPCs may all trigger.
        self._policy_lock = asyncio.Lock()

    # -- consuming ------------------------------------------------------------------------

    async def apply(self, records: Sequence[EventRecord]) -> ledger.Applied:
        """Apply a batch of feedback events (idempotent), then run the affected policies."""
        async with self.sessions() as session, session.begin():
            applied = await ledger.apply_events(session, records)
        for tenant_id, task in sorted(applied.scopes):
            try:
                await self.evaluate_policy(tenant_id, task)
            except Exception:
                # The events are applied and committed: a policy that cannot run (a bad
                # tokenizer setting, say) must not hold up consumption by failing the batch.
                POLICY_FAILURES.inc()
                log.exception("trigger policy of %s/%s failed", tenant_id, task)
        return applied

    # -- building -------------------------------------------------------------------------

    def options(self, spec: ds.SnapshotSpec) -> BuildOptions:
        """A request's spec resolved against the defaults (cutoff: now when unset)."""
        options = resolve(spec, self.build_defaults, now=datetime.now(UTC))
        self._check_tokenizer(options.tokenizer)
        return options

    def _check_tokenizer(self, spec: str) -> None:
        """Callers name a Hub model id or a tokenizer under the allowed folders, never any
        file of the server (which would let them probe its file system)."""
        if spec in ("", "builtin:regex", self.build_defaults.tokenizer):
            return
        if HUB_ID.fullmatch(spec) and ".." not in spec:
            return
        resolved = Path(spec).expanduser().resolve()
        if any(resolved.is_relative_to(root.resolve()) for root in self.tokenizer_roots):
            return
        raise InvalidArgument(
            FieldError(
                "spec.tokenizer",
                "must be a Hugging Face model id or a path under the service's tokenizer "
                "folders (FLYWHEEL_DATASET_TOKENIZER_DIRS)",
            )
        )

    async def run_build(self, tenant_id: str, options: BuildOptions) -> BuildResult:
        """Build the rows ``options`` ask for from the tenant's feedback as of the cutoff."""
        # Pairs on PostgreSQL: the database sums the votes up (same result, far less to read).
        summed = await ledger.load_pair_input(self.sessions, tenant_id, options)
        if summed is not None:
            return await self._build(summed.facts, summed.generations, options, summed.votes)
        facts, generations = await ledger.load_facts(self.sessions, tenant_id, options)
        return await self._build(facts, generations, options)

    async def _build(
        self,
        facts: list[FeedbackFact],
        generations: dict[str, GenerationText],
        options: BuildOptions,
        votes: dict[str, Votes] | None = None,
    ) -> BuildResult:
        counter = load_token_counter(options.tokenizer)
        # CPU-bound: off the event loop, so RPCs and the consumer keep going meanwhile.
        return await asyncio.to_thread(build, facts, generations, options, counter, votes)

    async def build_snapshot(
        self, tenant_id: str, spec: ds.SnapshotSpec, *, trigger: str = "manual"
    ) -> tuple[ds.Snapshot, bool]:
        """Build and store a snapshot (or find the identical one); refuses an empty one."""
        result = await self.run_build(tenant_id, self.options(spec))
        if not result.rows("train") and not result.rows("eval"):
            raise Conflict(
                "no usable rows for this spec (see PreviewSnapshot for what was dropped)"
            )
        return await self.snapshots.save(tenant_id, result, trigger)

    async def preview(
        self, tenant_id: str, spec: ds.SnapshotSpec, sample_size: int
    ) -> tuple[ds.SnapshotStats, ds.QualityReport, list[str]]:
        """What a build now would hold, without storing anything; sample rows as JSONL."""
        if sample_size > 100:
            raise InvalidArgument(FieldError("sample_size", "must be at most 100"))
        result = await self.run_build(tenant_id, self.options(spec))
        quality = ds.QualityReport()
        quality.dropped_by_reason.update(result.dropped_by_reason())
        lines = result.splits["train"].lines + result.splits["eval"].lines
        return stats_message(result.stats()), quality, lines[:sample_size]

    async def get(self, tenant_id: str, snapshot_id: str) -> ds.Snapshot:
        """One snapshot of the tenant."""
        return await self.snapshots.get(tenant_id, snapshot_id)

    async def list_snapshots(
        self, tenant_id: str, *, task: str | None, kind: int, page_size: int, cursor: str
    ) -> Page[ds.Snapshot]:
        """The tenant's snapshots, newest first."""
        return await self.snapshots.list(
            tenant_id, task=task, kind=kind, page_size=page_size, cursor=cursor
        )

    def _rows(self, snapshot: ds.Snapshot) -> set[str]:
        lines: set[str] = set()
        for file in snapshot.files:
            if file.format == ds.EXPORT_FORMAT_TRL_JSONL:
                data = self.snapshots.read_all(file.artifact).decode()
                lines.update(line for line in data.splitlines() if line)
        return lines

    async def diff(
        self, tenant_id: str, base_id: str, target_id: str, sample_size: int
    ) -> tuple[ds.Snapshot, ds.Snapshot, list[str], list[str], int]:
        """Rows (matched by content) only in target, only in base, and in both."""
        if sample_size > 100:
            raise InvalidArgument(FieldError("sample_size", "must be at most 100"))
        base = await self.get(tenant_id, base_id)
        target = await self.get(tenant_id, target_id)
        base_rows, target_rows = await asyncio.gather(
            asyncio.to_thread(self._rows, base), asyncio.to_thread(self._rows, target)
        )
        added = sorted(target_rows - base_rows)
        removed = sorted(base_rows - target_rows)
        return base, target, added, removed, len(base_rows & target_rows)

    async def download(
        self, tenant_id: str, snapshot_id: str, split: int, fmt: int
    ) -> tuple[ds.SnapshotFile, Iterator[bytes]]:
        """A snapshot file's metadata and its bytes."""
        snapshot = await self.get(tenant_id, snapshot_id)
        file = self.snapshots.file_of(snapshot, split, fmt)
        return file, self.snapshots.read(file)

    # -- training requests ----------------------------------------------------------------

    async def request_training(
        self,
        tenant_id: str,
        *,
        snapshot_id: str | None,
        spec: ds.SnapshotSpec,
        training: tr.TrainingSpec,
        priority: int,
        reason: str,
    ) -> ds.TrainingRequest:
        """Publish a training request on a snapshot (built now from ``spec`` if none given)."""
        if snapshot_id:
            snapshot = await self.get(tenant_id, snapshot_id)
        else:
            snapshot, _ = await self.build_snapshot(tenant_id, spec, trigger="training_request")
        snapshot_kind = KIND_NAMES.get(snapshot.spec.kind, "sft")
        method = training.method or METHOD_OF_KIND[snapshot_kind]
        if method not in ALLOWED_METHODS[snapshot_kind]:
            raise InvalidArgument(
                FieldError("training.method", f"cannot train on a {snapshot_kind} snapshot")
            )
        spec_out = tr.TrainingSpec()
        spec_out.CopyFrom(training)
        spec_out.method = method
        spec_out.dataset_snapshot_id = snapshot.snapshot_id
        spec_out.task = spec_out.task or snapshot.spec.task
        request = ds.TrainingRequest(
            training_request_id=str(uuid.uuid4()),
            tenant_id=tenant_id,
            spec=spec_out,
            priority=priority,
            reason=reason or "manual",
        )
        request.created_at.FromDatetime(datetime.now(UTC))
        async with self.sessions() as session, session.begin():
            self._publish_request(session, request)
        self.on_commit()
        return request

    def _publish_request(self, session: AsyncSession, request: ds.TrainingRequest) -> None:
        add_event(
            session,
            request.tenant_id,
            de.TrainingRequested(request=request),
            source_service=SOURCE_SERVICE,
        )

    # -- the trigger policy -----------------------------------------------------------------

    async def get_policy(self, tenant_id: str, task: str) -> ds.TriggerPolicy:
        """The effective policy of a tenant and task."""
        if not task:
            raise InvalidArgument(FieldError("task", "is required"))
        async with self.sessions() as session:
            row = await session.get(TriggerPolicyRow, (tenant_id, task))
        return policy.policy_of(row, self.policy_defaults, tenant_id, task)

    async def update_policy(self, tenant_id: str, new: ds.TriggerPolicy) -> ds.TriggerPolicy:
        """Replace a tenant's policy for a task; the tenant is the caller's, never the body's."""
        if new.tenant_id and new.tenant_id != tenant_id:
            raise InvalidArgument(FieldError("policy.tenant_id", "must be empty or your tenant"))
        stored = ds.TriggerPolicy()
        stored.CopyFrom(new)
        stored.tenant_id = tenant_id
        policy.check_policy(stored)
        data = json_format.MessageToDict(stored, preserving_proto_field_name=True)
        now = datetime.now(UTC)
        async with self.sessions() as session, session.begin():
            row = await session.get(TriggerPolicyRow, (tenant_id, stored.task))
            if row is None:
                session.add(
                    TriggerPolicyRow(
                        tenant_id=tenant_id, task=stored.task, policy=data, updated_at=now
                    )
                )
            else:
                row.policy = data
                row.updated_at = now
        return stored

    async def scopes_with_intervals(self) -> list[tuple[str, str]]:
        """Tenants and tasks whose policy can fire by time alone (the ticker's work)."""
        t, v = TriggerPolicyRow, FeedbackVersion
        async with self.sessions() as session:
            found = (await session.execute(select(t.tenant_id, t.task, t.policy))).all()
            stored = {(tenant_id, task): policy for tenant_id, task, policy in found}
            if self.policy_defaults.max_interval_s:
                # The default policy is timed: every scope with feedback may be due.
                scopes = (await session.execute(select(v.tenant_id, v.task).distinct())).all()
                for tenant_id, task in scopes:
                    stored.setdefault((tenant_id, task), None)
        timed = bool(self.policy_defaults.max_interval_s)
        return sorted(
            scope
            for scope, policy in stored.items()
            if (policy.get("max_interval") if policy else timed)
        )

    async def evaluate_policy(self, tenant_id: str, task: str) -> ds.TrainingRequest | None:
        """Run the policy of one tenant and task; the request it made, if it fired."""
        async with self._policy_lock:
            return await self._evaluate(tenant_id, task)

    async def _evaluate(self, tenant_id: str, task: str) -> ds.TrainingRequest | None:
        now = datetime.now(UTC)
        # Sessions one after the other, never nested: on SQLite each holds the write lock.
        async with self.sessions() as session:
            row = await session.get(TriggerPolicyRow, (tenant_id, task))
        current = policy.policy_of(row, self.policy_defaults, tenant_id, task)
        if not current.enabled:
            return None
        last_triggered = row.last_triggered_at if row is not None else None
        last_snapshot = await self.snapshots.latest_created_at(tenant_id, task)
        async with self.sessions() as session:
            new = await ledger.count_usable_since(session, tenant_id, task, last_snapshot)
        if last_triggered is not None and last_triggered.tzinfo is None:
            last_triggered = last_triggered.replace(tzinfo=UTC)
        reason = policy.is_due(
            current,
            new_examples=new,
            last_snapshot_at=last_snapshot,
            last_triggered_at=last_triggered,
            now=now,
        )
        if not reason:
            return None
        chosen = await self._choose_build(tenant_id, current, now)
        if chosen is None:
            return None
        result, method = chosen
        request_id = str(uuid.uuid4())
        made: list[ds.TrainingRequest] = []

        async def record(session: AsyncSession, snapshot: ds.Snapshot) -> None:
            request = policy.training_request(current, snapshot, method, reason, request_id)
            self._publish_request(session, request)
            await policy.mark_triggered(session, tenant_id, task, now)
            made.append(request)

        _, created = await self.snapshots.save(tenant_id, result, "policy", also=record)
        if not created:
            # The new feedback changed nothing a snapshot would hold (duplicates, say):
            # no training, but the cool-down starts so the same build is not redone.
            async with self.sessions() as session, session.begin():
                await policy.mark_triggered(session, tenant_id, task, now)
        return made[0] if made else None

    async def _choose_build(
        self, tenant_id: str, current: ds.TriggerPolicy, now: datetime
    ) -> tuple[BuildResult, tr.TrainingMethod.ValueType] | None:
        """DPO on preferences once there are enough pairs, else SFT; None: nothing usable."""
        spec = ds.SnapshotSpec()
        spec.CopyFrom(current.snapshot_defaults)
        spec.task = current.task
        spec.cutoff.FromDatetime(now)
        spec.kind = ds.DATASET_KIND_PREFERENCE
        options = self.options(spec)
        # Both kinds read the same feedback (same task and cutoff): load it once.
        facts, generations = await ledger.load_facts(self.sessions, tenant_id, options)
        pairs = await self._build(facts, generations, options)
        if pairs.rows("train") + pairs.rows("eval") >= max(1, current.min_preference_pairs):
            return pairs, tr.TRAINING_METHOD_DPO
        sft = await self._build(facts, generations, dataclasses.replace(options, kind="sft"))
        if sft.rows("train") + sft.rows("eval"):
            return sft, tr.TRAINING_METHOD_SFT
        return None
