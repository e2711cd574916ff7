"""Retail media: the example Flywheel domain plug-in.

Brands split ad budgets across retail media networks (Amazon Ads, Walmart Connect,
Target Roundel, Instacart, ...) by return on ad spend, and write ad copy in their brand
voice without banned claims. This package holds the domain's task types, seeded prompt
and synthetic corpus generators, and rule evaluators. Services find it through the
``flywheel.domains`` entry point group (this module is the entry point), never by
importing it by name; ``TASK_TYPES``, ``EVALUATORS`` and ``corpus_text`` are what they
read from it.
"""

from flywheel.domains.retail_media.allocation import Allocation, parse_allocation
from flywheel.domains.retail_media.corpus import (
    QUALITIES,
    Example,
    Quality,
    budgeting_answer,
    corpus,
    corpus_text,
    creative_answer,
)
from flywheel.domains.retail_media.evaluators import (
    EVALUATORS,
    Evaluation,
    RewardFunction,
    evaluate_budgeting,
    evaluate_creative,
)
from flywheel.domains.retail_media.prompts import (
    BudgetingPrompt,
    CreativePrompt,
    Retailer,
    budgeting_prompt,
    creative_prompt,
    parse_budgeting_prompt,
    parse_creative_prompt,
)
from flywheel.domains.retail_media.tasks import DOMAIN, TASK_TYPES, TaskType, task_type

NAME = DOMAIN

__all__ = [
    "DOMAIN",
    "EVALUATORS",
    "NAME",
    "QUALITIES",
    "TASK_TYPES",
    "Allocation",
    "BudgetingPrompt",
    "CreativePrompt",
    "Evaluation",
    "Example",
    "Quality",
    "Retailer",
    "RewardFunction",
    "TaskType",
    "budgeting_answer",
    "budgeting_prompt",
    "corpus",
    "corpus_text",
    "creative_answer",
    "creative_prompt",
    "evaluate_budgeting",
    "evaluate_creative",
    "parse_allocation",
    "parse_budgeting_prompt",
    "parse_creative_prompt",
    "task_type",
]
