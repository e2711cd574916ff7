"""Routing as a pure domain: an alias's weighted arms, which arm a request takes, and what
a request's ``model`` names.

Nothing here touches the database or the network, so replicas can route from the state
they hold in memory and tests can check the arithmetic exactly.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import math
import random
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from flywheel.contracts.common.v1.common_pb2 import AdapterRef, WeightedAdapter
from flywheel.contracts.inference.v1 import resources_pb2 as ri
from flywheel.core.errors import FieldError, InvalidArgument, NotFound

# Alias names and tenant ids as they appear in "<tenant>/<name>".
ALIAS_SEGMENT = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
# Adapter names and versions as the trainer gives them (its spec's name rule, "v7").
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
ADAPTER_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$")
MAX_ARMS = 32
MAX_LABEL_CHARS = 63
MAX_COMPONENTS = 16


@dataclass(frozen=True, slots=True)
class WeightedRef:
    """One adapter version with its weight (in a composite, or a single target)."""

    name: str
    version: str
    weight: float = 1.0

    @property
    def key(self) -> str:
        """``name@version``, as callers write it in ``model``."""
        return f"{self.name}@{self.version}"


@dataclass(frozen=True, slots=True)
class Arm:
    """One arm of an alias: a label, its share of the traffic and what serves it.

    No adapters: the base model. One: that adapter. Several: their weighted composite.
    """

    label: str
    weight: float
    adapters: tuple[WeightedRef, ...] = ()


@dataclass(frozen=True, slots=True)
class AliasState:
    """An alias as a replica routes by it. ``name`` is bare (no tenant prefix)."""

    tenant: str
    name: str
    arms: tuple[Arm, ...]
    sticky: bool = False
    revision: int = 0
    updated_at: datetime | None = None

    @property
    def qualified_name(self) -> str:
        """``<tenant>/<name>``, what callers put in ``model``."""
        return f"{self.tenant}/{self.name}"


# --- validation -----------------------------------------------------------------------


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def _arm_errors(arm: Arm, field: str) -> list[FieldError]:
    errors: list[FieldError] = []
    if not arm.label.strip():
        errors.append(FieldError(f"{field}.label", "must not be empty"))
    elif len(arm.label) > MAX_LABEL_CHARS:
        errors.append(FieldError(f"{field}.label", f"must be at most {MAX_LABEL_CHARS} chars"))
    if not _positive(arm.weight):
        errors.append(FieldError(f"{field}.weight", "must be a positive finite number"))
    if len(arm.adapters) > MAX_COMPONENTS:
        errors.append(FieldError(f"{field}.adapters", f"at most {MAX_COMPONENTS} adapters"))
    seen: set[str] = set()
    for j, ref in enumerate(arm.adapters):
        where = f"{field}.adapters[{j}]"
        if not ADAPTER_NAME.match(ref.name):
            errors.append(FieldError(f"{where}.adapter.name", "is not an adapter name"))
        if not ADAPTER_VERSION.match(ref.version):
            errors.append(FieldError(f"{where}.adapter.version", "is not an adapter version"))
        if not _positive(ref.weight):
            errors.append(FieldError(f"{where}.weight", "must be a positive finite number"))
        if ref.key in seen:
            # A composite naming one version twice is almost surely a mistake in the request.
            errors.append(FieldError(f"{where}.adapter", f"{ref.key} is listed twice"))
        seen.add(ref.key)
    return errors


def validate_arm(arm: Arm, *, field: str = "target") -> None:
    """Raise `InvalidArgument` unless ``arm`` is a valid single target."""
    errors = _arm_errors(arm, field)
    if errors:
        raise InvalidArgument(errors)


def validate_arms(arms: Sequence[Arm], *, field: str = "arms") -> None:
    """Raise `InvalidArgument` naming every bad field: at least one arm, unique non-empty
    labels, positive finite weights (of arms and of their adapters)."""
    errors: list[FieldError] = []
    if not arms:
        errors.append(FieldError(field, "must hold at least one arm"))
    elif len(arms) > MAX_ARMS:
        errors.append(FieldError(field, f"must hold at most {MAX_ARMS} arms"))
    labels: set[str] = set()
    for i, arm in enumerate(arms):
        errors.extend(_arm_errors(arm, f"{field}[{i}]"))
        if arm.label in labels:
            errors.append(FieldError(f"{field}[{i}].label", f"{arm.label!r} is used twice"))
        labels.add(arm.label)
    if not errors and not math.isfinite(sum(arm.weight for arm in arms)):
        errors.append(FieldError(field, "weights are too large to add up"))
    if errors:
        raise InvalidArgument(errors)


def adapters_of(arms: Iterable[Arm]) -> list[WeightedRef]:
    """Every adapter version the arms name, each once, in order of first mention."""
    seen: dict[tuple[str, str], WeightedRef] = {}
    for ref in itertools.chain.from_iterable(arm.adapters for arm in arms):
        seen.setdefault((ref.name, ref.version), ref)
    return list(seen.values())


def single_adapter(arms: Sequence[Arm]) -> WeightedRef | None:
    """The adapter that gets all the traffic, when exactly one (no split, no composite)."""
    if len(arms) == 1 and len(arms[0].adapters) == 1:
        return arms[0].adapters[0]
    return None


# --- choosing an arm ------------------------------------------------------------------


def arms_to_json(arms: Iterable[Arm]) -> list[dict[str, Any]]:
    """The arms as stored (and fingerprinted): labels, weights and adapters, in order."""
    return [
        {
            "label": arm.label,
            "weight": arm.weight,
            "adapters": [
                {"name": r.name, "version": r.version, "weight": r.weight} for r in arm.adapters
            ],
        }
        for arm in arms
    ]


def arms_from_json(data: Iterable[dict[str, Any]]) -> tuple[Arm, ...]:
    """The inverse of `arms_to_json`."""
    return tuple(
        Arm(
            label=str(arm["label"]),
            weight=float(arm["weight"]),
            adapters=tuple(
                WeightedRef(str(r["name"]), str(r["version"]), float(r["weight"]))
                for r in arm.get("adapters", ())
            ),
        )
        for arm in data
    )


def arms_fingerprint(arms: Sequence[Arm]) -> str:
    """A digest of the arms, order included (it decides which user falls in which arm)."""
    canonical = json.dumps(arms_to_json(arms), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _sticky_point(alias: AliasState, user_id: str) -> float:
    """A user's fixed point in [0, 1) for this alias and these arms.

    The arms' fingerprint is part of the hash, so any change of arms reshuffles users
    rather than leaving them skewed by the previous split.
    """
    # JSON array: no separator in a name or user id can make two inputs hash alike.
    key = json.dumps([alias.tenant, alias.name, arms_fingerprint(alias.arms), user_id])
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def choose_arm(alias: AliasState, user_id: str | None, rng: random.Random) -> Arm:
    """The arm a request takes: by weight; the same one for a user of a sticky alias."""
    if not alias.arms:
        raise ValueError(f"alias {alias.qualified_name} has no arms")
    if len(alias.arms) == 1:
        return alias.arms[0]
    sticky = alias.sticky and user_id is not None and user_id != ""
    point = _sticky_point(alias, user_id) if sticky and user_id else rng.random()
    bounds = list(itertools.accumulate(arm.weight for arm in alias.arms))
    # bisect_right: a point exactly on a boundary belongs to the next arm, so each arm's
    # interval is half-open [lo, hi) and its width is exactly its weight.
    index = bisect.bisect_right(bounds, point * bounds[-1])
    return alias.arms[min(index, len(alias.arms) - 1)]


# --- model names ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Base:
    """The base model itself, no adapter."""

    name: str


@dataclass(frozen=True, slots=True)
class AdapterVersion:
    """One adapter version of the caller's tenant, written ``name@version``."""

    name: str
    version: str


