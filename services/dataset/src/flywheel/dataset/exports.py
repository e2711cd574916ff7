"""Training rows in the layouts trainers read, serialised canonically.

- TRL JSONL: the columns TRL's trainers expect for each kind (``prompt``/``completion``,
  ``prompt``/``chosen``/``rejected``, ``label`` for KTO, ``margin`` for reward models), as
  plain text, or as conversational messages when any prompt of the snapshot is a chat
  (TRL wants one format per dataset, so plain prompts become one user message then).
- OpenAI/Together preference JSONL: ``input.messages``, ``preferred_output``,
  ``non_preferred_output`` (pairs only).

Lines are JSON with sorted keys and no spaces, so equal data is equal bytes and the
snapshot id (a sha256 of the bytes) depends on nothing else.
"""

from __future__ import annotations

import json
from typing import Any

from flywheel.dataset.curation import Candidate
from flywheel.dataset.records import PromptValue


def _messages(prompt: PromptValue) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": role, "content": content} for role, content in prompt]


def _answer(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def is_conversational(candidates: list[Candidate]) -> bool:
    """Whether the snapshot's rows must be conversational (some prompt is a chat)."""
    return any(not isinstance(c.prompt, str) for c in candidates)


def trl_row(
    c: Candidate, kind: str, *, conversational: bool, with_scores: bool = False
) -> dict[str, Any]:
    """One row with TRL's columns for ``kind``."""

    def completion(text: str) -> Any:
        return _answer(text) if conversational else text

    row: dict[str, Any] = {"prompt": _messages(c.prompt) if conversational else c.prompt}
    if kind in ("sft", "unpaired"):
        row["completion"] = completion(c.completions[0])
        if kind == "unpaired":
            row["label"] = bool(c.label)
        return row
    row["chosen"] = completion(c.completions[0])
    row["rejected"] = completion(c.completions[1])
    if kind == "reward":
        row["margin"] = round(c.margin or 0.0, 6)
        if with_scores:
            chosen, rejected = c.scores or ({}, {})
            row["chosen_scores"] = [{"dimension": d, "score": s} for d, s in chosen.items()]
            row["rejected_scores"] = [{"dimension": d, "score": s} for d, s in rejected.items()]
    return row


def openai_preference_row(c: Candidate) -> dict[str, Any]:
    """One pair in the OpenAI/Together preference fine-tuning format."""
    return {
        "input": {"messages": _messages(c.prompt)},
        "preferred_output": _answer(c.completions[0]),
        "non_preferred_output": _answer(c.completions[1]),
    }


# What json.dumps(value, **options) makes per call, made once: building the encoder costs
# about as much as encoding one row.
CANONICAL = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def canonical_line(row: dict[str, Any]) -> str:
    """``row`` as one canonical JSON line (sorted keys, no spaces, UTF-8 kept)."""
    return CANONICAL.encode(row) + "\n"


class LineEncoder:
    """The canonical lines of pair rows, with each distinct string encoded once.

    The rows of a snapshot share most of their strings (a prompt is in each of its pairs, an
    output in several), and encoding them is most of the work. Plain-text pair rows are
    assembled from their values' encodings exactly as ``json.dumps`` assembles them (sorted
    keys, no spaces); any other row goes through :func:`canonical_line`.
    """

    def __init__(self) -> None:
        self._strings: dict[str, str] = {}

    def _string(self, text: str) -> str:
        encoded = self._strings.get(text)
        if encoded is None:
            encoded = self._strings[text] = CANONICAL.encode(text)
        return encoded

    def trl_line(
        self, c: Candidate, kind: str, *, conversational: bool, with_scores: bool = False
    ) -> str:
        """``canonical_line(trl_row(c, kind, ...))``."""
        plain_pair = kind == "preference" or (kind == "reward" and not with_scores)
        if conversational or not plain_pair or not isinstance(c.prompt, str):
            return canonical_line(
                trl_row(c, kind, conversational=conversational, with_scores=with_scores)
            )
        margin = (
            f',"margin":{CANONICAL.encode(round(c.margin or 0.0, 6))}' if kind == "reward" else ""
        )
        chosen, rejected = (self._string(text) for text in c.completions)
        prompt = self._string(c.prompt)
        return f'{{"chosen":{chosen}{margin},"prompt":{prompt},"rejected":{rejected}}}\n'

    def openai_line(self, c: Candidate) -> str:
        """``canonical_line(openai_preference_row(c))``."""
        if not isinstance(c.prompt, str):
            return canonical_line(openai_preference_row(c))
        chosen, rejected = (self._string(text) for text in c.completions)
        return (
            f'{{"input":{{"messages":[{{"content":{self._string(c.prompt)},"role":"user"}}]}},'
            f'"non_preferred_output":[{{"content":{rejected},"role":"assistant"}}],'
            f'"preferred_output":[{{"content":{chosen},"role":"assistant"}}]}}\n'
        )
