"""Tests for the prompt generators and the parsers that read prompt texts back."""

from __future__ import annotations

import itertools
import random

import pytest

from flywheel.domains.retail_media.catalog import BANNED_CLAIMS, VOICES
from flywheel.domains.retail_media.prompts import (
    BudgetingPrompt,
    CreativePrompt,
    Retailer,
    budgeting_prompt,
    creative_prompt,
    parse_budgeting_prompt,
    parse_creative_prompt,
)


def test_budgeting_prompt_is_deterministic_for_a_seed() -> None:
    a = [budgeting_prompt(random.Random(s)) for s in range(50)]
    b = [budgeting_prompt(random.Random(s)) for s in range(50)]
    assert a == b
    assert len({p.text for p in a}) > 40


def test_creative_prompt_is_deterministic_for_a_seed() -> None:
    a = [creative_prompt(random.Random(s)) for s in range(50)]
    b = [creative_prompt(random.Random(s)) for s in range(50)]
    assert a == b
    assert len({p.text for p in a}) > 40


def test_budgeting_prompt_states_budget_and_each_retailer_with_roas() -> None:
    rng = random.Random(7)
    for _ in range(300):
        p = budgeting_prompt(rng)
        assert 2 <= len(p.retailers) <= 4
        assert len({r.name for r in p.retailers}) == len(p.retailers)
        roas = sorted(r.roas for r in p.retailers)
        assert all(b - a >= 0.2 - 1e-9 for a, b in itertools.pairwise(roas))
        assert p.total > 0
        assert f"${p.total:,}" in p.text
        assert p.brand in p.text
        for r in p.retailers:
            assert f"{r.name} (ROAS {r.roas:.1f})" in p.text


def test_creative_prompt_fields() -> None:
    rng = random.Random(8)
    for _ in range(300):
        p = creative_prompt(rng)
        assert 2 <= len(p.voice) <= 3
        assert set(p.voice) <= set(VOICES)
        assert 2 <= len(p.banned) <= 4
        assert set(p.banned) <= set(BANNED_CLAIMS)
        assert p.max_chars >= 100
        for item in (p.brand, p.product, p.retailer, str(p.max_chars), *p.voice):
            assert item in p.text
        for claim in p.banned:
            assert f'"{claim}"' in p.text


def test_budgeting_prompt_text_round_trips() -> None:
    rng = random.Random(11)
    for _ in range(3000):
        p = budgeting_prompt(rng)
        assert parse_budgeting_prompt(p.text) == p


def test_creative_prompt_text_round_trips() -> None:
    rng = random.Random(12)
    for _ in range(3000):
        p = creative_prompt(rng)
        assert parse_creative_prompt(p.text) == p


def test_prompt_inside_a_chat_template_still_parses() -> None:
    p = budgeting_prompt(random.Random(3))
    wrapped = f"<|system|>You are a media planner.\n<|user|>{p.text}\n<|assistant|>"
    parsed = parse_budgeting_prompt(wrapped)
    assert (parsed.brand, parsed.total, parsed.retailers) == (p.brand, p.total, p.retailers)

    c = creative_prompt(random.Random(3))
    parsed_c = parse_creative_prompt(f"<|user|>{c.text}<|assistant|>")
    assert (parsed_c.voice, parsed_c.banned, parsed_c.max_chars) == (c.voice, c.banned, c.max_chars)


def test_hand_written_budgeting_prompt_gets_a_best_effort_reading() -> None:
    text = (
        "We have $10k this quarter. Split it between Amazon Ads (ROAS: 4.5x), "
        "Walmart Connect (3x ROAS) and Instacart (ROAS 2.0)."
    )
    parsed = parse_budgeting_prompt(text)
    assert parsed.total == 10_000
    assert parsed.retailers == (
        Retailer("Amazon Ads", 4.5),
        Retailer("Walmart Connect", 3.0),
        Retailer("Instacart", 2.0),
    )


def test_hand_written_creative_prompt_gets_a_best_effort_reading() -> None:
    text = 'Short ad please. Voice: Playful and Warm. Avoid "miracle" and "cure". 90 characters.'
    parsed = parse_creative_prompt(text)
    assert parsed.voice == ("playful", "warm")
    assert parsed.banned == ("miracle", "cure")
    assert parsed.max_chars == 90


@pytest.mark.parametrize("text", ["", "Write a poem about the sea.", "Split the budget fairly."])
def test_prompt_without_the_facts_raises_value_error(text: str) -> None:
    with pytest.raises(ValueError, match="prompt"):
        parse_budgeting_prompt(text)
    with pytest.raises(ValueError, match="prompt"):
        parse_creative_prompt(text)


def test_dataclasses_are_frozen() -> None:
    p = budgeting_prompt(random.Random(0))
    c = creative_prompt(random.Random(0))
    assert isinstance(p, BudgetingPrompt)
    assert isinstance(c, CreativePrompt)
    with pytest.raises(AttributeError):
        p.total = 1  # type: ignore[misc]
