"""Read a budget allocation (per retailer: an amount and/or a percentage) out of free text.

Models and people write allocations as bullet lists, tables, sentences ("Put $20,000
(40%) into Amazon Ads, ..."), or a heading per retailer with its figures below. The
parser works line by line:

- a line that names one retailer gives it every figure on the line;
- a line that names several reads in the direction the line starts with: figures after
  a name belong to it ("Amazon Ads: $20k, Walmart Connect: $10k"), figures before a name
  belong to the next name ("$20k to Amazon Ads and $10k to Walmart Connect");
- a line that names a retailer and no figure opens a block: figure-only lines below it
  (until the next named retailer) are its figures;
- table rows take unit-less numbers from columns whose header says "$"/"amount" or
  "%"/"share";
- lines that start with "Total" are skipped, and a figure equal to the whole budget (or
  100%) is used for a retailer only when nothing else is stated for it.

The first figure of each kind stated for a retailer wins, because allocations come
before the rationale that may quote other numbers.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

from flywheel.domains.retail_media.catalog import RETAILERS
from flywheel.domains.retail_media.quantities import Quantity, find_quantities, parse_bare_number

Kind = Literal["amount", "percent"]


@dataclass(frozen=True, slots=True)
class Allocation:
    """What an answer gives one retailer; either figure may be missing."""

    retailer: str
    amount: float | None = None
    percent: float | None = None


@dataclass(slots=True)
class _Candidates:
    amount: list[float] = field(default_factory=list)
    percent: list[float] = field(default_factory=list)

    def add(self, kind: Kind, value: float) -> None:
        (self.amount if kind == "amount" else self.percent).append(value)


@dataclass(frozen=True, slots=True)
class _Mention:
    retailer: str
    start: int
    end: int


_TOTAL_LINE = re.compile(r"^[\s|*_#>\-•]*(?:grand\s+)?(?:total|sum|overall)\b", re.IGNORECASE)
_SEPARATOR_ROW = re.compile(r"^[\s|:\-+]+$")
_AMOUNT_HEADER = re.compile(r"\$|amount|budget|spend|usd|dollar", re.IGNORECASE)
_PERCENT_HEADER = re.compile(r"%|percent|share|pct|portion", re.IGNORECASE)


@lru_cache(maxsize=1024)
def _mention_regex(retailers: tuple[str, ...]) -> tuple[re.Pattern[str], dict[str, str]]:
    by_alias: dict[str, str] = {}
    for name in retailers:
        info = RETAILERS.get(name)
        for alias in (name, *(info.aliases if info else ())):
            # A short alias shared by two offered retailers would be ambiguous: drop it.
            key = alias.lower()
            if key in by_alias and by_alias[key] != name:
                by_alias[key] = ""
            else:
                by_alias.setdefault(key, name)
    by_alias = {k: v for k, v in by_alias.items() if v}
    # Longest first, so "Target Roundel" wins over its alias "Target".
    aliases = sorted(by_alias, key=len, reverse=True)
    pattern = "|".join(re.escape(a) for a in aliases)
    return re.compile(rf"(?<![\w])(?:{pattern})(?![\w])", re.IGNORECASE), by_alias


def _mentions(line: str, regex: re.Pattern[str], by_alias: dict[str, str]) -> list[_Mention]:
    found: list[_Mention] = []
    for m in regex.finditer(line):
        retailer = by_alias[m.group(0).lower()]
        # "Amazon Ads (Amazon)" is one mention, not two.
        if found and found[-1].retailer == retailer:
            continue
        found.append(_Mention(retailer, m.start(), m.end()))
    return found


def _cells(line: str) -> Iterator[tuple[int, str]]:
    """Each ``|``-separated cell of a table row with its offset in the line."""
    offset = 0
    for cell in line.split("|"):
        yield offset, cell
        offset += len(cell) + 1


def _column_kinds(line: str) -> list[Kind | None]:
    kinds: list[Kind | None] = []
    for _, cell in _cells(line):
        if _PERCENT_HEADER.search(cell):
            kinds.append("percent")
        elif _AMOUNT_HEADER.search(cell):
            kinds.append("amount")
        else:
            kinds.append(None)
    return kinds


def _table_quantities(line: str, kinds: list[Kind | None]) -> list[Quantity]:
    """Figures in a table row, unit-less ones typed by their column's header."""
    found: list[Quantity] = []
    for i, (offset, cell) in enumerate(_cells(line)):
        explicit = find_quantities(cell)
        if explicit:
            found.extend(
                Quantity(q.kind, q.value, offset + q.start, offset + q.end) for q in explicit
            )
            continue
        kind = kinds[i] if i < len(kinds) else None
        value = parse_bare_number(cell)
        if kind is not None and value is not None:
            found.append(Quantity(kind, value, offset, offset + len(cell)))
    return found


