"""The task types this domain defines, as a small registry.

Services know tasks only by name (a feedback record says ``task="budgeting"``, a recipe
names the evaluator ``retail_media.budgeting``); this is where the names are defined.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

DOMAIN = "retail_media"


@dataclass(frozen=True, slots=True)
class TaskType:
    """One kind of request the domain's models answer."""

    name: str
    description: str
    # Evaluator names are domain-qualified because trainer and critic configs list
    # evaluators from several domains side by side.
    evaluator: str
    domain: str = DOMAIN

    @property
    def qualified_name(self) -> str:
        """``<domain>.<task>``, unique across every installed domain."""
        return f"{self.domain}.{self.name}"


TASK_TYPES: MappingProxyType[str, TaskType] = MappingProxyType(
    {
        t.name: t
        for t in (
            TaskType(
                name="budgeting",
                description=(
                    "Split a brand's ad budget across retail media networks given each "
                    "network's return on ad spend (ROAS): a dollar amount and a percentage "
                    "per retailer that add up, with more money where ROAS is higher."
                ),
                evaluator="retail_media.budgeting",
            ),
            TaskType(
                name="creative",
                description=(
                    "Write ad copy for a product in the brand's voice, within a length "
                    "limit, without any banned word or claim."
                ),
                evaluator="retail_media.creative",
            ),
        )
    }
)


def task_type(name: str) -> TaskType:
    """The task type called ``name`` (``budgeting``) or ``retail_media.budgeting``.

    Raises ``KeyError`` naming the known task types when there is none.
    """
    domain, dot, short = name.rpartition(".")
    if dot and domain != DOMAIN:
        raise KeyError(f"task {name!r} is not in domain {DOMAIN!r}")
    try:
        return TASK_TYPES[short]
    except KeyError:
        raise KeyError(f"unknown task type {name!r}; known: {', '.join(TASK_TYPES)}") from None
