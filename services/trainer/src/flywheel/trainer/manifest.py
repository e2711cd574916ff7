"""Adapter manifests: what an adapter is and where it came from, next to its weights.

The manifest is the `AdapterManifest` message (the same one `adapter.published` carries),
stored as ``manifest.json`` beside ``adapter_config.json`` and the safetensors files, so
a consumer can verify every file's sha256 before loading anything.
"""

from __future__ import annotations

import hashlib
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct

from flywheel.contracts.common.v1.common_pb2 import AdapterRef, ArtifactRef, FileDigest, Lineage
from flywheel.contracts.trainer.v1 import resources_pb2 as tr
from flywheel.core.artifacts import ArtifactStore, sha256_file, sha256_tree
from flywheel.core.layout import adapter_prefix
from flywheel.trainer.fingerprints import base_model_digest
from flywheel.trainer.spec import TrainSpec


class TrainedAdapter(Protocol):
    """What a finished run tells the manifest: `training.Outcome` in the process that
    trained, `runner.RecordedOutcome` in the service that reads its outcome.json (which
    must not import torch)."""

    @property
    def adapter_dir(self) -> Path: ...
    @property
    def metrics(self) -> dict[str, float]: ...
    @property
    def hyperparameters(self) -> dict[str, Any]: ...
    @property
    def lora(self) -> dict[str, Any]: ...


MANIFEST = "manifest.json"
METHODS: dict[str, int] = {
    "sft": tr.TRAINING_METHOD_SFT,
    "dpo": tr.TRAINING_METHOD_DPO,
    "kto": tr.TRAINING_METHOD_KTO,
    "orpo": tr.TRAINING_METHOD_ORPO,
    "reward": tr.TRAINING_METHOD_REWARD,
    "grpo": tr.TRAINING_METHOD_GRPO,
    "rloo": tr.TRAINING_METHOD_RLOO,
}
METHOD_NAMES = {v: k for k, v in METHODS.items()}


def file_digests(folder: Path) -> list[FileDigest]:
    """sha256 and size of every file in ``folder`` (the manifest excluded), sorted."""
    return [
        FileDigest(path=path, sha256=digest, size_bytes=(folder / path).stat().st_size)
        for path, digest in sha256_tree(folder, skip=frozenset({MANIFEST})).items()
    ]


def content_digest(folder: Path) -> str:
    """sha256 over the folder's file digests: a content-derived adapter version."""
    lines = "".join(f"{d.path} {d.sha256}\n" for d in file_digests(folder))
    return hashlib.sha256(lines.encode()).hexdigest()


def parent_ref(parent: Path | None) -> AdapterRef | None:
    """The parent adapter's reference: from its manifest when it has one, else its folder."""
    if parent is None:
        return None
    if (parent / MANIFEST).is_file():
        return read_manifest(parent).adapter
    return AdapterRef(name=parent.resolve().name, version="local")


def build_manifest(
    spec: TrainSpec,
    outcome: TrainedAdapter,
    *,
    tenant_id: str,
    adapter: AdapterRef,
    parent: AdapterRef | None = None,
    job_id: str = "",
    training_request_id: str = "",
) -> tr.AdapterManifest:
    """The manifest of the adapter ``outcome`` holds (artifact location not yet set)."""
    hyperparameters = Struct()
    hyperparameters.update(_json_safe(outcome.hyperparameters))
    if spec.reward_dimension:
        hyperparameters.update({"reward_dimension": spec.reward_dimension})
    lineage = Lineage(
        base_model=spec.base_model,
        base_model_sha256=base_model_digest(spec.base_model),
        dataset_snapshot_id=spec.dataset_snapshot_id,
        training_job_id=job_id,
        training_request_id=training_request_id,
    )
    if parent is not None:
        lineage.parent_adapter.CopyFrom(parent)
    eval_loss = outcome.metrics.get("eval_loss")
    parent_loss = outcome.metrics.get("parent_eval_loss")
    manifest = tr.AdapterManifest(
        adapter=adapter,
        tenant_id=tenant_id,
        task=spec.task,
        adapter_type=spec.adapter_type,
        method=METHODS[spec.method],  # type: ignore[arg-type]
        lineage=lineage,
        lora=tr.LoraConfig(
            r=outcome.lora["r"],
            alpha=outcome.lora["alpha"],
            dropout=outcome.lora["dropout"],
            target_modules=outcome.lora["target_modules"],
            use_rslora=outcome.lora["use_rslora"],
        ),
        hyperparameters=hyperparameters,
        metrics=outcome.metrics,
        files=file_digests(outcome.adapter_dir),
        worse_than_parent=eval_loss is not None
        and parent_loss is not None
        and eval_loss > parent_loss,
    )
    manifest.created_at.FromDatetime(datetime.now(UTC))
    return manifest


def _json_safe(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if isinstance(v, str | int | float | bool | list)}


def to_json(manifest: tr.AdapterManifest) -> str:
    """The manifest as ``manifest.json`` holds it."""
    return json_format.MessageToJson(manifest, indent=2, sort_keys=True)


def read_manifest(folder: Path) -> tr.AdapterManifest:
    """The manifest of an adapter folder."""
    return json_format.Parse((folder / MANIFEST).read_text(), tr.AdapterManifest())


def write_folder(manifest: tr.AdapterManifest, source: Path, target: Path) -> tr.AdapterManifest:
    """The adapter and its manifest in a local ``target`` folder (`flywheel train --output`)."""
    if target.resolve() != source.resolve():
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(source, target)
    manifest.artifact.CopyFrom(
        ArtifactRef(uri=target.resolve().as_uri(), sha256="", size_bytes=_size(manifest))
    )
    (target / MANIFEST).write_text(to_json(manifest))
    manifest.artifact.sha256 = sha256_file(target / MANIFEST)
    return manifest


def _size(manifest: tr.AdapterManifest) -> int:
    return sum(f.size_bytes for f in manifest.files)


def publish(store: ArtifactStore, manifest: tr.AdapterManifest, source: Path) -> tr.AdapterManifest:
    """Copy the adapter's files and its manifest into the store; the manifest's artifact
    points at the folder, with the manifest file's sha256 (which covers every file's)."""
    prefix = adapter_prefix(manifest.tenant_id, manifest.adapter.name, manifest.adapter.version)
    for digest in manifest.files:
        stored = store.put_file(f"{prefix}/{digest.path}", source / digest.path)
        if stored.sha256 != digest.sha256:
            raise RuntimeError(f"{digest.path} changed while it was being published")
    manifest.artifact.CopyFrom(ArtifactRef(uri=store.uri(prefix), size_bytes=_size(manifest)))
    info = store.put_bytes(f"{prefix}/{MANIFEST}", to_json(manifest).encode())
    manifest.artifact.sha256 = info.sha256
    return manifest
