"""Seeded prompt generators, and parsers that read a prompt's facts back from its text.

A reward function in online RL sees only the prompt text, so every template here has
a matching regular expression built from the same format string: what
``budgeting_prompt`` writes, ``parse_budgeting_prompt`` reads back exactly. Prompt texts
that no template produced (a person typing into the rater UI) go through a looser
parser that finds what it can.
"""

from __future__ import annotations

import itertools
import random
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

from flywheel.domains.retail_media.catalog import BANNED_CLAIMS, CATEGORIES, VOICES
from flywheel.domains.retail_media.quantities import parse_amount


@dataclass(frozen=True, slots=True)
class Retailer:
    """A retail media network offered in a budgeting prompt, with its stated ROAS."""

    name: str
    roas: float


@dataclass(frozen=True, slots=True)
class BudgetingPrompt:
    """Split ``total`` dollars for ``brand`` across ``retailers``; ``text`` says so."""

    brand: str
    total: int
    retailers: tuple[Retailer, ...]
    text: str


@dataclass(frozen=True, slots=True)
class CreativePrompt:
    """Write copy for ``product`` in ``voice``, without ``banned``, in ``max_chars``."""

    brand: str
    product: str
    retailer: str
    voice: tuple[str, ...]
    banned: tuple[str, ...]
    max_chars: int
    text: str


BUDGETING_TEMPLATES: tuple[str, ...] = (
    "Allocate {total} for {brand} across {retailers}. Give each retailer's amount and percentage.",
    "You manage retail media for {brand}, which has {total} to spend. "
    "Split it across {retailers}. State each retailer's dollar amount and share of the budget.",
    "Split a {total} budget for {brand} between {retailers}. "
    "For each retailer, give the amount and the percentage.",
    "Budget: {total}. Brand: {brand}. Retail media networks: {retailers}. "
    "Allocate the budget and give each network's amount and percentage.",
)

CREATIVE_TEMPLATES: tuple[str, ...] = (
    "Write ad copy for {product} by {brand} on {retailer}. Brand voice: {voice}. "
    "Do not use these words or claims: {banned}. Keep it to at most {max_chars} characters.",
    "Write a sponsored product ad on {retailer} for {product} by {brand}. "
    "The voice is {voice}. Never say {banned}. Maximum length: {max_chars} characters.",
    "Ad copy request. Brand: {brand}. Product: {product}. Retailer: {retailer}. "
    "Voice: {voice}. Banned words and claims: {banned}. Limit: {max_chars} characters.",
)

# What each placeholder may match when a template is read back. Names are matched
# lazily, so the literal text around them decides where they end.
_FIELD_PATTERNS = {
    "total": r"\$(?P<total>\d{1,3}(?:,\d{3})*)",
    "brand": r"(?P<brand>.+?)",
    "retailers": r"(?P<retailers>.+?)",
    "product": r"(?P<product>.+?)",
    "retailer": r"(?P<retailer>.+?)",
    "voice": r"(?P<voice>[a-z]+(?:(?:, | and )[a-z]+)*)",
    "banned": r"(?P<banned>\"[^\"]+\"(?:(?:, | and | or )\"[^\"]+\")*)",
    "max_chars": r"(?P<max_chars>\d+)",
}

_ROAS_ITEM = re.compile(r"(?:^|, | and )(?P<name>.+?) \(ROAS (?P<roas>\d+(?:\.\d+)?)\)")
_QUOTED = re.compile(r"\"([^\"]+)\"")


def _template_regex(template: str) -> re.Pattern[str]:
    parts: list[str] = []
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field is not None:
            parts.append(_FIELD_PATTERNS[field])
    return re.compile("".join(parts))


_VOICE_NAMES = tuple(VOICES)
_BUDGETING_REGEXES = tuple(_template_regex(t) for t in BUDGETING_TEMPLATES)
_CREATIVE_REGEXES = tuple(_template_regex(t) for t in CREATIVE_TEMPLATES)


def join_names(items: Sequence[str], last: str = "and") -> str:
    """``a``, ``a and b``, ``a, b and c``: the English list every template uses."""
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} {last} {items[-1]}"


def _split_names(text: str) -> tuple[str, ...]:
    return tuple(p for p in re.split(r", | and | or ", text) if p)


def _format_roas_list(retailers: Sequence[Retailer]) -> str:
    return join_names([f"{r.name} (ROAS {r.roas:.1f})" for r in retailers])


def _distinct_roas(rng: random.Random, k: int) -> list[float]:
    # At least 0.2 apart: a "higher ROAS gets more" check means little between 3.0 and 3.1.
    while True:
        tenths = sorted(rng.sample(range(10, 61), k))
        if all(b - a >= 2 for a, b in itertools.pairwise(tenths)):
            rng.shuffle(tenths)
            return [t / 10 for t in tenths]


def budgeting_prompt(rng: random.Random) -> BudgetingPrompt:
    """A random budget split request: 2-4 retailers of one category, distinct ROAS."""
    category = rng.choice(CATEGORIES)
    brand = rng.choice(category.brands)
    k = rng.randint(2, 4)
    names = rng.sample(category.retailers, k)
    retailers = tuple(Retailer(n, r) for n, r in zip(names, _distinct_roas(rng, k), strict=True))
    total = rng.choice((500, 1000, 2500, 5000)) * rng.randint(4, 60)
    text = rng.choice(BUDGETING_TEMPLATES).format(
        total=f"${total:,}", brand=brand, retailers=_format_roas_list(retailers)
    )
    return BudgetingPrompt(brand, total, retailers, text)


