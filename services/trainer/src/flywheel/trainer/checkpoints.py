"""Checkpoints a killed run can trust.

Plain file work, free of torch, so the service can read checkpoints cheaply; the callback
that marks them during training is in callbacks.py.

The trainer writes ``checkpoint-N/`` (weights, optimizer, scheduler, RNG states, trainer
state) in many files, so a kill mid-write leaves a folder that looks like a checkpoint
and is not one. After the last file is written, `CompletionMarker` records the sha256 of
every file in ``COMPLETE.json`` (written to a temp file, fsynced, renamed: it exists
whole or not at all). A resumed run starts from the newest checkpoint whose marker
exists and whose files still match it; anything else is deleted.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from flywheel.core.artifacts import atomic_write_text, sha256_tree

MARKER = "COMPLETE.json"
KEEP = 2
_NAME = re.compile(r"^checkpoint-(\d+)$")


def _files(folder: Path) -> dict[str, str]:
    return sha256_tree(folder, skip=frozenset({MARKER}))


def write_marker(folder: Path, step: int) -> None:
    """Mark ``folder`` complete: every file's sha256, atomically and durably."""
    text = json.dumps({"step": step, "files": _files(folder)}, indent=1, sort_keys=True)
    atomic_write_text(folder / MARKER, text, durable=True)


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` has a marker and every file still matches it."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("files") == _files(folder)


def _checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_complete(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``; incomplete ones are deleted."""
    best = None
    for _, folder in reversed(_checkpoints(root)):
        if best is None and is_complete(folder):
            best = folder
        elif best is None:
            shutil.rmtree(folder, ignore_errors=True)
    return best


def prune(root: Path, keep: int = KEEP) -> None:
    """Delete all but the newest ``keep`` complete checkpoints."""
    complete = [p for _, p in _checkpoints(root) if (p / MARKER).is_file()]
    for folder in complete[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)


def last_step(root: Path) -> int | None:
    """Step of the newest complete checkpoint (without deleting anything)."""
    for step, folder in reversed(_checkpoints(root)):
        if is_complete(folder):
            return step
    return None


def last_marked_step(root: Path) -> int | None:
    """Step of the newest checkpoint with a marker, without reading its files: cheap
    enough to report every few seconds (resuming uses `latest_complete`, which verifies)."""
    marked = [step for step, folder in _checkpoints(root) if (folder / MARKER).is_file()]
    return marked[-1] if marked else None
