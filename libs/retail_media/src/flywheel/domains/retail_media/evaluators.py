"""Deterministic rule evaluators: a score in [0, 1] with the checks behind it.

No model is involved, so the same answer always gets the same score on any machine;
that is what lets the online-RL recipe use these as reward functions and critics use
them as a cheap first opinion.

Scoring, for both tasks: each check yields a value in [0, 1] (partial credit where a
near miss is better than a wild one); the score is their weighted mean, halved when
any hard constraint fails (money that does not add up, a retailer left out, a lower
ROAS funded over a higher one, a banned claim, copy over the length limit). The halving
keeps a polished answer that breaks a rule below a plain one that keeps them all,
while still ranking rule-breakers among themselves.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import combinations
from types import MappingProxyType

from flywheel.domains.retail_media.allocation import Allocation, parse_allocation
from flywheel.domains.retail_media.catalog import CLAIM_VARIANTS, VOICES
from flywheel.domains.retail_media.prompts import (
    BudgetingPrompt,
    CreativePrompt,
    parse_budgeting_prompt,
    parse_creative_prompt,
)
from flywheel.domains.retail_media.quantities import format_amount

HARD_FAILURE_FACTOR = 0.5
AMOUNT_TOLERANCE = 0.01  # of the budget
PERCENT_TOLERANCE = 1.0  # percentage points
# Amounts closer than this (share of the budget) are an equal split, not a ranking:
# "$8,333" beside "$8,333.33" favours no one.
TIE_TOLERANCE = 0.001

BUDGETING_WEIGHTS: Mapping[str, float] = MappingProxyType(
    {
        "complete": 0.15,
        "amounts_sum": 0.2,
        "percents_sum": 0.1,
        "consistent": 0.1,
        "roas_order": 0.35,
        "both_given": 0.1,
    }
)
CREATIVE_WEIGHTS: Mapping[str, float] = MappingProxyType(
    {"compliance": 0.3, "length": 0.15, "voice": 0.4, "on_product": 0.15}
)


@dataclass(frozen=True, slots=True)
class Evaluation:
    """A score, the checks it combines, why checks fell short, what was read."""

    score: float
    checks: dict[str, float]
    reasons: list[str] = field(default_factory=list)
    parsed: dict[str, Allocation] = field(default_factory=dict)
    hard_failures: tuple[str, ...] = ()


def _combine(
    checks: dict[str, float], weights: Mapping[str, float], hard_failures: list[str]
) -> float:
    # Checks that do not apply (no percentages stated, say) are left out, not scored 0.
    total_weight = sum(weights[name] for name in checks)
    mean = sum(weights[name] * value for name, value in checks.items()) / total_weight
    score = mean * (HARD_FAILURE_FACTOR if hard_failures else 1.0)
    return min(1.0, max(0.0, score))


def _sum_check(error: float, tolerance: float, zero_at: float) -> float:
    """1 within ``tolerance``, then falling linearly to 0 at ``zero_at``."""
    if error <= tolerance:
        return 1.0
    return max(0.0, 1.0 - error / zero_at)


def _pair_agreement(prompt: BudgetingPrompt, amounts: dict[str, float]) -> tuple[float, int]:
    """Rank agreement of amounts with ROAS over retailer pairs, and the inversions.

    A pair where the higher ROAS gets more scores 1, the same 0.5, less 0: a Kendall
    tau (ties counted half) mapped to [0, 1]. Unfunded retailers count as 0.
    """
    pairs = 0
    credit = 0.0
    inversions = 0
    for a, b in combinations(prompt.retailers, 2):
        if a.roas == b.roas:
            continue
        hi, lo = (a, b) if a.roas > b.roas else (b, a)
        hi_amount, lo_amount = amounts.get(hi.name, 0.0), amounts.get(lo.name, 0.0)
        pairs += 1
        if abs(hi_amount - lo_amount) <= TIE_TOLERANCE * prompt.total:
            credit += 0.5
        elif hi_amount > lo_amount:
            credit += 1.0
        else:
            inversions += 1
    return (credit / pairs if pairs else 1.0), inversions


def evaluate_budgeting(prompt: BudgetingPrompt | str, answer: str) -> Evaluation:
    """Score a budget allocation ``answer`` against the budgeting ``prompt``.

    A prompt given as text is parsed back first (``ValueError`` if it states no budget
    and retailers). Checks: every retailer allocated (``complete``), amounts sum to the
    budget within 1% (``amounts_sum``), stated percentages sum to 100 within a point
    (``percents_sum``) and agree with the amounts (``consistent``), higher ROAS never
    funded below lower ROAS (``roas_order``), both figures given (``both_given``).
    """
    if isinstance(prompt, str):
        prompt = parse_budgeting_prompt(prompt)
    total = float(prompt.total)
    names = [r.name for r in prompt.retailers]
    parsed = parse_allocation(answer, names, total)
    if not parsed:
        return Evaluation(0.0, dict.fromkeys(BUDGETING_WEIGHTS, 0.0), ["no allocation found"])

    # A figure the answer leaves out is implied by the other one, so an amounts-only
    # answer is still judged on where the money goes.
    amounts: dict[str, float] = {}
    percents: dict[str, float] = {}
    for name, a in parsed.items():
        amounts[name] = a.amount if a.amount is not None else (a.percent or 0.0) * total / 100
        percents[name] = a.percent if a.percent is not None else 100 * (a.amount or 0.0) / total

    checks: dict[str, float] = {}
    reasons: list[str] = []
    hard: list[str] = []

    missing = [n for n in names if n not in parsed]
    checks["complete"] = 1 - len(missing) / len(names)
    if missing:
        hard.append("complete")
        reasons.append(f"no allocation for {', '.join(missing)}")

    amount_sum = sum(amounts.values())
    amount_error = abs(amount_sum - total) / total
    checks["amounts_sum"] = _sum_check(amount_error, AMOUNT_TOLERANCE, 0.25)
    if checks["amounts_sum"] < 1:
        hard.append("amounts_sum")
        reasons.append(
            f"amounts sum to {format_amount(round(amount_sum, 2))}, not "
            f"{format_amount(total)} (off by {100 * amount_error:.1f}%)"
        )

    if any(a.percent is not None for a in parsed.values()):
        percent_sum = sum(percents.values())
        checks["percents_sum"] = _sum_check(abs(percent_sum - 100), PERCENT_TOLERANCE, 25.0)
        if checks["percents_sum"] < 1:
            hard.append("percents_sum")
            reasons.append(f"percentages sum to {percent_sum:.1f}, not 100")

    both = [a for a in parsed.values() if a.amount is not None and a.percent is not None]
    if both:
        disagree = [
            a.retailer
            for a in both
            if abs((a.percent or 0.0) - 100 * (a.amount or 0.0) / total) > PERCENT_TOLERANCE
        ]
        checks["consistent"] = 1 - len(disagree) / len(both)
        if disagree:
            reasons.append(f"percentage does not match the amount for {', '.join(disagree)}")

    agreement, inversions = _pair_agreement(prompt, amounts)
    checks["roas_order"] = agreement
    if inversions:
        hard.append("roas_order")
        reasons.append(f"{inversions} retailer pair(s) give a lower ROAS more than a higher one")
    elif agreement < 1:
        reasons.append("some retailers with different ROAS get the same amount")

    checks["both_given"] = len(both) / len(names)
    if len(both) < len(names):
        reasons.append("not every retailer has both an amount and a percentage")

    return Evaluation(
        _combine(checks, BUDGETING_WEIGHTS, hard), checks, reasons, parsed, tuple(hard)
    )


@lru_cache(maxsize=256)
def voice_pattern(adjective: str) -> re.Pattern[str]:
    """Words that show a brand-voice adjective, as whole words in any case.

    A known voice is shown by any word of its lexicon ("playful": "fun", "joy"), an
    unknown one (from a hand-written prompt) by the adjective itself; plurals count,
    longer words do not ("fun" is not "fund").
    """
    words = VOICES[adjective].lexicon if adjective in VOICES else (adjective,)
    alternatives = "|".join(re.escape(w) for w in words)
    return re.compile(rf"(?<![\w])(?:{alternatives})s?(?![\w])", re.IGNORECASE)


@lru_cache(maxsize=256)
def claim_pattern(claim: str) -> re.Pattern[str]:
    """What counts as using a banned claim, case-insensitively.

    Single words also match their inflections ("cure": "cures", "cured"; "guaranteed":
    "guarantee"), multi-word claims any spacing or hyphenation ("risk free"), and some
    claims their usual rewordings ("#1": "number one").
    """
    forms: list[str] = []
    for form in (claim, *CLAIM_VARIANTS.get(claim, ())):
        words = re.split(r"[\s\-]+", form.strip())
        if len(words) == 1 and form.isalpha():
            stem = re.sub(r"(?:ed|es|s|ing)$", "", form) if len(form) > 5 else form
            forms.append(rf"(?<![\w]){re.escape(stem)}\w{{0,3}}(?![\w])")
        else:
            body = r"[\s\-]*".join(re.escape(w) for w in words).replace("%", r"\s?%")
            # "#1" and "100% natural" start or end with a symbol, so \b would misfire.
            forms.append(rf"(?<![\w#]){body}(?![\w])")
    return re.compile("|".join(forms), re.IGNORECASE)


def evaluate_creative(prompt: CreativePrompt | str, answer: str) -> Evaluation:
    """Score ad copy ``answer`` against the creative brief ``prompt``.

    A prompt given as text is parsed back first (``ValueError`` if it states no length
    limit). Checks: no banned word or claim (``compliance``, 0 on any), within the
    character limit (``length``, falling to 0 at twice the limit), each brand-voice
    adjective shown by a word of its lexicon (``voice``), names the product or brand
    (``on_product``).
    """
    if isinstance(prompt, str):
        prompt = parse_creative_prompt(prompt)
    copy = answer.strip()
    if not copy:
        return Evaluation(0.0, dict.fromkeys(CREATIVE_WEIGHTS, 0.0), ["empty answer"])

    checks: dict[str, float] = {}
    reasons: list[str] = []
    hard: list[str] = []

    used = [c for c in prompt.banned if claim_pattern(c).search(copy)]
    checks["compliance"] = 0.0 if used else 1.0
    if used:
        hard.append("compliance")
        reasons.append(f"uses banned {', '.join(repr(c) for c in used)}")

    overflow = len(copy) - prompt.max_chars
    checks["length"] = 1.0 if overflow <= 0 else max(0.0, 1 - overflow / prompt.max_chars)
    if overflow > 0:
        hard.append("length")
        reasons.append(f"{len(copy)} characters, over the limit of {prompt.max_chars}")

    if prompt.voice:
        missing = [v for v in prompt.voice if not voice_pattern(v).search(copy)]
        checks["voice"] = 1 - len(missing) / len(prompt.voice)
        if missing:
            reasons.append(f"no sign of the {', '.join(missing)} voice")

    names = [n for n in (prompt.product, prompt.brand) if n]
    if names:
        found = any(n.lower() in copy.lower() for n in names)
        checks["on_product"] = 1.0 if found else 0.0
        if not found:
            reasons.append("names neither the product nor the brand")

    return Evaluation(_combine(checks, CREATIVE_WEIGHTS, hard), checks, reasons, {}, tuple(hard))


RewardFunction = Callable[[str, str], float]


def budgeting_reward(prompt_text: str, completion: str) -> float:
    """``evaluate_budgeting`` as a reward function: prompt text in, score out."""
    return evaluate_budgeting(prompt_text, completion).score


def creative_reward(prompt_text: str, completion: str) -> float:
    """``evaluate_creative`` as a reward function: prompt text in, score out."""
    return evaluate_creative(prompt_text, completion).score


# Named as trainer recipes and critic configs refer to them: "<domain>.<task>".
EVALUATORS: Mapping[str, RewardFunction] = MappingProxyType(
    {"retail_media.budgeting": budgeting_reward, "retail_media.creative": creative_reward}
)
