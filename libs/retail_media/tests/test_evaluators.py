"""Tests for the rule evaluators on hand-written answers, and the reward registry."""

from __future__ import annotations

import math
import random

import pytest

from flywheel.domains.retail_media.evaluators import (
    EVALUATORS,
    claim_pattern,
    evaluate_budgeting,
    evaluate_creative,
)
from flywheel.domains.retail_media.prompts import (
    BudgetingPrompt,
    CreativePrompt,
    Retailer,
    budgeting_prompt,
    creative_prompt,
)

PROMPT_TEXT = (
    "Allocate $50,000 for Acme Snacks across Amazon Ads (ROAS 4.2), Walmart Connect "
    "(ROAS 3.1) and Instacart (ROAS 2.5). Give each retailer's amount and percentage."
)
PROMPT = BudgetingPrompt(
    "Acme Snacks",
    50_000,
    (Retailer("Amazon Ads", 4.2), Retailer("Walmart Connect", 3.1), Retailer("Instacart", 2.5)),
    PROMPT_TEXT,
)
GOOD = (
    "- Amazon Ads: $25,000 (50%)\n- Walmart Connect: $15,000 (30%)\n- Instacart: $10,000 (20%)\n"
    "Amazon Ads has the best ROAS, so it gets the most."
)

CREATIVE_TEXT = (
    "Write ad copy for Sea Salt Crackers by Acme Snacks on Instacart. Brand voice: playful "
    'and wholesome. Do not use these words or claims: "cure", "guaranteed" and "#1". '
    "Keep it to at most 120 characters."
)
CREATIVE = CreativePrompt(
    "Acme Snacks",
    "Sea Salt Crackers",
    "Instacart",
    ("playful", "wholesome"),
    ("cure", "guaranteed", "#1"),
    120,
    CREATIVE_TEXT,
)
GOOD_COPY = "Sea Salt Crackers by Acme Snacks: seriously fun, honest ingredients. Try it today."


def test_good_allocation_scores_one() -> None:
    evaluation = evaluate_budgeting(PROMPT, GOOD)
    assert evaluation.score == 1.0
    assert evaluation.reasons == []
    assert set(evaluation.parsed) == {"Amazon Ads", "Walmart Connect", "Instacart"}
    assert all(v == 1.0 for v in evaluation.checks.values())


def test_prompt_text_and_dataclass_give_the_same_evaluation() -> None:
    assert evaluate_budgeting(PROMPT_TEXT, GOOD) == evaluate_budgeting(PROMPT, GOOD)
    rng = random.Random(0)
    for _ in range(50):
        p = budgeting_prompt(rng)
        answer = f"{p.retailers[0].name}: ${p.total:,}"
        assert evaluate_budgeting(p.text, answer) == evaluate_budgeting(p, answer)


def test_wrong_sum_is_caught() -> None:
    answer = "- Amazon Ads: $25,000 (50%)\n- Walmart Connect: $15,000 (30%)\n- Instacart: $5,000"
    evaluation = evaluate_budgeting(PROMPT, answer)
    assert evaluation.checks["amounts_sum"] < 1
    assert "amounts_sum" in evaluation.hard_failures
    assert any("$45,000" in r for r in evaluation.reasons)
    assert evaluation.score < 0.5


def test_sum_within_one_percent_passes() -> None:
    answer = "Amazon Ads: $25,200 (50%)\nWalmart Connect: $15,000 (30%)\nInstacart: $10,000 (20%)"
    evaluation = evaluate_budgeting(PROMPT, answer)
    assert evaluation.checks["amounts_sum"] == 1.0
    assert evaluation.score == 1.0


def test_percentages_that_do_not_add_up_are_caught() -> None:
    answer = "Amazon Ads: $25,000 (60%)\nWalmart Connect: $15,000 (30%)\nInstacart: $10,000 (20%)"
    evaluation = evaluate_budgeting(PROMPT, answer)
    assert evaluation.checks["percents_sum"] < 1
    assert evaluation.checks["consistent"] == pytest.approx(2 / 3)
    assert evaluation.score < 0.5


def test_percent_only_answer_is_judged_on_implied_amounts() -> None:
    evaluation = evaluate_budgeting(PROMPT, "Amazon Ads 50%, Walmart Connect 30%, Instacart 20%")
    assert evaluation.checks["amounts_sum"] == 1.0
    assert evaluation.checks["roas_order"] == 1.0
    assert evaluation.checks["both_given"] == 0.0
    assert "consistent" not in evaluation.checks
    assert 0.8 < evaluation.score < 1.0


def test_missing_retailer_is_caught() -> None:
    evaluation = evaluate_budgeting(PROMPT, "Amazon Ads: $30,000 (60%)\nWalmart: $20,000 (40%)")
    assert evaluation.checks["complete"] == pytest.approx(2 / 3)
    assert "complete" in evaluation.hard_failures
    assert any("Instacart" in r for r in evaluation.reasons)
    assert evaluation.score < 0.5


def test_roas_order_gets_partial_credit_by_rank_agreement() -> None:
    def order(answer: str) -> float:
        return evaluate_budgeting(PROMPT, answer).checks["roas_order"]

    assert order("Amazon Ads $25k, Walmart Connect $15k, Instacart $10k") == 1.0
    # One of three pairs swapped.
    assert order("Amazon Ads $25k, Walmart Connect $10k, Instacart $15k") == pytest.approx(2 / 3)
    # The two lower ROAS tied: that pair earns half.
    assert order("Amazon Ads $20k, Walmart Connect $15k, Instacart $15k") == pytest.approx(5 / 6)
    assert order("Amazon Ads $10k, Walmart Connect $15k, Instacart $25k") == 0.0


