"""Hot-loading: adapter artifacts -> verified local files -> loaded on this replica's engine.

Each replica keeps its own loaded set (at most ``max_loaded``, least recently used
unloaded first) while the registry, shared by all replicas, says which adapter versions
are valid. Loads of one adapter name are serialised by a lock per name, so concurrent
events and requests cannot race a half-copied folder or a double load; different
adapters load in parallel while the engine keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from google.protobuf.json_format import MessageToDict

from flywheel.contracts.common.v1.common_pb2 import AdapterRef
from flywheel.contracts.inference.v1 import resources_pb2 as ri
from flywheel.contracts.trainer.v1 import resources_pb2 as tr
from flywheel.core.artifacts import ArtifactError, ArtifactStore, copy_out, sha256_file
from flywheel.inference.composition import compose_cat, composite_key
from flywheel.inference.engine_client import EngineClient, EngineError
from flywheel.inference.registry import AdapterRegistry
from flywheel.inference.routing import WeightedRef
from flywheel.inference.validation import (
    AdapterRejected,
    BaseModelFacts,
    check_name,
    check_relative_path,
    validate_adapter,
)

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def _check_names(tenant_id: str, ref: AdapterRef) -> None:
    """Tenant, adapter name and version become path parts: only safe names pass."""
    for value, what in ((tenant_id, "tenant"), (ref.name, "name"), (ref.version, "version")):
        check_name(value, what)


def engine_name(tenant_id: str, name: str, version: str) -> str:
    """The adapter's name on the engine (tenants' adapter names may coincide)."""
    return f"{tenant_id}:{name}@{version}"


class AdapterLoader:
    """Fetches, verifies, validates and loads adapters on one engine; evicts by LRU."""

    def __init__(
        self,
        engine: EngineClient,
        store: ArtifactStore,
        registry: AdapterRegistry,
        base: BaseModelFacts,
        cache_dir: Path,
        *,
        max_rank: int,
        max_loaded: int,
    ) -> None:
        self.engine = engine
        self.store = store
        self.registry = registry
        self.base = base
        self.cache_dir = cache_dir.absolute()  # the engine resolves paths from elsewhere
        self.max_rank = max_rank
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, float] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}

    def loaded(self) -> list[str]:
        """Engine names loaded on this replica, least recently used first."""
        return list(self._loaded)

    def _lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    async def publish(self, tenant_id: str, manifest: tr.AdapterManifest) -> ri.RegisteredAdapter:
        """Register a published adapter, then validate and load it: ROUTABLE or REJECTED.

        Safe to repeat (events arrive at least once, and on every replica): a version
        already rejected stays rejected; one already routable is loaded here if needed.
        """
        ref = manifest.adapter
        try:  # names become paths: refuse before anything is stored under them
            _check_names(tenant_id, ref)
        except AdapterRejected as rejected:
            await self.registry.reject_unregistrable(tenant_id, ref, rejected.code, rejected.reason)
            return ri.RegisteredAdapter(
                manifest=manifest, status=ri.ADAPTER_STATUS_REJECTED, reject_reason=rejected.reason
            )
        entry, _ = await self.registry.register(tenant_id, manifest)
        if entry.status == ri.ADAPTER_STATUS_REJECTED:
            return entry
        try:
            await self.ensure(tenant_id, ref.name, ref.version, manifest)
        except AdapterRejected as rejected:
            log.warning(
                "adapter rejected",
                extra={"adapter": f"{ref.name}@{ref.version}", "code": rejected.code},
            )
            return await self.registry.set_status(
                tenant_id,
                ref.name,
                ref.version,
                ri.ADAPTER_STATUS_REJECTED,
                reject_code=rejected.code,
                reject_reason=rejected.reason,
            )
        if entry.status == ri.ADAPTER_STATUS_ROUTABLE:
            return entry
        return await self.registry.set_status(
            tenant_id, ref.name, ref.version, ri.ADAPTER_STATUS_ROUTABLE
        )

    async def ensure(
        self,
        tenant_id: str,
        name: str,
        version: str,
        manifest: tr.AdapterManifest | None = None,
    ) -> str:
        """Load the adapter on the engine unless it is; its engine name."""
        key = engine_name(tenant_id, name, version)
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return key
        async with self._lock(key):
            if key not in self._loaded:
                if manifest is None:
                    manifest = (await self.registry.get(tenant_id, name, version)).manifest
                folder = await self._fetch(tenant_id, manifest)
                await self._load(key, folder)
        self._loaded.move_to_end(key)
        await self._evict(keep=key)
        return key

    async def ensure_composite(self, tenant_id: str, parts: Sequence[WeightedRef]) -> str:
        """Materialise the weighted composite of ``parts`` (ranks concatenated) and load it."""
        key = f"{tenant_id}:composite-" + composite_key(
            [(p.name, p.version, p.weight) for p in parts]
        )
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return key
        async with self._lock(key):
            if key not in self._loaded:
                folders = []
                for part in parts:
                    manifest = (
                        await self.registry.get(tenant_id, part.name, part.version)
                    ).manifest
                    folders.append((await self._fetch(tenant_id, manifest), part.weight))
                target = self.cache_dir / "composites" / tenant_id / key.split(":", 1)[1]
                if not (target / "adapter_config.json").is_file():
                    await asyncio.to_thread(
                        compose_cat, folders, target, base_model_id=self.base.model_id
                    )
                await self._load(key, target)
        self._loaded.move_to_end(key)
        await self._evict(keep=key)
        return key

    async def unload(self, tenant_id: str, name: str, version: str) -> None:
        """Unload from this replica's engine (no-op if not loaded)."""
        key = engine_name(tenant_id, name, version)
        async with self._lock(key):
            if self._loaded.pop(key, None) is not None:
                await self._engine_unload(key)

    async def restore(self) -> int:
        """Load the registry's routable adapters (most recently used first, up to the
        limit) before this replica reports ready; how many were loaded."""
        routable = await self.registry.routable()
        routable.sort(key=lambda a: a.last_used_at.ToDatetime(), reverse=True)
        count = 0
        for entry in routable[: self.max_loaded]:
            ref = entry.manifest.adapter
            try:
                await self.ensure(entry.manifest.tenant_id, ref.name, ref.version, entry.manifest)
                count += 1
            except (AdapterRejected, EngineError) as error:
                log.error("could not restore adapter %s@%s: %s", ref.name, ref.version, error)
        return count

    async def forget(self, key: str) -> None:
        """The engine lost ``key`` (restarted, evicted by another caller): reload on demand."""
        self._loaded.pop(key, None)

    async def _fetch(self, tenant_id: str, manifest: tr.AdapterManifest) -> Path:
        """The adapter's files in the local cache, every sha256 verified, validated."""
        ref = manifest.adapter
        _check_names(tenant_id, ref)
        target = self.cache_dir / "adapters" / tenant_id / ref.name / ref.version
        manifest_dict = MessageToDict(manifest, preserving_proto_field_name=True)
        if not target.is_dir():
            await asyncio.to_thread(self._download, manifest, target)
        await asyncio.to_thread(
            validate_adapter, target, manifest_dict, self.base, max_rank=self.max_rank
        )
        return target

    def _download(self, manifest: tr.AdapterManifest, target: Path) -> None:
        """Copy the adapter's files out of the store into ``target`` (atomically)."""
        try:
            prefix = self.store.key_of(manifest.artifact.uri)
        except (ArtifactError, ValueError, KeyError) as error:
            raise AdapterRejected("unsafe_path", f"artifact URI: {error}") from error
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target.parent))
        try:
            for digest in manifest.files:
                check_relative_path(digest.path)
                try:
                    copy_out(self.store, f"{prefix}/{digest.path}", staging / digest.path)
                except (ArtifactError, FileNotFoundError) as error:
                    raise AdapterRejected("missing_file", f"{digest.path}: {error}") from error
            if manifest.artifact.sha256 and self.store.exists(f"{prefix}/{MANIFEST}"):
                stored = copy_out(self.store, f"{prefix}/{MANIFEST}", staging / MANIFEST)
                if sha256_file(stored) != manifest.artifact.sha256:
                    raise AdapterRejected("sha256_mismatch", "manifest.json changed in the store")
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    async def _load(self, key: str, folder: Path) -> None:
        try:
            await self.engine.load_adapter(key, str(folder))
        except EngineError as error:
            if error.status == 400 and "already been loaded" in str(error):
                pass  # the engine kept it across a restart of this service
            elif 400 <= error.status < 500:
                raise AdapterRejected("load_failed", str(error)) from error
            else:
                raise
        self._loaded[key] = time.monotonic()

    async def _evict(self, keep: str) -> None:
        while len(self._loaded) > self.max_loaded:
            victim = next(k for k in self._loaded if k != keep)
            async with self._lock(victim):
                if self._loaded.pop(victim, None) is not None:
                    await self._engine_unload(victim)

    async def _engine_unload(self, key: str) -> None:
        try:
            await self.engine.unload_adapter(key)
        except EngineError as error:
            if error.status != 404:
                raise