@dataclass(frozen=True, slots=True)
class AliasName:
    """An alias, always with its tenant resolved."""

    tenant: str
    name: str


ModelTarget = Base | AdapterVersion | AliasName


def parse_model_name(model: str, *, tenant: str, base_models: Collection[str] = ()) -> ModelTarget:
    """What a request's ``model`` names, for a caller of ``tenant``.

    One of ``base_models`` (the served base model's ids) is the base; ``name@version`` an
    adapter version; ``<tenant>/<name>`` or a bare ``<name>`` (under the caller's tenant)
    an alias. Another tenant's alias is `NotFound`, as its ids are everywhere else.
    """
    if model in base_models:
        return Base(model)
    bad = InvalidArgument(
        FieldError("model", "must be the base model, 'name@version' or an alias name")
    )
    if "@" in model:
        name, _, version = model.partition("@")
        if not ADAPTER_NAME.match(name) or not ADAPTER_VERSION.match(version):
            raise bad
        return AdapterVersion(name, version)
    owner, slash, name = model.rpartition("/")
    if not slash:
        owner = tenant
    if not ALIAS_SEGMENT.match(name) or (slash and not ALIAS_SEGMENT.match(owner)):
        raise bad
    if owner != tenant:
        raise NotFound("alias", model)
    return AliasName(owner, name)


def check_alias_name(name: str, *, field: str = "alias") -> None:
    """Raise `InvalidArgument` unless ``name`` is a bare alias name."""
    if not ALIAS_SEGMENT.match(name):
        raise InvalidArgument(
            FieldError(field, "must be 1-63 of a-z, 0-9, '.', '_', '-', starting alnum")
        )


# --- protobuf -------------------------------------------------------------------------


def ref_from_proto(adapter: WeightedAdapter) -> WeightedRef:
    return WeightedRef(adapter.adapter.name, adapter.adapter.version, adapter.weight)


def ref_to_proto(ref: WeightedRef) -> WeightedAdapter:
    return WeightedAdapter(
        adapter=AdapterRef(name=ref.name, version=ref.version), weight=ref.weight
    )


def arm_from_proto(arm: ri.TrafficArm) -> Arm:
    """The arm a request carries. A lone adapter's weight is ignored by contract, so an
    unset one (0) is taken as 1 rather than refused."""
    refs = tuple(ref_from_proto(a) for a in arm.adapters)
    if len(refs) == 1:
        refs = (WeightedRef(refs[0].name, refs[0].version, 1.0),)
    return Arm(label=arm.label, weight=arm.weight, adapters=refs)


def arm_to_proto(arm: Arm) -> ri.TrafficArm:
    return ri.TrafficArm(
        label=arm.label, weight=arm.weight, adapters=[ref_to_proto(r) for r in arm.adapters]
    )