def test_equal_split_is_mediocre_not_bad() -> None:
    answer = (
        "Amazon Ads: $16,666.67 (33.3%)\nWalmart Connect: $16,666.67 (33.3%)\n"
        "Instacart: $16,666.66 (33.3%)"
    )
    evaluation = evaluate_budgeting(PROMPT, answer)
    assert evaluation.checks["roas_order"] == 0.5
    assert evaluation.hard_failures == ()
    assert 0.6 < evaluation.score < 0.9


def test_favouring_the_lowest_roas_is_a_hard_failure() -> None:
    answer = "Amazon Ads: $10,000 (20%)\nWalmart Connect: $15,000 (30%)\nInstacart: $25,000 (50%)"
    evaluation = evaluate_budgeting(PROMPT, answer)
    assert "roas_order" in evaluation.hard_failures
    assert evaluation.score < 0.5


def test_answer_without_allocation_scores_zero() -> None:
    evaluation = evaluate_budgeting(PROMPT, "I would spend it wisely.")
    assert evaluation.score == 0.0
    assert evaluation.reasons == ["no allocation found"]


def test_good_copy_scores_one() -> None:
    evaluation = evaluate_creative(CREATIVE, GOOD_COPY)
    assert evaluation.score == 1.0, evaluation
    assert evaluate_creative(CREATIVE_TEXT, GOOD_COPY) == evaluation


@pytest.mark.parametrize(
    "copy",
    [
        "Sea Salt Crackers: seriously fun, honest ingredients. GUARANTEED to please.",
        "Sea Salt Crackers: seriously fun, honest ingredients. A guarantee of joy.",
        "Sea Salt Crackers: fun and honest. It Cures boredom.",
        "Sea Salt Crackers: fun and honest. America's #1 cracker.",
        "Sea Salt Crackers: fun and honest. The Number One cracker.",
    ],
)
def test_banned_words_are_caught_in_any_case(copy: str) -> None:
    evaluation = evaluate_creative(CREATIVE, copy)
    assert evaluation.checks["compliance"] == 0.0
    assert "compliance" in evaluation.hard_failures
    assert evaluation.score <= 0.5


@pytest.mark.parametrize(
    ("claim", "text", "found"),
    [
        ("cure", "secure your snacks", False),
        ("cure", "curated flavours", False),
        ("#1", "pack #12 of 20", False),
        ("#1", "#1!", True),
        ("risk-free", "try it risk free", True),
        ("100% natural", "100 % natural", True),
        ("100% natural", "100% Natural", True),
        ("FDA approved", "approved by the FDA", True),
        ("clinically proven", "CLINICALLY-PROVEN", True),
    ],
)
def test_claim_patterns(claim: str, text: str, found: bool) -> None:
    assert bool(claim_pattern(claim).search(text)) is found


def test_copy_over_the_limit_is_caught() -> None:
    copy = GOOD_COPY + " " + "Really tasty crackers for every occasion." * 2
    evaluation = evaluate_creative(CREATIVE, copy)
    assert 0 < evaluation.checks["length"] < 1
    assert "length" in evaluation.hard_failures
    assert any("over the limit of 120" in r for r in evaluation.reasons)


def test_voice_needs_each_adjective() -> None:
    half = evaluate_creative(CREATIVE, "Sea Salt Crackers: seriously fun. Try it today.")
    assert half.checks["voice"] == 0.5
    none = evaluate_creative(CREATIVE, "Sea Salt Crackers. Available now. Try it today.")
    assert none.checks["voice"] == 0.0
    assert none.score < half.score < 1.0
    # "fund" is not "fun".
    assert evaluate_creative(CREATIVE, "Fund it.").checks["voice"] == 0.0


def test_off_product_copy_is_marked() -> None:
    evaluation = evaluate_creative(CREATIVE, "Cheap stuff, whatever.")
    assert evaluation.checks["on_product"] == 0.0
    assert evaluation.score < 0.6


def test_empty_copy_scores_zero() -> None:
    assert evaluate_creative(CREATIVE, "   ").score == 0.0


def test_evaluators_registry_takes_plain_strings() -> None:
    assert set(EVALUATORS) == {"retail_media.budgeting", "retail_media.creative"}
    budgeting = EVALUATORS["retail_media.budgeting"]
    creative = EVALUATORS["retail_media.creative"]
    assert budgeting(PROMPT_TEXT, GOOD) == 1.0
    assert budgeting(PROMPT_TEXT, "no idea") == 0.0
    assert creative(CREATIVE_TEXT, GOOD_COPY) == 1.0
    assert creative(CREATIVE_TEXT, "Guaranteed cure!") < 0.5


def test_rewards_are_floats_in_the_unit_interval() -> None:
    rng = random.Random(21)
    for _ in range(200):
        p = budgeting_prompt(rng)
        c = creative_prompt(rng)
        noise = "".join(rng.choice("$%0123456789k ,.|-\nAmazon Walmart") for _ in range(80))
        for reward, prompt in (
            (EVALUATORS["retail_media.budgeting"], p.text),
            (EVALUATORS["retail_media.creative"], c.text),
        ):
            score = reward(prompt, noise)
            assert isinstance(score, float)
            assert 0.0 <= score <= 1.0
            assert not math.isnan(score)


def test_unparseable_prompt_raises() -> None:
    with pytest.raises(ValueError, match="prompt"):
        EVALUATORS["retail_media.budgeting"]("Tell me a joke.", GOOD)
