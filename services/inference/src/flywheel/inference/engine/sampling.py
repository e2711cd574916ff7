"""Choosing each row's next token, and turning tokens into streamed text with stop strings.

Rows of one batch may ask for anything (greedy next to nucleus sampling, penalties, a
seed each): greedy rows take the argmax, the others are filtered and sampled with their
own seeded generator, so a request's output depends on its seed and not on what else
shared its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI / vLLM decoding parameters of one request (already validated)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    # 0 or -1: no top-k cut.
    top_k: int = -1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        """Temperature 0 means the argmax, as in vLLM."""
        return self.temperature <= 1e-5


@dataclass
class RowSampler:
    """One sequence's sampling state: its parameters, generator and token counts."""

    params: SamplingParams
    prompt_ids: list[int]
    generator: torch.Generator | None = None
    generated: list[int] = field(default_factory=list)

    @classmethod
    def create(cls, params: SamplingParams, prompt_ids: list[int], choice: int) -> RowSampler:
        """A sampler for choice ``choice`` of a request (seeded choices differ by index)."""
        generator = None
        if params.seed is not None and not params.greedy:
            # As vLLM: choice i of a seeded request samples like a single request with seed + i.
            generator = torch.Generator().manual_seed(params.seed + choice)
        return cls(params=params, prompt_ids=prompt_ids, generator=generator)


def choose_tokens(logits: torch.Tensor, rows: list[RowSampler]) -> list[int]:
    """Next token of every row of ``logits`` [rows, vocab] (float32; may hold -inf masks)."""
    chosen: list[int] = []
    for index, row in enumerate(rows):
        scores = _penalised(logits[index], row)
        params = row.params
        if params.greedy:
            chosen.append(int(torch.argmax(scores)))
            continue
        scores = scores / params.temperature
        if params.top_k > 0:
            kth = torch.topk(scores, min(params.top_k, scores.shape[-1])).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if params.top_p < 1.0:
            probs = _nucleus(probs, params.top_p)
        chosen.append(int(torch.multinomial(probs, 1, generator=row.generator)))
    return chosen


def _penalised(scores: torch.Tensor, row: RowSampler) -> torch.Tensor:
    params = row.params
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted({*row.prompt_ids, *row.generated}), dtype=torch.long)
        picked = scores.index_select(0, seen)
        picked = torch.where(
            picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty
        )
        scores = scores.index_copy(0, seen, picked)
    if row.generated and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(
            torch.tensor(row.generated, dtype=torch.long), minlength=scores.shape[-1]
        ).to(scores.dtype)[: scores.shape[-1]]
        scores = scores - params.frequency_penalty * counts
        scores = scores - params.presence_penalty * (counts > 0).to(scores.dtype)
    return scores


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p``."""
    ordered, order = torch.sort(probs, descending=True)
    before = torch.cumsum(ordered, dim=-1) - ordered
    ordered = ordered.masked_fill(before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(0, order, ordered)


class TextStream:
    """A sequence's generated text, released as deltas that never cut a stop string.

    Text is held back while its end could still become a stop string or is an
    incomplete UTF-8 character; when a stop string appears, the text ends before it.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...]) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self.text = ""
        self._released = 0
        self.stopped = False

    def add(self, token_id: int, *, special: bool) -> str:
        """Append a token; the newly releasable text (``stopped`` set on a stop string)."""
        if not special:
            self._ids.append(token_id)
            self.text = str(self._tokenizer.decode(self._ids, skip_special_tokens=True))
        for stop in self._stop:
            # Only a stop string that ends in the new text can be new.
            at = self.text.find(stop, max(0, self._released - len(stop)))
            if at != -1:
                self.text = self.text[:at]
                self.stopped = True
                return self._release(len(self.text))
        return self._release(len(self.text) - self._held_back())

    def finish(self) -> str:
        """Everything not yet released (at the end of generation)."""
        return self._release(len(self.text))

    def _held_back(self) -> int:
        text = self.text
        held = 1 if text.endswith("\ufffd") else 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:size]):
                    held = size
                    break
        return held

    def _release(self, upto: int) -> str:
        upto = max(upto, self._released)
        delta = self.text[self._released : upto]
        self._released = upto
        return delta
