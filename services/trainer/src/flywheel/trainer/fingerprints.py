"""Content fingerprints of what a run reads: base weights, parent adapter, data files.

They go into adapter manifests (lineage) and into cache keys, so a cache entry can only be
reused for exactly the same inputs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from flywheel.core.artifacts import sha256_file, sha256_tree

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def folder_digest(folder: Path, suffixes: tuple[str, ...] = WEIGHT_SUFFIXES) -> str:
    """sha256 over the names and sha256s of the folder's files with ``suffixes``."""
    entries = sha256_tree(folder, suffixes=suffixes)
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def base_model_digest(base_model: str) -> str:
    """The base weights' digest for a local folder; a Hub id stands for itself (its
    revision is pinned by whoever deploys it)."""
    path = Path(base_model)
    if path.is_dir():
        return "sha256:" + folder_digest(path)
    return f"hf:{base_model}"


def adapter_digest(adapter: Path | None) -> str:
    """A parent adapter's digest (weights and config), or "" for none."""
    if adapter is None:
        return ""
    return "sha256:" + folder_digest(adapter, (".safetensors", ".json"))


def file_digest(path: Path | None) -> str:
    """A data file's sha256, or "" for none."""
    return "" if path is None else "sha256:" + sha256_file(path)


def cache_key(**parts: object) -> str:
    """A stable hex key for a cache entry made from ``parts``."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
