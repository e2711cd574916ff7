"""Snapshots at rest: files in the artifact store, metadata in a table, an event when new.

A snapshot's id is the sha256 of its data, so saving a build whose data already exists for
the tenant returns the existing snapshot (``created`` false) and publishes nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from sqlalchemy import and_, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from flywheel.contracts.common.v1.common_pb2 import ArtifactRef
from flywheel.contracts.dataset.v1 import events_pb2 as de
from flywheel.contracts.dataset.v1 import resources_pb2 as ds
from flywheel.core.artifacts import ArtifactError, ArtifactStore
from flywheel.core.db import SessionFactory
from flywheel.core.errors import FieldError, InvalidArgument, NotFound
from flywheel.core.events.outbox import add_event
from flywheel.core.layout import TRL_JSONL, snapshot_file_key, snapshot_prefix
from flywheel.core.paging import Page, decode_cursor, encode_cursor, page_size_of
from flywheel.dataset.builder import (
    OPENAI_PREFERENCE_JSONL,
    BuildResult,
    gc_paused,
)
from flywheel.dataset.models import SnapshotRow
from flywheel.dataset.options import KIND_NAMES, to_spec

SOURCE_SERVICE = "dataset"
SPLIT_NAMES = {ds.SPLIT_TRAIN: "train", ds.SPLIT_EVAL: "eval"}
SPLITS = {name: value for value, name in SPLIT_NAMES.items()}
FORMAT_NAMES = {
    ds.EXPORT_FORMAT_TRL_JSONL: TRL_JSONL,
    ds.EXPORT_FORMAT_OPENAI_PREFERENCE_JSONL: OPENAI_PREFERENCE_JSONL,
}
FORMATS = {name: value for value, name in FORMAT_NAMES.items()}
TRIGGERS = {
    "manual": ds.SNAPSHOT_TRIGGER_MANUAL,
    "policy": ds.SNAPSHOT_TRIGGER_POLICY,
    "training_request": ds.SNAPSHOT_TRIGGER_TRAINING_REQUEST,
}
READ_CHUNK = 256 * 1024


def stats_message(stats: dict[str, Any]) -> ds.SnapshotStats:
    """A build's stats as a message."""
    return ds.SnapshotStats(**stats)