def _is_whole(q: Quantity, total: float | None) -> bool:
    """Whether ``q`` states the whole budget rather than one retailer's part of it."""
    if q.kind == "percent":
        return abs(q.value - 100.0) < 1e-9
    return total is not None and abs(q.value - total) <= 0.005 * total


def _assign_line(
    mentions: list[_Mention], quantities: list[Quantity], total: float | None
) -> Iterator[tuple[str, Quantity]]:
    """Pair each figure on a line that names retailers with the retailer it belongs to."""
    if len({m.retailer for m in mentions}) == 1:
        for q in quantities:
            yield mentions[0].retailer, q
        return
    # With several retailers on a line, a whole-budget figure is the budget being split.
    parts = [q for q in quantities if not _is_whole(q, total)]
    value_first = bool(parts) and parts[0].start < mentions[0].start
    for q in parts:
        if value_first:
            following = [m for m in mentions if m.start >= q.end]
            owner = following[0] if following else mentions[-1]
        else:
            preceding = [m for m in mentions if m.end <= q.start]
            owner = preceding[-1] if preceding else mentions[0]
        yield owner.retailer, q


def _choose(values: list[float], whole: float | None) -> float | None:
    for v in values:
        if whole is None or abs(v - whole) > 0.005 * whole:
            return v
    return values[0] if values else None


def parse_allocation(
    answer: str, retailers: Sequence[str], total: float | None = None
) -> dict[str, Allocation]:
    """Each of ``retailers`` that ``answer`` gives an amount or a percentage to.

    Retailers are matched case-insensitively by name or a known alias ("Walmart" for
    "Walmart Connect"). ``total`` (the budget) tells a figure that restates the budget
    from a retailer's share of it. Retailers given nothing are absent from the result.
    """
    if not retailers:
        return {}
    regex, by_alias = _mention_regex(tuple(retailers))
    candidates: dict[str, _Candidates] = {}
    column_kinds: list[Kind | None] | None = None
    heading: str | None = None

    for raw in answer.replace("\u2019", "'").splitlines():
        line = raw.strip()
        is_table_row = line.count("|") >= 2 or (line.startswith("|") and line.count("|") >= 1)
        if not is_table_row:
            column_kinds = None
        if not line or _TOTAL_LINE.match(line) or _SEPARATOR_ROW.match(line):
            continue
        mentions = _mentions(line, regex, by_alias)
        if is_table_row and not mentions and column_kinds is None:
            column_kinds = _column_kinds(line)
            continue
        quantities = (
            _table_quantities(line, column_kinds)
            if is_table_row and column_kinds is not None
            else find_quantities(line)
        )
        if not mentions:
            if heading is not None:
                for q in quantities:
                    if not _is_whole(q, total):
                        candidates.setdefault(heading, _Candidates()).add(q.kind, q.value)
            continue
        heading = mentions[0].retailer if len(mentions) == 1 and not quantities else None
        for retailer, q in _assign_line(mentions, quantities, total):
            candidates.setdefault(retailer, _Candidates()).add(q.kind, q.value)

    result: dict[str, Allocation] = {}
    for name in retailers:
        c = candidates.get(name)
        if c is None:
            continue
        amount = _choose(c.amount, total)
        percent = _choose(c.percent, 100.0)
        if amount is not None or percent is not None:
            result[name] = Allocation(name, amount, percent)
    return result
