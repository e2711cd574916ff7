"""Quality checks between curation and a snapshot, cheapest first.

1. format: a non-empty prompt (known chat roles, some content), non-blank completions, and
   for pairs a chosen that differs from the rejected;
2. length: prompt and each completion within the token limits, counted with the target
   model's tokenizer;
3. exact duplicates: same normalized prompt and completions (and label) as an earlier row;
4. near duplicates: MinHash Jaccard estimate of prompt + completions at or above the
   threshold against an earlier row (1.0 turns this check off).

Rows are checked in the canonical order curation gives them, so which of two duplicates
survives is deterministic. Every drop is recorded with its reason and lineage.
"""

from __future__ import annotations

from dataclasses import dataclass

from flywheel.dataset.curation import Candidate, Dropped
from flywheel.dataset.dedup import NearDuplicateIndex, exact_key, normalize
from flywheel.dataset.options import BuildOptions
from flywheel.dataset.records import PromptValue
from flywheel.dataset.tokens import TokenCounter

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})


def render_prompt(prompt: PromptValue) -> str:
    """A prompt as one text, for token counts and duplicate detection."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{role}: {content}" for role, content in prompt)


@dataclass(slots=True)
class Checked:
    """A candidate that passed, with its token count (prompt + completions)."""

    candidate: Candidate
    tokens: int


def _format_problem(c: Candidate) -> str:
    if isinstance(c.prompt, str):
        if not c.prompt.strip():
            return "empty prompt"
    else:
        if not c.prompt or not any(content.strip() for _, content in c.prompt):
            return "empty prompt"
        unknown = sorted({role for role, _ in c.prompt} - CHAT_ROLES)
        if unknown:
            return f"unknown chat role {unknown[0]!r}"
    if any(not text.strip() for text in c.completions):
        return "empty completion"
    if len(c.completions) == 2 and normalize(c.completions[0]) == normalize(c.completions[1]):
        return "chosen and rejected are the same text"
    return ""


def check(
    candidates: list[Candidate], options: BuildOptions, counter: TokenCounter
) -> tuple[list[Checked], list[Dropped]]:
    """The candidates that pass every check, and the ones dropped with their reasons."""
    dropped: list[Dropped] = []

    def drop(c: Candidate, reason: str, detail: str = "") -> None:
        dropped.append(Dropped(reason, c.event_ids, c.generation_ids, detail))

    well_formed = []
    for c in candidates:
        problem = _format_problem(c)
        if problem:
            drop(c, "invalid_format", problem)
        else:
            well_formed.append(c)

    prompts = [render_prompt(c.prompt) for c in well_formed]
    prompt_tokens = counter.count_many(prompts)
    completion_tokens = counter.count_many([t for c in well_formed for t in c.completions])
    fitting: list[tuple[Candidate, str, int]] = []
    at = 0
    for c, prompt, p_tokens in zip(well_formed, prompts, prompt_tokens, strict=True):
        c_tokens = completion_tokens[at : at + len(c.completions)]
        at += len(c.completions)
        if p_tokens > options.max_prompt_tokens:
            drop(c, "too_long", f"prompt has {p_tokens} tokens")
        elif max(c_tokens) > options.max_completion_tokens:
            drop(c, "too_long", f"completion has {max(c_tokens)} tokens")
        else:
            fitting.append((c, prompt, p_tokens + sum(c_tokens)))

    seen: set[str] = set()
    unique: list[tuple[Candidate, str, int, str]] = []
    for c, prompt, tokens in fitting:
        label = "" if c.label is None else str(c.label)
        key = exact_key(prompt, *c.completions, label)
        if key in seen:
            drop(c, "exact_duplicate")
            continue
        seen.add(key)
        unique.append((c, "\n".join((prompt, *c.completions, label)), tokens, key))

    originals: list[str | None] = [None] * len(unique)
    if options.near_duplicate_threshold < 1.0:
        near = NearDuplicateIndex(threshold=options.near_duplicate_threshold, seed=options.seed + 1)
        # All signatures at once (vectorised); the answers are those of one row at a time.
        originals = near.find_or_add_many([u[3] for u in unique], [u[1] for u in unique])
    passed = []
    for (c, _text, tokens, _key), original in zip(unique, originals, strict=True):
        if original is not None:
            drop(c, "near_duplicate", f"of row {original[:12]}")
        else:
            passed.append(Checked(c, tokens))
    return passed, dropped
