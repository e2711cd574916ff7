"""Training data: TRL-column JSONL files into the `datasets.Dataset` each recipe reads.

Snapshots come in TRL's columns already (see the dataset service's exports). What is left
is per recipe: the columns it reads, plain prompts turned into chat messages when the
tokenizer has a chat template (so training and serving share one layout), and derived
shapes: KTO can learn from a preference set (each pair becomes a desirable and an
undesirable example), online RL needs only the prompts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datasets import Dataset

# The columns each recipe's trainer reads (the rest are dropped).
COLUMNS: dict[str, tuple[str, ...]] = {
    "sft": ("prompt", "completion"),
    "dpo": ("prompt", "chosen", "rejected"),
    "orpo": ("prompt", "chosen", "rejected"),
    "kto": ("prompt", "completion", "label"),
    "reward": ("prompt", "chosen", "rejected", "margin"),
    "grpo": ("prompt",),
    "rloo": ("prompt",),
}
OPTIONAL = {"margin"}


class DataError(ValueError):
    """The file does not hold what the recipe needs."""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a bad line is reported with its number."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: a row must be a JSON object")
            rows.append(row)
    if not rows:
        raise DataError(f"{path} has no rows")
    return rows


def _as_messages(value: Any, role: str) -> Any:
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def _unpaired(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Preference pairs as KTO examples: chosen desirable, rejected undesirable."""
    out = []
    for row in rows:
        out.append({"prompt": row["prompt"], "completion": row["chosen"], "label": True})
        out.append({"prompt": row["prompt"], "completion": row["rejected"], "label": False})
    return out


def _prompts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each distinct prompt once, in first-seen order (online RL generates the rest)."""
    seen: dict[str, dict[str, Any]] = {}
    for row in rows:
        seen.setdefault(json.dumps(row["prompt"], sort_keys=True), {"prompt": row["prompt"]})
    return list(seen.values())


def _score(scores: Any, dimension: str) -> float | None:
    for item in scores or ():
        if item.get("dimension") == dimension:
            return float(item["score"])
    return None


def dimension_pairs(rows: list[dict[str, Any]], dimension: str) -> list[dict[str, Any]]:
    """Reward pairs for one quality dimension: each pair whose two sides both have a score
    on it, ordered by those scores (ties dropped), margin their difference."""
    out = []
    for row in rows:
        first = _score(row.get("chosen_scores"), dimension)
        second = _score(row.get("rejected_scores"), dimension)
        if first is None or second is None or first == second:
            continue
        better, worse = ("chosen", "rejected") if first > second else ("rejected", "chosen")
        out.append({"prompt": row["prompt"], "chosen": row[better], "rejected": row[worse],
                    "margin": abs(first - second)})  # fmt: skip
    if not out:
        raise DataError(f"no pair has two different scores on dimension {dimension!r}")
    return out


def shape_rows(
    rows: list[dict[str, Any]], method: str, *, chat: bool, dimension: str = ""
) -> list[dict[str, Any]]:
    """``rows`` with exactly the columns ``method`` reads, as chat messages if ``chat``;
    for a reward ``dimension``, the pairs that dimension's scores order."""
    if dimension:
        rows = dimension_pairs(rows, dimension)
    if method == "kto" and "label" not in rows[0] and "chosen" in rows[0]:
        rows = _unpaired(rows)
    if method in ("grpo", "rloo"):
        rows = _prompts(rows)
    wanted = COLUMNS[method]
    missing = [c for c in wanted if c not in OPTIONAL and c not in rows[0]]
    if missing:
        raise DataError(
            f"{method} needs columns {', '.join(wanted)}; the data lacks {', '.join(missing)}"
        )
    shaped = []
    for row in rows:
        out = {c: row[c] for c in wanted if c in row}
        if chat:
            out["prompt"] = _as_messages(out["prompt"], "user")
            for c in ("completion", "chosen", "rejected"):
                if c in out:
                    out[c] = _as_messages(out[c], "assistant")
        shaped.append(out)
    return shaped


def load_dataset(path: Path, method: str, *, chat: bool, dimension: str = "") -> Dataset:
    """The file at ``path`` as the dataset ``method``'s trainer reads."""
    return Dataset.from_list(shape_rows(read_jsonl(path), method, chat=chat, dimension=dimension))
