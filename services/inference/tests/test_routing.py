"""Routing as a pure domain: arm choice, stickiness, validation and model names."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from flywheel.contracts.common.v1.common_pb2 import AdapterRef, WeightedAdapter
from flywheel.contracts.inference.v1 import resources_pb2 as ri
from flywheel.core.errors import InvalidArgument, NotFound
from flywheel.inference.routing import (
    AdapterVersion,
    AliasName,
    AliasState,
    Arm,
    Base,
    WeightedRef,
    arm_from_proto,
    arm_to_proto,
    arms_fingerprint,
    arms_from_json,
    arms_to_json,
    choose_arm,
    parse_model_name,
    validate_arm,
    validate_arms,
)

CONTROL = Arm("control", 0.9, (WeightedRef("budget", "v1"),))
CANDIDATE = Arm("candidate", 0.1, (WeightedRef("budget", "v2"),))
USERS = [f"user-{i}" for i in range(20_000)]


def alias(*arms: Arm, sticky: bool = True, name: str = "budgeting") -> AliasState:
    return AliasState(tenant="acme", name=name, arms=arms, sticky=sticky, revision=3)


def test_sticky_user_keeps_the_arm_whatever_the_rng() -> None:
    state = alias(CONTROL, CANDIDATE)
    for user in USERS[:200]:
        first = choose_arm(state, user, random.Random(1))
        assert all(choose_arm(state, user, random.Random(s)) == first for s in range(2, 7))


def test_sticky_split_matches_the_weights_across_users() -> None:
    state = alias(CONTROL, CANDIDATE)
    counts = Counter(choose_arm(state, user, random.Random(0)).label for user in USERS)
    # sd of the candidate share over 20k users is 0.002; 0.01 is five of them.
    assert counts["candidate"] / len(USERS) == pytest.approx(0.1, abs=0.01)
    assert counts["control"] + counts["candidate"] == len(USERS)


def test_unsticky_split_follows_the_rng() -> None:
    state = alias(CONTROL, CANDIDATE, sticky=False)
    rng = random.Random(7)
    counts = Counter(choose_arm(state, "same-user", rng).label for _ in range(20_000))
    assert counts["candidate"] / 20_000 == pytest.approx(0.1, abs=0.01)


def test_no_user_means_random_even_when_sticky() -> None:
    state = alias(CONTROL, CANDIDATE)
    rng = random.Random(3)
    labels = {choose_arm(state, None, rng).label for _ in range(500)}
    assert labels == {"control", "candidate"}


def test_changed_arms_reshuffle_users_but_keep_the_split() -> None:
    before = alias(CONTROL, CANDIDATE)
    after = alias(
        Arm("control", 0.9, CONTROL.adapters), Arm("candidate", 0.1, (WeightedRef("budget", "v3"),))
    )
    assert arms_fingerprint(before.arms) != arms_fingerprint(after.arms)
    rng = random.Random(0)
    old = [choose_arm(before, u, rng).label for u in USERS]
    new = [choose_arm(after, u, rng).label for u in USERS]
    # Independent draws: about 0.9*0.1 + 0.1*0.9 = 18% of users change arm.
    moved = sum(a != b for a, b in zip(old, new, strict=True)) / len(USERS)
    assert moved == pytest.approx(0.18, abs=0.02)
    assert new.count("candidate") / len(USERS) == pytest.approx(0.1, abs=0.01)


def test_stickiness_is_per_alias() -> None:
    one, other = alias(CONTROL, CANDIDATE), alias(CONTROL, CANDIDATE, name="other")
    rng = random.Random(0)
    differ = sum(choose_arm(one, u, rng) != choose_arm(other, u, rng) for u in USERS[:5000])
    assert differ > 500


def test_single_arm_and_zero_weight_edges() -> None:
    assert choose_arm(alias(CONTROL), "u", random.Random(0)) == CONTROL
    tiny = Arm("tiny", 1e-12, ())
    state = alias(CONTROL, tiny, sticky=False)
    assert all(choose_arm(state, None, random.Random(s)) == CONTROL for s in range(200))


def test_valid_arms_pass() -> None:
    validate_arms([CONTROL, CANDIDATE, Arm("base", 1.0)])
    composite = Arm("mix", 2.0, (WeightedRef("brand", "v1", 0.5), WeightedRef("task", "v4", 1.5)))
    validate_arm(composite)


@pytest.mark.parametrize(
    ("arms", "field"),
    [
        ([], "arms"),
        ([Arm("a", 0.0)], "arms[0].weight"),
        ([Arm("a", -1.0)], "arms[0].weight"),
        ([Arm("a", math.nan)], "arms[0].weight"),
        ([Arm("a", math.inf)], "arms[0].weight"),
        ([Arm("", 1.0)], "arms[0].label"),
        ([Arm("a", 1.0), Arm("a", 2.0)], "arms[1].label"),
        ([Arm("a", 1.0, (WeightedRef("x", "v1", 0.0),))], "arms[0].adapters[0].weight"),
        ([Arm("a", 1.0, (WeightedRef("x/y", "v1"),))], "arms[0].adapters[0].adapter.name"),
        ([Arm("a", 1.0, (WeightedRef("x", ""),))], "arms[0].adapters[0].adapter.version"),
        (
            [Arm("a", 1.0, (WeightedRef("x", "v1"), WeightedRef("x", "v1")))],
            "arms[0].adapters[1].adapter",
        ),
        ([Arm("a", 1e308), Arm("b", 1e308)], "arms"),
    ],
)
def test_invalid_arms_name_the_field(arms: list[Arm], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_arms(arms)
    assert field in [e.field for e in caught.value.errors]


def test_invalid_target_is_named_under_target() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_arm(Arm("", 0.0))
    assert {e.field for e in caught.value.errors} == {"target.label", "target.weight"}


def test_arms_round_trip_through_json_and_proto() -> None:
    arms = (CONTROL, Arm("mix", 2.0, (WeightedRef("a", "v1", 0.25), WeightedRef("b", "v2", 0.75))))
    assert arms_from_json(arms_to_json(arms)) == arms
    assert tuple(arm_from_proto(arm_to_proto(a)) for a in arms) == arms


def test_lone_adapter_weight_is_ignored_from_proto() -> None:
    message = ri.TrafficArm(
        label="all",
        weight=1.0,
        adapters=[WeightedAdapter(adapter=AdapterRef(name="budget", version="v1"))],
    )
    arm = arm_from_proto(message)
    assert arm.adapters == (WeightedRef("budget", "v1", 1.0),)
    validate_arm(arm)


BASE = "Qwen/Qwen2.5-0.5B-Instruct"


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (BASE, Base(BASE)),
        ("budget@v7", AdapterVersion("budget", "v7")),
        ("acme-budgeting-dpo@v1.2", AdapterVersion("acme-budgeting-dpo", "v1.2")),
        ("budgeting", AliasName("acme", "budgeting")),
        ("acme/budgeting", AliasName("acme", "budgeting")),
        ("acme/ab.test_2-x", AliasName("acme", "ab.test_2-x")),
    ],
)
def test_model_names(model: str, expected: object) -> None:
    assert parse_model_name(model, tenant="acme", base_models={BASE}) == expected


@pytest.mark.parametrize(
    "model",
    ["", "Budgeting", "acme/", "/x", "a/b/c", "-x", "x" * 64, "@v1", "budget@", "a/b@v1",
     "budget@v1@v2", "acme/Upper"],
)  # fmt: skip
def test_bad_model_names(model: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_model_name(model, tenant="acme", base_models={BASE})
    assert caught.value.errors[0].field == "model"


def test_another_tenants_alias_is_not_found() -> None:
    with pytest.raises(NotFound):
        parse_model_name("globex/budgeting", tenant="acme")


def test_base_model_only_when_served() -> None:
    # Not the served base: parsed as what it looks like, here an invalid alias.
    with pytest.raises(InvalidArgument):
        parse_model_name(BASE, tenant="acme")
