"""Tests for reading allocations out of hand-written answers in many formats."""

from __future__ import annotations

import pytest

from flywheel.domains.retail_media.allocation import Allocation, parse_allocation
from flywheel.domains.retail_media.quantities import find_quantities

RETAILERS = ["Amazon Ads", "Walmart Connect", "Instacart"]
TOTAL = 50_000.0

BOTH = {
    "Amazon Ads": Allocation("Amazon Ads", 25_000, 50),
    "Walmart Connect": Allocation("Walmart Connect", 15_000, 30),
    "Instacart": Allocation("Instacart", 10_000, 20),
}
AMOUNTS = {k: Allocation(k, v.amount, None) for k, v in BOTH.items()}
PERCENTS = {k: Allocation(k, None, v.percent) for k, v in BOTH.items()}


def parse(answer: str) -> dict[str, Allocation]:
    return parse_allocation(answer, RETAILERS, TOTAL)


@pytest.mark.parametrize(
    "answer",
    [
        "- Amazon Ads: $25,000 (50%)\n- Walmart Connect: $15,000 (30%)\n- Instacart: $10,000 (20%)",
        "* Instacart - 20% - $10,000\n* Amazon Ads - 50% - $25,000\n"
        "* Walmart Connect - 30% - $15,000",
        "1. Amazon Ads → $25k / 50%\n2. Walmart Connect → $15k / 30%\n3. Instacart → $10k / 20%",
        "Amazon Ads gets $25,000 (50%), Walmart Connect $15,000 (30%) and Instacart $10,000 (20%).",
        "Put $25,000 (50%) into Amazon Ads, $15,000 (30%) into Walmart Connect and "
        "$10,000 (20%) into Instacart.",
        "| Retailer | Amount | Share |\n|---|---|---|\n| Amazon Ads | $25,000 | 50% |\n"
        "| Walmart Connect | $15,000 | 30% |\n| Instacart | $10,000 | 20% |",
        "Retailer | Budget ($) | Share (%)\n--- | --- | ---\nAmazon Ads | 25,000 | 50\n"
        "Walmart Connect | 15,000 | 30\nInstacart | 10,000 | 20",
        "**Amazon Ads**\n  Amount: $25,000\n  Share: 50%\n\n**Walmart Connect**\n  Amount: "
        "$15,000\n  Share: 30%\n\n**Instacart**\n  Amount: $10,000\n  Share: 20%",
        "AMAZON ADS: 25000 USD (50 percent)\nwalmart connect: 15,000 dollars (30 percent)\n"
        "InstaCart: 10k USD (20 percent)",
    ],
    ids=[
        "bullets",
        "bullets-percent-first",
        "numbered-arrows-k",
        "sentence-name-first",
        "sentence-value-first",
        "markdown-table",
        "bare-table-units-in-header",
        "headings",
        "mixed-case-usd-percent-words",
    ],
)
def test_amounts_and_percentages_in_many_formats(answer: str) -> None:
    assert parse(answer) == BOTH


@pytest.mark.parametrize(
    "answer",
    [
        "Amazon Ads: $25,000\nWalmart Connect: $15,000\nInstacart: $10,000",
        "Amazon Ads 25k, Walmart Connect 15K, Instacart 10 thousand",
        "| Retailer | Spend |\n|---|---|\n| Amazon Ads | $25,000 |\n| Walmart Connect | "
        "$15,000 |\n| Instacart | $10,000 |",
    ],
    ids=["lines", "k-suffix", "table"],
)
def test_amounts_only(answer: str) -> None:
    assert parse(answer) == AMOUNTS


@pytest.mark.parametrize(
    "answer",
    [
        "Amazon Ads: 50%\nWalmart Connect: 30%\nInstacart: 20%",
        "Give 50% to Amazon Ads, 30% to Walmart Connect and 20% to Instacart.",
    ],
    ids=["lines", "value-first"],
)
def test_percentages_only(answer: str) -> None:
    assert parse(answer) == PERCENTS


def test_decimal_thousands_suffix() -> None:
    parsed = parse_allocation(
        "Amazon Ads: 12.5k\nInstacart: $7.5K", ["Amazon Ads", "Instacart"], 20_000
    )
    assert parsed["Amazon Ads"].amount == 12_500
    assert parsed["Instacart"].amount == 7_500


def test_extra_text_roas_figures_and_total_lines_are_ignored() -> None:
    answer = (
        "Here is my plan for the $50,000 budget.\n"
        "Amazon Ads has the best ROAS (4.2), Instacart the worst (2.5).\n\n"
        "- Amazon Ads: $25,000 (50%)\n"
        "- Walmart Connect: $15,000 (30%)\n"
        "- Instacart: $10,000 (20%)\n"
        "Total: $50,000 (100%)\n\n"
        "Amazon Ads returns $4.20 for every $1 spent, so it leads."
    )
    assert parse(answer) == BOTH


def test_budget_restated_on_an_allocation_line() -> None:
    answer = "Of the $50,000, Amazon Ads gets $25,000 (50%) and Walmart Connect $15,000 (30%)."
    parsed = parse(answer)
    assert parsed["Amazon Ads"] == BOTH["Amazon Ads"]
    assert parsed["Walmart Connect"] == BOTH["Walmart Connect"]


def test_aliases_are_matched_case_insensitively() -> None:
    answer = "walmart: $15,000\nAMAZON: $25,000\nInstacart ads: $10,000"
    assert parse(answer) == AMOUNTS


def test_retailers_never_mentioned_are_absent() -> None:
    parsed = parse("Amazon Ads: $30,000 (60%)\nWalmart Connect: $20,000 (40%)")
    assert set(parsed) == {"Amazon Ads", "Walmart Connect"}


def test_no_figures_gives_nothing() -> None:
    assert parse("Spend most on Amazon Ads and a little on Instacart.") == {}
    assert parse("") == {}


def test_unknown_retailer_names_from_a_prompt_are_matched_by_name() -> None:
    parsed = parse_allocation(
        "Acme Network: $600\nOther Shop: $400", ["Acme Network", "Other Shop"]
    )
    assert parsed == {
        "Acme Network": Allocation("Acme Network", 600, None),
        "Other Shop": Allocation("Other Shop", 400, None),
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$12,500", [("amount", 12_500)]),
        ("12500 USD", [("amount", 12_500)]),
        ("12.5k", [("amount", 12_500)]),
        ("US$ 1.2M", [("amount", 1_200_000)]),
        ("$3 million", [("amount", 3_000_000)]),
        ("40%", [("percent", 40)]),
        ("33.3 percent", [("percent", 33.3)]),
        ("ROAS 4.2 across 3 retailers", []),
        ("$20,000 more", [("amount", 20_000)]),
    ],
)
def test_quantities(text: str, expected: list[tuple[str, float]]) -> None:
    assert [(q.kind, q.value) for q in find_quantities(text)] == expected
