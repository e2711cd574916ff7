"""The vocabulary of the synthetic retail-media world: brands, products, retailers, voices.

Everything here is fictional brands on real retail media networks. Generators draw from
these tables and evaluators read them back (retailer aliases, voice lexicons), so the two
sides can never drift apart. Every table is a tuple or a dict built from literals, so
iteration order, and with it every seeded draw, is the same in every process.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetailerInfo:
    """A retail media network: its usual name and the short names people also write."""

    name: str
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Category:
    """A product category: brands selling in it, their products, where they advertise."""

    name: str
    brands: tuple[str, ...]
    products: tuple[str, ...]
    retailers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Voice:
    """A brand-voice adjective, the words that show it, and phrases that use those words."""

    adjective: str
    lexicon: tuple[str, ...]
    phrases: tuple[str, ...]


RETAILERS: dict[str, RetailerInfo] = {
    r.name: r
    for r in (
        RetailerInfo("Amazon Ads", ("Amazon",)),
        RetailerInfo("Walmart Connect", ("Walmart",)),
        RetailerInfo("Target Roundel", ("Roundel", "Target")),
        RetailerInfo("Instacart", ("Instacart Ads",)),
        RetailerInfo("Kroger Precision Marketing", ("Kroger", "KPM")),
        RetailerInfo("Best Buy Ads", ("Best Buy",)),
        RetailerInfo("Albertsons Media Collective", ("Albertsons",)),
        RetailerInfo("Walgreens Advertising Group", ("Walgreens",)),
        RetailerInfo("Ulta UB Media", ("UB Media", "Ulta")),
        RetailerInfo("Chewy Ads", ("Chewy",)),
        RetailerInfo("Dick's Media Network", ("Dick's",)),
    )
}

_GENERALISTS = ("Amazon Ads", "Walmart Connect", "Target Roundel")
_GROCERY = (*_GENERALISTS, "Instacart", "Kroger Precision Marketing", "Albertsons Media Collective")

# Brand and product names avoid ",", " and ", " by ", " on ", "(" and "$": prompt texts
# are parsed back by those separators (prompts.py).
CATEGORIES: tuple[Category, ...] = (
    Category(
        "snacks",
        ("Acme Snacks", "Crunchwell", "Golden Orchard"),
        ("Sea Salt Crackers", "Honey Oat Bars", "Spicy Lime Tortilla Chips", "Dark Cocoa Almonds"),
        _GROCERY,
    ),
    Category(
        "beverages",
        ("Northwind Coffee", "Brightwater Tea"),
        ("Cold Brew Concentrate", "Morning Blend Whole Beans", "Sparkling Green Tea"),
        _GROCERY,
    ),
    Category(
        "beauty",
        ("Lumen Skincare", "Velvet Bloom"),
        ("Vitamin C Serum", "Daily Moisturizer SPF 30", "Overnight Repair Cream"),
        (*_GENERALISTS, "Ulta UB Media", "Walgreens Advertising Group"),
    ),
    Category(
        "pet",
        ("Harbor Pet Supply", "Tailwise"),
        ("Grain-Free Salmon Kibble", "Dental Chew Sticks", "Calming Cat Treats"),
        (*_GENERALISTS, "Chewy Ads", "Instacart", "Kroger Precision Marketing"),
    ),
    Category(
        "baby",
        ("Bluebird Baby", "Little Fern"),
        ("Sensitive Baby Wipes", "Organic Puffs", "Overnight Diapers"),
        (*_GENERALISTS, "Walgreens Advertising Group", "Instacart", "Kroger Precision Marketing"),
    ),
    Category(
        "outdoor",
        ("Summit Outdoor", "Ridgeline Gear"),
        ("Trail Running Shoes", "Insulated Water Bottle", "Ultralight Tent"),
        (*_GENERALISTS, "Dick's Media Network"),
    ),
    Category(
        "electronics",
        ("Voltline Audio", "Pixelforge"),
        ("Wireless Earbuds", "Portable Speaker", "Noise-Cancelling Headphones"),
        (*_GENERALISTS, "Best Buy Ads"),
    ),
    Category(
        "home",
        ("Fresh Hearth Home", "Cleanly"),
        ("Lavender Dish Soap", "Multi-Surface Cleaner", "Wool Dryer Balls"),
        (*_GENERALISTS, "Instacart", "Kroger Precision Marketing", "Albertsons Media Collective"),
    ),
)

# Each lexicon word belongs to one voice only, so one phrase never counts for two voices.
VOICES: dict[str, Voice] = {
    v.adjective: v
    for v in (
        Voice(
            "playful",
            ("playful", "fun", "joy"),
            ("seriously fun", "a little joy every day", "made for playful moments"),
        ),
        Voice(
            "bold",
            ("bold", "fearless", "daring"),
            ("bold by design", "made for the fearless", "daring from the first try"),
        ),
        Voice(
            "warm",
            ("warm", "cozy", "welcome"),
            ("cozy comfort", "a warm welcome home", "cozy moments made easy"),
        ),
        Voice(
            "premium",
            ("premium", "crafted", "refined"),
            ("premium quality", "crafted with care", "refined down to the details"),
        ),
        Voice(
            "wholesome",
            ("wholesome", "honest", "goodness"),
            ("honest ingredients", "real goodness", "wholesome through and through"),
        ),
        Voice(
            "energetic",
            ("energetic", "energy", "lively"),
            ("full of energy", "lively from the start", "energy for your day"),
        ),
        Voice(
            "calm",
            ("calm", "gentle", "soothing"),
            ("gentle by nature", "calm in every use", "soothing from the start"),
        ),
        Voice(
            "trustworthy",
            ("trusted", "reliable", "dependable"),
            ("trusted by families", "reliable every time", "dependable quality"),
        ),
        Voice(
            "sustainable",
            ("sustainable", "planet", "recycled"),
            ("kinder to the planet", "in recycled packaging", "sustainable by design"),
        ),
        Voice(
            "witty",
            ("witty", "clever", "smart"),
            ("clever for a reason", "the smart pick", "witty and worth it"),
        ),
    )
}

# Claims an advertiser may not make. Prompts pick a few of these per brief.
BANNED_CLAIMS: tuple[str, ...] = (
    "cure",
    "guaranteed",
    "#1",
    "clinically proven",
    "miracle",
    "risk-free",
    "100% natural",
    "FDA approved",
    "best in the world",
    "instant results",
)

# Other ways of writing a banned claim that a compliance check must also catch.
CLAIM_VARIANTS: dict[str, tuple[str, ...]] = {
    "#1": ("number one", "no. 1", "no.1"),
    "FDA approved": ("FDA-approved", "approved by the FDA"),
}

# Words that clash with any brand voice the prompts ask for: off-brand copy uses them.
OFF_BRAND_WORDS: tuple[str, ...] = ("cheap", "boring", "whatever", "meh", "basic", "stuff")

CALLS_TO_ACTION: tuple[str, ...] = (
    "Shop now on {retailer}.",
    "Find it on {retailer}.",
    "Add it to your cart today.",
    "Try it today.",
)
