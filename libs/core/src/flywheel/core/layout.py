"""Where things live in the artifact store: the layout producers and consumers share.

The dataset service writes snapshots, the trainer reads them and writes adapters, the
inference service reads adapters; each finds the other's files through these keys only.
"""

from __future__ import annotations

TRL_JSONL = "trl_jsonl"


def snapshot_prefix(tenant_id: str, snapshot_id: str) -> str:
    """Folder of a dataset snapshot's files."""
    return f"datasets/{tenant_id}/{snapshot_id.removeprefix('sha256:')}"


def snapshot_file_key(tenant_id: str, snapshot_id: str, split: str, fmt: str = TRL_JSONL) -> str:
    """One data file of a snapshot: ``split`` is train or eval."""
    return f"{snapshot_prefix(tenant_id, snapshot_id)}/{split}.{fmt}.jsonl"


def adapter_prefix(tenant_id: str, name: str, version: str) -> str:
    """Folder of one adapter version (weights, adapter_config.json, manifest.json)."""
    return f"adapters/{tenant_id}/{name}/{version}"