def creative_prompt(rng: random.Random) -> CreativePrompt:
    """A random ad copy request: 2-3 voice adjectives, 2-4 banned claims, a length limit."""
    category = rng.choice(CATEGORIES)
    brand = rng.choice(category.brands)
    product = rng.choice(category.products)
    retailer = rng.choice(category.retailers)
    voice = tuple(rng.sample(_VOICE_NAMES, rng.randint(2, 3)))
    banned = tuple(rng.sample(BANNED_CLAIMS, rng.randint(2, 4)))
    max_chars = rng.choice((100, 120, 150, 200))
    template = rng.choice(CREATIVE_TEMPLATES)
    text = template.format(
        brand=brand,
        product=product,
        retailer=retailer,
        voice=join_names(voice),
        banned=join_names([f'"{b}"' for b in banned], last="or" if "Never" in template else "and"),
        max_chars=max_chars,
    )
    return CreativePrompt(brand, product, retailer, voice, banned, max_chars, text)


def _parse_roas_list(text: str) -> tuple[Retailer, ...] | None:
    retailers = tuple(
        Retailer(m.group("name"), float(m.group("roas"))) for m in _ROAS_ITEM.finditer(text)
    )
    # Only a list that reads back to exactly the same text was parsed correctly.
    return retailers if retailers and _format_roas_list(retailers) == text else None


# Looser reading for prompts typed by people: "(ROAS 4.2)", "(ROAS: 4.2x)", "(4.2x ROAS)".
_LOOSE_ROAS = re.compile(
    r"\(\s*(?:ROAS\s*[:=]?\s*(?P<a>\d+(?:\.\d+)?)\s*x?|(?P<b>\d+(?:\.\d+)?)\s*x?\s+ROAS)\s*\)",
    re.IGNORECASE,
)
_NAME_DELIMITER = re.compile(
    r",|;|:|\n|\.\s|\s(?:and|across|between|among|on|to|in)\s", re.IGNORECASE
)


def _loose_budgeting(text: str) -> BudgetingPrompt | None:
    retailers: list[Retailer] = []
    previous_end = 0
    first_start: int | None = None
    for m in _LOOSE_ROAS.finditer(text):
        head = text[previous_end : m.start()]
        name = _NAME_DELIMITER.split(head)[-1].strip(" -*•\t")
        previous_end = m.end()
        if first_start is None:
            first_start = m.start()
        if name:
            retailers.append(Retailer(name, float(m.group("a") or m.group("b"))))
    if not retailers:
        return None
    # The budget is the first amount before the list (or anywhere, if none precedes it).
    total = parse_amount(text[:first_start]) or parse_amount(text)
    if total is None or round(total) <= 0:
        return None
    return BudgetingPrompt("", round(total), tuple(retailers), text)


def parse_budgeting_prompt(text: str) -> BudgetingPrompt:
    """The budgeting prompt ``text`` states; raises ``ValueError`` when it states none.

    Text produced by ``budgeting_prompt`` (also inside a chat template) reads back to an
    equal ``BudgetingPrompt``; other text gets a best-effort reading with no brand.
    """
    for regex in _BUDGETING_REGEXES:
        m = regex.search(text)
        if m is None:
            continue
        retailers = _parse_roas_list(m.group("retailers"))
        if retailers is not None:
            total = int(m.group("total").replace(",", ""))
            return BudgetingPrompt(m.group("brand"), total, retailers, text)
    loose = _loose_budgeting(text)
    if loose is None:
        raise ValueError("no budget and retailers with ROAS found in the prompt")
    return loose


_LOOSE_VOICE = re.compile(
    r"voice(?: is|:)\s*(?P<v>[a-z]+(?:(?:,\s*|\s+and\s+)[a-z]+)*)", re.IGNORECASE
)
_LOOSE_BANNED = re.compile(
    r"(?:do not use|don't use|never say|avoid|banned|forbidden)[^\"\n]*?:?\s*"
    r"(?P<b>\"[^\"]+\"(?:(?:,\s*|\s+and\s+|\s+or\s+)\"[^\"]+\")*)",
    re.IGNORECASE,
)
_LOOSE_LIMIT = re.compile(r"(?P<n>\d+)\s*(?:characters|chars)", re.IGNORECASE)


def _loose_creative(text: str) -> CreativePrompt | None:
    limit = _LOOSE_LIMIT.search(text)
    if limit is None:
        return None
    voice = _LOOSE_VOICE.search(text)
    banned = _LOOSE_BANNED.search(text)
    return CreativePrompt(
        brand="",
        product="",
        retailer="",
        voice=tuple(re.split(r",\s*|\s+and\s+", voice.group("v").lower())) if voice else (),
        banned=tuple(_QUOTED.findall(banned.group("b"))) if banned else (),
        max_chars=int(limit.group("n")),
        text=text,
    )


def parse_creative_prompt(text: str) -> CreativePrompt:
    """The creative brief ``text`` states; raises ``ValueError`` when it has no length limit.

    Text produced by ``creative_prompt`` reads back to an equal ``CreativePrompt``; other
    text gets a best-effort reading (voice, quoted banned terms, "N characters").
    """
    for regex in _CREATIVE_REGEXES:
        m = regex.search(text)
        if m is not None:
            return CreativePrompt(
                brand=m.group("brand"),
                product=m.group("product"),
                retailer=m.group("retailer"),
                voice=_split_names(m.group("voice")),
                banned=tuple(_QUOTED.findall(m.group("banned"))),
                max_chars=int(m.group("max_chars")),
                text=text,
            )
    loose = _loose_creative(text)
    if loose is None:
        raise ValueError("no length limit found in the creative prompt")
    return loose
