"""Tests for the task type registry and the plug-in's entry point."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

from flywheel.domains import retail_media
from flywheel.domains.retail_media import EVALUATORS, TASK_TYPES, task_type


def test_registry_defines_budgeting_and_creative() -> None:
    assert set(TASK_TYPES) == {"budgeting", "creative"}
    for name, task in TASK_TYPES.items():
        assert task.name == name
        assert task.domain == "retail_media"
        assert task.description
        assert task.qualified_name == f"retail_media.{name}"


def test_each_task_names_a_registered_evaluator() -> None:
    assert {t.evaluator for t in TASK_TYPES.values()} == set(EVALUATORS)


@pytest.mark.parametrize("name", ["budgeting", "retail_media.budgeting"])
def test_task_type_by_short_or_qualified_name(name: str) -> None:
    assert task_type(name) is TASK_TYPES["budgeting"]


@pytest.mark.parametrize("name", ["pricing", "other_domain.budgeting", ""])
def test_unknown_task_type_raises_key_error(name: str) -> None:
    with pytest.raises(KeyError):
        task_type(name)


def test_registry_is_read_only() -> None:
    with pytest.raises(TypeError):
        TASK_TYPES["x"] = TASK_TYPES["budgeting"]  # type: ignore[index]


def test_services_find_the_domain_through_its_entry_point() -> None:
    (ep,) = [ep for ep in entry_points(group="flywheel.domains") if ep.name == "retail_media"]
    module = ep.load()
    assert module is retail_media
    assert module.NAME == "retail_media"
    assert set(module.EVALUATORS) == {"retail_media.budgeting", "retail_media.creative"}
    assert next(module.corpus_text(1, 0))
