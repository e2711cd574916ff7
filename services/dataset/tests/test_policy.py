"""When the trigger policy fires, and why (pure rules, no service)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from flywheel.contracts.dataset.v1 import resources_pb2 as ds
from flywheel.core.errors import InvalidArgument
from flywheel.dataset.policy import PolicyDefaults, check_policy, is_due

NOW = datetime(2026, 11, 27, 12, tzinfo=UTC)


def policy(**fields: object) -> ds.TriggerPolicy:
    p = PolicyDefaults(min_new_examples=10, cooldown_s=600).policy("acme", "budgeting")
    for name, value in fields.items():
        if name in ("max_interval", "cooldown"):
            getattr(p, name).FromTimedelta(value)
        else:
            setattr(p, name, value)
    return p


def due(p: ds.TriggerPolicy, new: int, *, snapshot_ago: timedelta | None = None,
        triggered_ago: timedelta | None = None) -> str:  # fmt: skip
    return is_due(
        p,
        new_examples=new,
        last_snapshot_at=NOW - snapshot_ago if snapshot_ago is not None else None,
        last_triggered_at=NOW - triggered_ago if triggered_ago is not None else None,
        now=NOW,
    )


def test_count_threshold_fires_at_and_above_it() -> None:
    assert due(policy(), 9) == ""
    assert due(policy(), 10) == "policy: 10 new examples (threshold 10)"
    assert due(policy(), 0) == ""


def test_cooldown_holds_it_back() -> None:
    assert due(policy(), 50, triggered_ago=timedelta(minutes=5)) == ""
    assert due(policy(), 50, triggered_ago=timedelta(minutes=11)) != ""


def test_max_interval_fires_below_the_count_once_some_arrived() -> None:
    timed = policy(max_interval=timedelta(hours=1))
    assert due(timed, 3, snapshot_ago=timedelta(minutes=30)) == ""
    assert due(timed, 3, snapshot_ago=timedelta(hours=2)).startswith(
        "policy: 3 new examples, 7200s"
    )
    assert due(timed, 0, snapshot_ago=timedelta(hours=2)) == ""


def test_disabled_never_fires() -> None:
    assert due(policy(enabled=False), 1000) == ""


def test_policies_that_cannot_work_are_refused() -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_policy(ds.TriggerPolicy(enabled=True))
    assert {e.field for e in caught.value.errors} == {"policy.task", "policy.min_new_examples"}
    check_policy(policy())
