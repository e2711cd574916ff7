"""Reward functions for online RL, from the domain plug-ins' evaluators.

Plug-ins register under the ``flywheel.domains`` entry point group and expose
``EVALUATORS``: name -> ``(prompt_text, completion) -> float``. TRL calls a reward
function with the batch's prompts and completions (strings, or chat messages for
conversational data) and wants one float per completion; `as_trl_reward` adapts one to
the other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any

Evaluator = Callable[[str, str], float]


def evaluators() -> dict[str, Evaluator]:
    """Every evaluator every installed domain plug-in registers."""
    found: dict[str, Evaluator] = {}
    for point in entry_points(group="flywheel.domains"):
        registry: Mapping[str, Evaluator] = getattr(point.load(), "EVALUATORS", {})
        found.update(registry)
    return found


def _text(value: Any) -> str:
    """A prompt or completion as text: chat messages become their contents, joined."""
    if isinstance(value, str):
        return value
    return "\n".join(str(m.get("content", "")) for m in value)


def as_trl_reward(name: str, evaluator: Evaluator) -> Callable[..., list[float | None]]:
    """``evaluator`` in TRL's reward-function shape, named for TRL's logs."""

    def score(prompt: Any, completion: Any) -> float | None:
        try:
            return float(evaluator(_text(prompt), _text(completion)))
        except ValueError:
            # Not this evaluator's kind of prompt (a creative brief for the budgeting
            # one): None tells TRL the function does not apply to this sample.
            return None

    def reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float | None]:
        return [score(p, c) for p, c in zip(prompts, completions, strict=True)]

    reward.__name__ = name.replace(".", "_")
    return reward


def reward_functions(
    names: tuple[str, ...] | list[str], registry: Mapping[str, Evaluator] | None = None
) -> list[Callable[..., list[float | None]]]:
    """TRL reward functions for ``names`` (from ``registry``, by default every installed
    plug-in's evaluators); an unknown name is an error listing the known ones."""
    known = evaluators() if registry is None else registry
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(
            f"unknown reward function(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return [as_trl_reward(n, known[n]) for n in names]
