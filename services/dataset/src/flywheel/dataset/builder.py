"""One build: facts -> candidates -> quality checks -> split -> files, stats and lineage.

Pure: no database, no artifact store. The snapshot store persists what this returns, the
preview returns part of it, and `flywheel dataset build` writes it to a folder.
"""

from __future__ import annotations

import gc
import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from flywheel.dataset.curation import Curation, Dropped, Votes
from flywheel.dataset.exports import (
    LineEncoder,
    canonical_line,
    is_conversational,
    openai_preference_row,
    trl_row,
)
from flywheel.dataset.options import BuildOptions
from flywheel.dataset.quality import Checked, check
from flywheel.dataset.records import FeedbackFact, GenerationText
from flywheel.dataset.tokens import TokenCounter

SPLITS = ("train", "eval")
TRL_JSONL = "trl_jsonl"
OPENAI_PREFERENCE_JSONL = "openai_preference_jsonl"


def in_eval(prompt_hash: str, options: BuildOptions) -> bool:
    """Whether a prompt is held out: a seeded hash of the prompt, so never by row."""
    if options.eval_fraction <= 0:
        return False
    digest = hashlib.sha256(f"{options.seed}:{prompt_hash}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < options.eval_fraction


@dataclass
class SplitRows:
    """The rows of one split, in file order."""

    lines: list[str] = field(default_factory=list)
    checked: list[Checked] = field(default_factory=list)
    openai_lines: list[str] = field(default_factory=list)


@dataclass
class BuildResult:
    """Everything a build produced."""

    options: BuildOptions
    tokenizer: str
    splits: dict[str, SplitRows]
    dropped: list[Dropped]

    @property
    def snapshot_id(self) -> str:
        """``sha256:<hex>`` of the kind and the canonical train and eval data."""
        digest = hashlib.sha256(self.options.kind.encode())
        for name in SPLITS:
            digest.update(b"\x1e")
            for line in self.splits[name].lines:
                digest.update(line.encode())
        return f"sha256:{digest.hexdigest()}"

    def files(self) -> dict[tuple[str, str], bytes]:
        """(split, format) -> file bytes; OpenAI's format for pair kinds only."""
        out = {
            (name, TRL_JSONL): "".join(rows.lines).encode() for name, rows in self.splits.items()
        }
        if self.options.kind in ("preference", "reward"):
            for name, rows in self.splits.items():
                out[(name, OPENAI_PREFERENCE_JSONL)] = "".join(rows.openai_lines).encode()
        return out

    def rows(self, split: str) -> int:
        """Rows in ``split``."""
        return len(self.splits[split].lines)

    def event_ids(self) -> set[str]:
        """Every feedback event behind some row."""
        return {
            e
            for rows in self.splits.values()
            for ch in rows.checked
            for e in ch.candidate.event_ids
        }

    def lineage(self) -> bytes:
        """JSONL, one line per row: split, row number, its feedback events and generations."""
        lines = [
            canonical_line(
                {
                    "split": name,
                    "row": number,
                    "event_ids": sorted(ch.candidate.event_ids),
                    "generation_ids": list(ch.candidate.generation_ids),
                    "source": ch.candidate.source,
                }
            )
            for name in SPLITS
            for number, ch in enumerate(self.splits[name].checked)
        ]
        return "".join(lines).encode()

    def dropped_by_reason(self) -> dict[str, int]:
        """How many candidates (or facts) each reason removed."""
        return dict(sorted(Counter(d.reason for d in self.dropped).items()))

    def report(self) -> bytes:
        """The full quality report: counts, then every dropped item."""
        body: dict[str, Any] = {
            "dropped_by_reason": self.dropped_by_reason(),
            "dropped": [
                {
                    "reason": d.reason,
                    "event_ids": list(d.event_ids),
                    "generation_ids": list(d.generation_ids),
                    "detail": d.detail,
                }
                for d in self.dropped
            ],
        }
        return json.dumps(body, ensure_ascii=False, indent=1).encode()

    def stats(self) -> dict[str, Any]:
        """Rows, prompts, tokens, rows by source and by task."""
        checked = [ch for rows in self.splits.values() for ch in rows.checked]
        return {
            "train_rows": self.rows("train"),
            "eval_rows": self.rows("eval"),
            "prompts": len({(ch.candidate.task, ch.candidate.prompt_hash) for ch in checked}),
            "tokens": sum(ch.tokens for ch in checked),
            "rows_by_source": dict(Counter(ch.candidate.source for ch in checked)),
            "rows_by_task": dict(Counter(ch.candidate.task for ch in checked)),
        }


def build(
    facts: Iterable[FeedbackFact],
    generations: Mapping[str, GenerationText],
    options: BuildOptions,
    counter: TokenCounter,
    votes: dict[str, Votes] | None = None,
) -> BuildResult:
    """Build the rows ``options`` ask for from ``facts`` (as of the options' cutoff).

    ``votes``: the generations' votes, already summed up (see :class:`Curation`).
    """
    with _gc_paused():
        return _build(facts, generations, options, counter, votes)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off for a while (when it was on).

    A build allocates millions of small objects, none in cycles, and keeps most of them:
    every full collection meanwhile walks them all, for nothing (a tenth of a build's time).
    Reference counting still frees everything; cycles made elsewhere meanwhile wait.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _build(
    facts: Iterable[FeedbackFact],
    generations: Mapping[str, GenerationText],
    options: BuildOptions,
    counter: TokenCounter,
    votes: dict[str, Votes] | None,
) -> BuildResult:
    curation = Curation(facts, generations, options, votes)
    candidates = curation.candidates()
    passed, dropped = check(candidates, options, counter)
    conversational = is_conversational([ch.candidate for ch in passed])
    with_scores = options.kind == "reward" and any(any(ch.candidate.scores) for ch in passed)
    splits = {name: SplitRows() for name in SPLITS}
    encoder = LineEncoder()
    for ch in passed:
        rows = splits["eval" if in_eval(ch.candidate.prompt_hash, options) else "train"]
        row = trl_row(
            ch.candidate, options.kind, conversational=conversational, with_scores=with_scores
        )
        rows.lines.append(encoder.line(row))
        rows.checked.append(ch)
        if options.kind in ("preference", "reward"):
            rows.openai_lines.append(encoder.line(openai_preference_row(ch.candidate)))
    return BuildResult(
        options=options,
        tokenizer=counter.name,
        splits=splits,
        dropped=curation.dropped + dropped,
    )