class SnapshotStore:
    """Saves builds as snapshots and reads them back, always within one tenant."""

    def __init__(
        self,
        sessions: SessionFactory,
        artifacts: ArtifactStore,
        *,
        on_commit: Callable[[], None] = lambda: None,
    ) -> None:
        self.sessions = sessions
        self.artifacts = artifacts
        self.on_commit = on_commit

    def _ref(self, key: str, data: bytes) -> ArtifactRef:
        info = self.artifacts.put_bytes(key, data)
        return ArtifactRef(uri=self.artifacts.uri(key), sha256=info.sha256, size_bytes=info.size)

    def _write_files(self, tenant_id: str, result: BuildResult, snapshot: ds.Snapshot) -> None:
        # Like the build, the files allocate much and free it all (see gc_paused).
        with gc_paused():
            self._write_all(tenant_id, result, snapshot)

    def _write_all(self, tenant_id: str, result: BuildResult, snapshot: ds.Snapshot) -> None:
        prefix = snapshot_prefix(tenant_id, snapshot.snapshot_id)
        for (split, fmt), data in sorted(result.files().items()):
            snapshot.files.append(
                ds.SnapshotFile(
                    split=SPLITS[split],
                    format=FORMATS[fmt],
                    # The shared layout: the trainer finds the files by these keys.
                    artifact=self._ref(
                        snapshot_file_key(tenant_id, snapshot.snapshot_id, split, fmt), data
                    ),
                    rows=result.rows(split),
                )
            )
        snapshot.lineage.CopyFrom(self._ref(f"{prefix}/lineage.jsonl", result.lineage()))
        snapshot.quality.report.CopyFrom(self._ref(f"{prefix}/quality.json", result.report()))

    async def save(
        self,
        tenant_id: str,
        result: BuildResult,
        trigger: str,
        *,
        also: Callable[[AsyncSession, ds.Snapshot], Awaitable[None]] | None = None,
    ) -> tuple[ds.Snapshot, bool]:
        """Store ``result`` as a snapshot of ``tenant_id``; (snapshot, whether it is new).

        ``also`` runs in the same transaction when the snapshot is new (the trigger policy
        records its training request there, so both or neither happen).
        """
        snapshot_id = result.snapshot_id
        existing = await self._find(tenant_id, snapshot_id)
        if existing is not None:
            return existing, False
        options = result.options
        spec = to_spec(options)
        spec.tokenizer = result.tokenizer
        with gc_paused():
            stats, events = result.stats(), len(result.event_ids())
        snapshot = ds.Snapshot(
            snapshot_id=snapshot_id,
            tenant_id=tenant_id,
            spec=spec,
            stats=stats_message(stats),
            source_event_count=events,
            trigger=TRIGGERS[trigger],
        )
        snapshot.quality.dropped_by_reason.update(result.dropped_by_reason())
        # Files first: a crash before the commit leaves only unreferenced files, which a
        # retry overwrites with the same bytes.
        await asyncio.to_thread(self._write_files, tenant_id, result, snapshot)
        now = datetime.now(UTC)
        snapshot.created_at.FromDatetime(now)
        try:
            async with self.sessions() as session, session.begin():
                previous = await session.scalar(
                    select(SnapshotRow.snapshot_id)
                    .where(
                        SnapshotRow.tenant_id == tenant_id,
                        SnapshotRow.task == options.task,
                        SnapshotRow.kind == options.kind,
                    )
                    .order_by(SnapshotRow.created_at.desc())
                    .limit(1)
                )
                if previous:
                    snapshot.previous_snapshot_id = previous
                session.add(
                    SnapshotRow(
                        tenant_id=tenant_id,
                        snapshot_id=snapshot_id,
                        task=options.task,
                        kind=options.kind,
                        message=json_format.MessageToDict(
                            snapshot, preserving_proto_field_name=True
                        ),
                        created_at=now,
                    )
                )
                add_event(
                    session,
                    tenant_id,
                    de.DatasetSnapshotCreated(snapshot=snapshot),
                    source_service=SOURCE_SERVICE,
                )
                if also is not None:
                    await also(session, snapshot)
        except IntegrityError:
            # The same data was saved concurrently: that one is the snapshot.
            existing = await self._find(tenant_id, snapshot_id)
            if existing is None:
                raise
            return existing, False
        self.on_commit()
        return snapshot, True

    async def _find(self, tenant_id: str, snapshot_id: str) -> ds.Snapshot | None:
        async with self.sessions() as session:
            row = await session.get(SnapshotRow, (tenant_id, snapshot_id))
        return None if row is None else _message(row)

    async def get(self, tenant_id: str, snapshot_id: str) -> ds.Snapshot:
        """One snapshot of the tenant, or NotFound."""
        found = await self._find(tenant_id, snapshot_id)
        if found is None:
            raise NotFound("snapshot", snapshot_id)
        return found

    async def latest_created_at(self, tenant_id: str, task: str) -> datetime | None:
        """When the tenant's newest snapshot of ``task`` (any kind) was made."""
        async with self.sessions() as session:
            value = await session.scalar(
                select(SnapshotRow.created_at)
                .where(SnapshotRow.tenant_id == tenant_id, SnapshotRow.task == task)
                .order_by(SnapshotRow.created_at.desc())
                .limit(1)
            )
        if value is None:
            return None
        return value if value.tzinfo else value.replace(tzinfo=UTC)

    async def list(
        self, tenant_id: str, *, task: str | None, kind: int, page_size: int, cursor: str
    ) -> Page[ds.Snapshot]:
        """The tenant's snapshots, newest first, by task and kind (0: all kinds)."""
        size = page_size_of(page_size)
        s = SnapshotRow
        statement = select(s).where(s.tenant_id == tenant_id)
        if task is not None:
            statement = statement.where(s.task == task)
        if kind:
            name = KIND_NAMES.get(ds.DatasetKind.ValueType(kind))
            if name is None:
                raise InvalidArgument(FieldError("kind", "is not a known dataset kind"))
            statement = statement.where(s.kind == name)
        if cursor:
            created, ident = decode_cursor(cursor)
            statement = statement.where(
                or_(s.created_at < created, and_(s.created_at == created, s.snapshot_id < ident))
            )
        statement = statement.order_by(s.created_at.desc(), s.snapshot_id.desc()).limit(size + 1)
        async with self.sessions() as session:
            rows = list((await session.scalars(statement)).all())
        more = len(rows) > size
        rows = rows[:size]
        next_cursor = encode_cursor(rows[-1].created_at, rows[-1].snapshot_id) if more else ""
        return Page([_message(r) for r in rows], next_cursor)

    def file_of(self, snapshot: ds.Snapshot, split: int, fmt: int) -> ds.SnapshotFile:
        """The snapshot's file for a split and format, or a field error naming what is wrong."""
        if split not in SPLIT_NAMES:
            raise InvalidArgument(FieldError("split", "must be train or eval"))
        fmt = fmt or ds.EXPORT_FORMAT_TRL_JSONL
        if fmt not in FORMAT_NAMES:
            raise InvalidArgument(FieldError("format", "is not a known export format"))
        for file in snapshot.files:
            if file.split == split and file.format == fmt:
                return file
        raise InvalidArgument(
            FieldError("format", "this snapshot's kind has no file in this format")
        )

    def read(self, file: ds.SnapshotFile) -> Iterator[bytes]:
        """A file's bytes in chunks, checked against its recorded sha256 when stored."""
        try:
            key = self.artifacts.key_of(file.artifact.uri)
            with self.artifacts.open(key) as f:
                while chunk := f.read(READ_CHUNK):
                    yield chunk
        except ArtifactError as exc:
            raise NotFound("snapshot file", file.artifact.uri) from exc

    def read_all(self, ref: ArtifactRef) -> bytes:
        """A whole artifact of a snapshot (lineage, report, a data file)."""
        try:
            with self.artifacts.open(self.artifacts.key_of(ref.uri)) as f:
                return f.read()
        except ArtifactError as exc:
            raise NotFound("snapshot file", ref.uri) from exc


def _as_json(snapshot: ds.Snapshot) -> dict[str, Any]:
    return json_format.MessageToDict(snapshot, preserving_proto_field_name=True)


def _message(row: SnapshotRow) -> ds.Snapshot:
    snapshot = ds.Snapshot()
    json_format.ParseDict(row.message, snapshot)
    return snapshot
