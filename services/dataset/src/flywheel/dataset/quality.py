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
from flywheel.dataset.dedup import (
    NearDuplicateIndex,
    NormalizedText,
    normalize,
    normalized_key,
)
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


class _Normalized(dict[str, str]):
    """:func:`normalize` of each distinct text, computed once: rows share prompts and
    outputs (a prompt's pairs, an output in several pairs), so most lookups are repeats."""

    def __missing__(self, text: str) -> str:
        value = self[text] = normalize(text)
        return value


def _format_problem(c: Candidate, normalized: _Normalized) -> str:
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
    if len(c.completions) == 2 and normalized[c.completions[0]] == normalized[c.completions[1]]:
        return "chosen and rejected are the same text"
    return ""


def _token_counts(counter: TokenCounter, texts: list[str]) -> dict[str, int]:
    """Tokens of each distinct text, counted once (a count depends on the text alone)."""
    distinct = list(dict.fromkeys(texts))
    return dict(zip(distinct, counter.count_many(distinct), strict=True))


def _near_duplicate_text(parts: tuple[str, ...], norms: list[str]) -> str:
    """The text a row is compared by: its parts joined by newlines. For ASCII parts that is,
    normalized, the non-empty normalized parts joined by spaces (normalizing ASCII works
    character by character, and the newline is whitespace), so it need not be normalized
    again."""
    if all(part.isascii() for part in parts):
        return NormalizedText(" ".join(norm for norm in norms if norm))
    return "\n".join(parts)


def check(
    candidates: list[Candidate], options: BuildOptions, counter: TokenCounter
) -> tuple[list[Checked], list[Dropped]]:
    """The candidates that pass every check, and the ones dropped with their reasons."""
    dropped: list[Dropped] = []
    normalized = _Normalized()

    def drop(c: Candidate, reason: str, detail: str = "") -> None:
        dropped.append(Dropped(reason, c.event_ids, c.generation_ids, detail))

    well_formed = []
    for c in candidates:
        problem = _format_problem(c, normalized)
        if problem:
            drop(c, "invalid_format", problem)
        else:
            well_formed.append(c)

    prompts = [render_prompt(c.prompt) for c in well_formed]
    tokens = _token_counts(counter, [*prompts, *(t for c in well_formed for t in c.completions)])
    fitting: list[tuple[Candidate, str, int]] = []
    for c, prompt in zip(well_formed, prompts, strict=True):
        p_tokens = tokens[prompt]
        c_tokens = [tokens[t] for t in c.completions]
        if p_tokens > options.max_prompt_tokens:
            drop(c, "too_long", f"prompt has {p_tokens} tokens")
        elif max(c_tokens) > options.max_completion_tokens:
            drop(c, "too_long", f"completion has {max(c_tokens)} tokens")
        else:
            fitting.append((c, prompt, p_tokens + sum(c_tokens)))

    seen: set[str] = set()
    unique: list[tuple[Candidate, str, int, str]] = []
    for c, prompt, tokens_of_row in fitting:
        label = "" if c.label is None else str(c.label)
        parts = (prompt, *c.completions, label)
        norms = [normalized[part] for part in parts]
        key = normalized_key(*norms)
        if key in seen:
            drop(c, "exact_duplicate")
            continue
        seen.add(key)
        unique.append((c, _near_duplicate_text(parts, norms), tokens_of_row, key))

    originals: list[str | None] = [None] * len(unique)
    if options.near_duplicate_threshold < 1.0:
        near = NearDuplicateIndex(threshold=options.near_duplicate_threshold, seed=options.seed + 1)
        # All signatures at once (vectorised); the answers are those of one row at a time.
        originals = near.find_or_add_many([u[3] for u in unique], [u[1] for u in unique])
    passed = []
    for (c, _text, tokens_of_row, _key), original in zip(unique, originals, strict=True):
        if original is not None:
            drop(c, "near_duplicate", f"of row {original[:12]}")
        else:
            passed.append(Checked(c, tokens_of_row))
    return passed, dropped
