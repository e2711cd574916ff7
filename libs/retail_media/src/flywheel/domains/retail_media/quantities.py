"""Dollar amounts and percentages as people write them, found in free text.

Shared by the allocation parser (answers) and the prompt parser (prompt texts), so
"$12,500", "12500 USD", "12.5k" and "$1.2M" mean the same thing on both sides.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

_NUMBER = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
_SCALE = r"k|K|m|M|mm|MM|thousand|million"

# Bare numbers are never money: a ROAS of 4.2 or "3 retailers" must not read as dollars,
# so an amount needs a currency sign, a currency word, or a thousands/millions suffix.
_AMOUNT = re.compile(
    rf"""
    (?:US)?\$\s?(?P<n1>{_NUMBER})(?:\s?(?P<s1>{_SCALE})(?![A-Za-z]))?
    | (?P<n2>{_NUMBER})\s?(?:(?P<s2>{_SCALE})\s?)?(?:USD|dollars)(?![A-Za-z])
    | (?P<n3>{_NUMBER})\s?(?P<s3>k|K|thousand)(?![A-Za-z])
    """,
    re.VERBOSE,
)
_PERCENT = re.compile(rf"(?P<n>{_NUMBER})\s?(?:%|percent(?![A-Za-z])|per\s?cent(?![A-Za-z]))")
_MULTIPLIER = {"k": 1e3, "thousand": 1e3, "m": 1e6, "mm": 1e6, "million": 1e6}

# Either kind, leftmost first; a percentage is tried first so "40%" is never "40" dollars.
_QUANTITY = re.compile(
    rf"(?P<percent>{_PERCENT.pattern})|(?P<amount>{_AMOUNT.pattern})",
    re.VERBOSE,
)


@dataclass(frozen=True, slots=True)
class Quantity:
    """A dollar amount or a percentage, with where it was found."""

    kind: Literal["amount", "percent"]
    value: float
    start: int
    end: int


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def _amount_value(match: re.Match[str]) -> float:
    for i in ("1", "2", "3"):
        number = match.group(f"n{i}")
        if number is not None:
            scale = match.group(f"s{i}")
            return _number(number) * (_MULTIPLIER[scale.lower()] if scale else 1.0)
    raise AssertionError("the amount pattern always captures a number")


def find_quantities(text: str) -> list[Quantity]:
    """Every dollar amount and percentage in ``text``, in reading order."""
    found: list[Quantity] = []
    for m in _QUANTITY.finditer(text):
        if m.group("percent") is not None:
            found.append(Quantity("percent", _number(m.group("n")), m.start(), m.end()))
        else:
            found.append(Quantity("amount", _amount_value(m), m.start(), m.end()))
    return found


def parse_amount(text: str) -> float | None:
    """The first dollar amount in ``text``, or ``None``."""
    m = _AMOUNT.search(text)
    return _amount_value(m) if m else None


def parse_bare_number(text: str) -> float | None:
    """A cell such as "12,500" or "40" that holds only a number (tables omit units)."""
    m = re.fullmatch(rf"\s*\$?\s*({_NUMBER})\s*%?\s*", text)
    return _number(m.group(1)) if m else None


def format_amount(value: float) -> str:
    """``$12,500`` (whole dollars) or ``$12,500.50``."""
    return f"${value:,.0f}" if float(value).is_integer() else f"${value:,.2f}"


def format_percent(value: float) -> str:
    """``40%`` or ``33.3%``: one decimal at most, none when it is whole."""
    rounded = round(value, 1)
    return f"{rounded:.0f}%" if rounded.is_integer() else f"{rounded:.1f}%"
