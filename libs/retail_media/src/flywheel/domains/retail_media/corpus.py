"""Seeded synthetic answers of known quality, and the corpus built from them.

``flywheel bootstrap-model`` pretrains the demo's tiny base model on ``corpus_text``. The
corpus mixes good, mediocre and bad answers on purpose: a model pretrained on it writes
answers of varied quality, which gives the critics something to tell apart and the
loop something to improve. Answers come in several surface forms (bullets, tables,
sentences, headings with figures below) so neither the model nor the evaluators
overfit to one layout.

Everything is drawn from the ``random.Random`` passed in, so a seed fixes the output.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from flywheel.domains.retail_media.catalog import CALLS_TO_ACTION, OFF_BRAND_WORDS, VOICES
from flywheel.domains.retail_media.prompts import (
    BudgetingPrompt,
    CreativePrompt,
    budgeting_prompt,
    creative_prompt,
)
from flywheel.domains.retail_media.quantities import format_amount, format_percent

Quality = Literal["good", "mediocre", "bad"]
QUALITIES: tuple[Quality, ...] = ("good", "mediocre", "bad")
TaskName = Literal["budgeting", "creative"]

DEFAULT_QUALITY_WEIGHTS: tuple[float, float, float] = (0.4, 0.3, 0.3)


@dataclass(frozen=True, slots=True)
class Example:
    """One synthetic prompt and answer, with the quality the answer was written at."""

    task: TaskName
    prompt: str
    answer: str
    quality: Quality

    @property
    def text(self) -> str:
        """The pretraining document: the prompt, a newline, the answer."""
        return f"{self.prompt}\n{self.answer}"


# --- budgeting ---------------------------------------------------------------------------

# (retailer, amount or None, percent or None), in the order an answer lists them.
_Row = tuple[str, float | None, float | None]


def _step(total: int) -> int:
    return 50 if total < 10_000 else 100 if total < 100_000 else 500


def _split(total: int, weights: Sequence[float], step: int) -> list[float]:
    """``total`` split in proportion to ``weights``, in multiples of ``step``, summing exactly."""
    raw = [total * w / sum(weights) for w in weights]
    amounts = [float(round(r / step) * step) for r in raw]
    # Rounding leaves a remainder; the largest share absorbs it so the sum is exact.
    largest = max(range(len(amounts)), key=amounts.__getitem__)
    amounts[largest] += total - sum(amounts)
    return amounts


def _strictly_follows_roas(prompt: BudgetingPrompt, amounts: Sequence[float]) -> bool:
    # Clearly apart, not just apart: evaluators treat near-equal amounts as a tie.
    gap = 0.002 * prompt.total
    ranked = sorted(zip(prompt.retailers, amounts, strict=True), key=lambda p: p[0].roas)
    return all(b[1] - a[1] > gap for a, b in itertools.pairwise(ranked)) and all(
        x > 0 for x in amounts
    )


def _roas_split(prompt: BudgetingPrompt, rng: random.Random) -> list[float]:
    """Amounts growing with ROAS (proportional to ROAS to a random power), summing to the total."""
    roas = [r.roas for r in prompt.retailers]
    for power in (rng.choice((1.0, 1.5, 2.0)), 2.0, 3.0):
        for step in (_step(prompt.total), 10, 1):
            amounts = _split(prompt.total, [x**power for x in roas], step)
            if _strictly_follows_roas(prompt, amounts):
                return amounts
    raise AssertionError("ROAS values are distinct, so a cubic split always orders them")


def _money(amount: float, rng: random.Random) -> str:
    style = rng.random()
    if style < 0.15 and amount >= 1000 and amount % 100 == 0:
        return f"${amount / 1000:g}k"
    if style < 0.25:
        return f"{amount:,.0f} USD"
    return format_amount(amount)


def _figures(amount: float | None, percent: float | None, rng: random.Random) -> str:
    if amount is not None and percent is not None:
        return f"{_money(amount, rng)} ({format_percent(percent)})"
    if amount is not None:
        return _money(amount, rng)
    return format_percent(percent or 0.0)


def _render_bullets(rows: Sequence[_Row], rng: random.Random) -> str:
    bullet = rng.choice(("-", "*", "•"))
    return "\n".join(f"{bullet} {name}: {_figures(a, p, rng)}" for name, a, p in rows)


def _render_table(rows: Sequence[_Row], rng: random.Random) -> str:
    has_amount = any(a is not None for _, a, _ in rows)
    has_percent = any(p is not None for _, _, p in rows)
    bare = rng.random() < 0.5  # units in the header only, as many tables do
    header = ["Retailer"]
    if has_amount:
        header.append("Amount ($)" if bare else "Amount")
    if has_percent:
        header.append("Share (%)" if bare else "Share")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, a, p in rows:
        cells = [name]
        if has_amount:
            cells.append(f"{a or 0.0:,.0f}" if bare else _money(a or 0.0, rng))
        if has_percent:
            cells.append(format_percent(p or 0.0)[:-1] if bare else format_percent(p or 0.0))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def _render_sentence(rows: Sequence[_Row], rng: random.Random) -> str:
    verb = rng.choice(("gets", "receives", "should get"))
    parts = [f"{name} {verb} {_figures(a, p, rng)}" for name, a, p in rows]
    return _join(parts) + "."


def _render_value_first(rows: Sequence[_Row], rng: random.Random) -> str:
    parts = [f"{_figures(a, p, rng)} to {name}" for name, a, p in rows]
    return rng.choice(("Put ", "Allocate ", "Spend ")) + _join(parts) + "."


def _render_headings(rows: Sequence[_Row], rng: random.Random) -> str:
    blocks = []
    for name, a, p in rows:
        lines = [f"**{name}**"]
        if a is not None:
            lines.append(f"  Amount: {_money(a, rng)}")
        if p is not None:
            lines.append(f"  Share: {format_percent(p)}")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


_RENDERERS: tuple[Callable[[Sequence[_Row], random.Random], str], ...] = (
    _render_bullets,
    _render_table,
    _render_sentence,
    _render_value_first,
    _render_headings,
)


def _rows(
    prompt: BudgetingPrompt,
    amounts: Sequence[float | None],
    percents: Sequence[float | None],
    rng: random.Random,
) -> list[_Row]:
    rows = [(r.name, a, p) for r, a, p in zip(prompt.retailers, amounts, percents, strict=True)]
    if rng.random() < 0.6:  # largest first, as a person would list them
        rows.sort(key=lambda row: -(row[1] if row[1] is not None else row[2] or 0.0))
    return rows


def _rationale(prompt: BudgetingPrompt, rng: random.Random) -> str:
    ranked = sorted(prompt.retailers, key=lambda r: r.roas, reverse=True)
    best, worst = ranked[0], ranked[-1]
    return rng.choice(
        (
            f"Rationale: {best.name} has the highest ROAS ({best.roas:.1f}), so it gets the "
            f"largest share; {worst.name} ({worst.roas:.1f}) gets the least.",
            f"Budget follows ROAS: {best.name} returns the most per dollar, "
            f"{worst.name} the least.",
            f"Higher ROAS earns more budget, led by {best.name} at {best.roas:.1f}.",
        )
    )


def budgeting_answer(prompt: BudgetingPrompt, quality: Quality, rng: random.Random) -> str:
    """An answer to ``prompt`` written at ``quality``.

    good: amounts sum to the budget, percentages to 100, more money to higher ROAS, a
    one-line rationale. mediocre: arithmetic right but an equal split, or only one of
    amount/percentage. bad: amounts that do not sum, percentages that do not, the
    lowest ROAS favoured, a retailer left out, or no figures at all.
    """
    total = prompt.total
    render = rng.choice(_RENDERERS)
    good = _roas_split(prompt, rng)
    good_pct = [100 * a / total for a in good]

    if quality == "good":
        body = render(_rows(prompt, good, good_pct, rng), rng)
        return f"{body}\n{_rationale(prompt, rng)}"

    if quality == "mediocre":
        variant = rng.randrange(3)
        if variant == 0:
            # To the cent, as a person dividing by k would: rounding to a step would hand
            # the remainder to someone and break the tie.
            k = len(prompt.retailers)
            equal = [round(total / k, 2)] * k
            body = render(_rows(prompt, equal, [100 / k] * k, rng), rng)
            return f"{body}\nAn equal split keeps it simple."
        if variant == 1:
            return render(_rows(prompt, good, [None] * len(good), rng), rng)
        return render(_rows(prompt, [None] * len(good), good_pct, rng), rng)

    variant = rng.randrange(5)
    if variant == 0:  # amounts that do not add up
        factor = rng.choice((rng.uniform(0.7, 0.9), rng.uniform(1.1, 1.3)))
        wrong = [float(round(a * factor / 10) * 10) for a in good]
        return render(_rows(prompt, wrong, good_pct, rng), rng)
    if variant == 1:  # percentages that do not add up
        factor = rng.uniform(1.15, 1.5)
        return render(_rows(prompt, good, [p * factor for p in good_pct], rng), rng)
    if variant == 2:  # the lowest ROAS gets the most
        order = sorted(range(len(good)), key=lambda i: prompt.retailers[i].roas)
        flipped = [0.0] * len(good)
        for i, j in zip(order, reversed(order), strict=True):
            flipped[i] = good[j]
        body = render(_rows(prompt, flipped, [100 * a / total for a in flipped], rng), rng)
        return f"{body}\nThe smaller networks need the most support."
    if variant == 3:  # a retailer left out, its money spread over the others
        dropped = rng.randrange(len(good))
        kept = [i for i in range(len(good)) if i != dropped]
        rest = _split(total, [good[i] for i in kept], _step(total))
        rows = [
            (prompt.retailers[i].name, a, 100 * a / total) for i, a in zip(kept, rest, strict=True)
        ]
        return render(rows, rng)
    best = max(prompt.retailers, key=lambda r: r.roas)
    return f"Spend most of it on {best.name} and see how it goes."


# --- creative ----------------------------------------------------------------------------

_CLAIM_SENTENCES = {
    "cure": "It can cure a bad day.",
    "guaranteed": "Results guaranteed.",
    "#1": "The #1 choice.",
    "clinically proven": "Clinically proven.",
    "miracle": "A miracle in every pack.",
    "risk-free": "Try it risk-free.",
    "100% natural": "100% natural.",
    "FDA approved": "FDA approved.",
    "best in the world": "The best in the world.",
    "instant results": "Instant results.",
}

_FILLER = (
    "We really think you are going to like it a lot",
    "it is the kind of product that does what it says it will do",
    "and there is honestly not much more to say about it than that",
    "so go ahead and pick one up next time you are shopping around",
)


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _good_copy(prompt: CreativePrompt, rng: random.Random, voices: Sequence[str]) -> str:
    phrases = [rng.choice(VOICES[v].phrases) for v in voices]
    cta = rng.choice(CALLS_TO_ACTION).format(retailer=prompt.retailer)
    name = f"{prompt.product} by {prompt.brand}"
    candidates = [
        f"{name}: {', '.join(phrases)}. {cta}",
        f"{_sentence('. '.join(_sentence(p) for p in phrases))}. {name}. {cta}",
        f"{prompt.product}: {', '.join(phrases)}. {cta}",
        f"{prompt.product}: {', '.join(phrases)}.",
    ]
    if rng.random() < 0.5:
        candidates[0], candidates[1] = candidates[1], candidates[0]
    # The bare lexicon fallback always fits: the shortest limit leaves room for it.
    words = ", ".join(VOICES[v].lexicon[0] for v in voices)
    candidates.append(f"{prompt.product}: {words}.")
    return next(c for c in candidates if len(c) <= prompt.max_chars)


def creative_answer(prompt: CreativePrompt, quality: Quality, rng: random.Random) -> str:
    """Ad copy for ``prompt`` written at ``quality``.

    good: names the product, shows every voice adjective, fits the limit, no banned
    claim. mediocre: compliant and short but generic, or showing only one voice. bad: a
    banned claim (in any letter case), far over the limit, or off-brand and off-product.
    """
    if quality == "good":
        return _good_copy(prompt, rng, prompt.voice)
    if quality == "mediocre":
        if rng.random() < 0.5:
            return _good_copy(prompt, rng, prompt.voice[:1])
        cta = rng.choice(CALLS_TO_ACTION).format(retailer=prompt.retailer)
        generic = f"{prompt.product} by {prompt.brand}. Available now."
        with_cta = f"{generic} {cta}"
        return with_cta if len(with_cta) <= prompt.max_chars else generic

    variant = rng.randrange(3)
    if variant == 0:
        claim = rng.choice(prompt.banned)
        sentence = _CLAIM_SENTENCES.get(claim, f"{claim}.")
        sentence = rng.choice((sentence, sentence.upper(), sentence.lower(), sentence.title()))
        return f"{_good_copy(prompt, rng, prompt.voice)} {sentence}"
    if variant == 1:
        copy = _good_copy(prompt, rng, prompt.voice)
        while len(copy) <= prompt.max_chars * 1.3:
            copy += " " + _sentence(rng.choice(_FILLER)) + "."
        return copy
    off = rng.sample(OFF_BRAND_WORDS, 2)
    return _sentence(f"{off[0]} {off[1]} for everyday needs. Buy it or don't, whatever.")


# --- corpus ------------------------------------------------------------------------------


def corpus(
    n: int,
    seed: int,
    *,
    quality_weights: Sequence[float] = DEFAULT_QUALITY_WEIGHTS,
    tasks: Sequence[TaskName] = ("budgeting", "creative"),
) -> Iterator[Example]:
    """``n`` examples, tasks drawn evenly and qualities by ``quality_weights``.

    The same ``n``, ``seed`` and options give the same examples in the same order, in
    any process (no hash-ordered collection is involved).
    """
    rng = random.Random(seed)
    for _ in range(n):
        task = rng.choice(tasks)
        quality = rng.choices(QUALITIES, weights=quality_weights)[0]
        if task == "budgeting":
            b = budgeting_prompt(rng)
            yield Example(task, b.text, budgeting_answer(b, quality, rng), quality)
        else:
            c = creative_prompt(rng)
            yield Example(task, c.text, creative_answer(c, quality, rng), quality)


def corpus_text(n: int, seed: int) -> Iterator[str]:
    """``n`` pretraining documents, each "prompt\\nanswer", from ``corpus(n, seed)``."""
    for example in corpus(n, seed):
        yield example.text
