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

from flywheel.core.layout import TRL_JSONL
from flywheel.dataset.curation import Curation, Dropped, Votes
from flywheel.dataset.exports import (
    CANONICAL,
    LineEncoder,
    is_conversational,
)
from flywheel.dataset.options import BuildOptions
from flywheel.dataset.quality import Checked, check
from flywheel.dataset.records import FeedbackFact, GenerationText
from flywheel.dataset.tokens import TokenCounter

SPLITS = ("train", "eval")
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
            # One update of all lines: the digest of a stream does not depend on its pieces.
            digest.update("".join(self.splits[name].lines).encode())
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
            _lineage_line(name, number, ch)
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


def _lineage_line(split: str, number: int, checked: Checked) -> str:
    """``canonical_line`` of a lineage row, assembled as ``json.dumps`` assembles it (sorted
    keys, no spaces) from its values' encodings: a snapshot has hundreds of thousands."""
    c = checked.candidate
    encode = CANONICAL.encode
    return (
        f'{{"event_ids":{encode(sorted(c.event_ids))},'
        f'"generation_ids":{encode(c.generation_ids)},"row":{number},'
        f'"source":{encode(c.source)},"split":{encode(split)}}}\n'
    )


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
    with gc_paused():
        return _build(facts, generations, options, counter, votes)


@contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off for a while (when it was on).

    A build (and the loading of its input) allocates millions of small objects, none in
    cycles, and keeps most of them: every full collection meanwhile walks them all, for
    nothing (a tenth of a build's time, half of decoding rows). Reference counting still
    frees everything; cycles made elsewhere meanwhile wait.
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
        line = encoder.trl_line(
            ch.candidate, options.kind, conversational=conversational, with_scores=with_scores
        )
        rows.lines.append(line)
        rows.checked.append(ch)
        if options.kind in ("preference", "reward"):
            rows.openai_lines.append(encoder.openai_line(ch.candidate))
    return BuildResult(
        options=options,
        tokenizer=counter.name,
        splits=splits,
        dropped=curation.dropped + dropped,
    )
