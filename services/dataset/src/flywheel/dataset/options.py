"""Build options: a SnapshotSpec with every unset field resolved to the service's defaults.

The resolved options are stored in the snapshot (as a spec with every field set), so a
snapshot says exactly how it was built and can be rebuilt from that alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime

from flywheel.contracts.dataset.v1 import resources_pb2 as ds
from flywheel.core.errors import FieldError, InvalidArgument

# No cutoff: everything.
END_OF_TIME = datetime.max.replace(tzinfo=UTC)

KIND_NAMES = {
    ds.DATASET_KIND_SFT: "sft",
    ds.DATASET_KIND_PREFERENCE: "preference",
    ds.DATASET_KIND_UNPAIRED: "unpaired",
    ds.DATASET_KIND_REWARD: "reward",
}
KINDS = {name: value for value, name in KIND_NAMES.items()}
CONFLICT_RULE_NAMES = {
    ds.CONFLICT_RULE_WEIGHTED_MAJORITY: "weighted_majority",
    ds.CONFLICT_RULE_LATEST: "latest",
    ds.CONFLICT_RULE_DROP: "drop",
}
CONFLICT_RULES = {name: value for value, name in CONFLICT_RULE_NAMES.items()}


@dataclass(frozen=True, slots=True)
class BuildOptions:
    """Everything a build depends on besides the data."""

    kind: str = "sft"
    # Empty: every task of the tenant.
    task: str = ""
    # Tokenizer spec for token counts (see flywheel.dataset.tokens); empty: builtin:regex.
    tokenizer: str = ""
    sft_min_rating: int = 4
    min_rating_chosen: int = 4
    max_rating_rejected: int = 2
    min_rating_margin: int = 1
    max_prompt_tokens: int = 1024
    max_completion_tokens: int = 1024
    # Jaccard similarity (MinHash estimate) above which a row is a near-duplicate; 1.0: off.
    near_duplicate_threshold: float = 0.9
    conflict_rule: str = "weighted_majority"
    human_weight: float = 1.0
    synthetic_weight: float = 0.5
    human_only: bool = False
    eval_fraction: float = 0.1
    seed: int = 0
    cutoff: datetime = END_OF_TIME

    def weight(self, human: bool) -> float:
        """How much one feedback of this source counts."""
        return self.human_weight if human else self.synthetic_weight


def resolve(spec: ds.SnapshotSpec, defaults: BuildOptions, *, now: datetime) -> BuildOptions:
    """``spec`` with unset fields from ``defaults``; no cutoff means ``now``. Checks ranges."""
    kind = KIND_NAMES.get(spec.kind, defaults.kind) if spec.kind else defaults.kind
    changes: dict[str, object] = {
        "kind": kind,
        "task": spec.task,
        "tokenizer": spec.tokenizer or defaults.tokenizer,
        "human_only": spec.human_only,
        "cutoff": spec.cutoff.ToDatetime(UTC) if spec.HasField("cutoff") else now,
    }
    if spec.conflict_rule:
        changes["conflict_rule"] = CONFLICT_RULE_NAMES.get(spec.conflict_rule, "")
    for name in (
        "sft_min_rating", "min_rating_chosen", "max_rating_rejected", "min_rating_margin",
        "max_prompt_tokens", "max_completion_tokens", "near_duplicate_threshold",
        "human_weight", "synthetic_weight", "eval_fraction", "seed",
    ):  # fmt: skip
        if spec.HasField(name):
            changes[name] = getattr(spec, name)
    options = dataclasses.replace(defaults, **changes)  # type: ignore[arg-type]
    check(options, unknown_kind=spec.kind not in (0, *KIND_NAMES))
    return options


def check(options: BuildOptions, *, unknown_kind: bool = False) -> None:
    """Refuse options no build could honour, naming each bad field."""
    errors: list[FieldError] = []

    def need(ok: bool, field: str, message: str) -> None:
        if not ok:
            errors.append(FieldError(f"spec.{field}", message))

    need(not unknown_kind and options.kind in KINDS, "kind", "is not a known dataset kind")
    need(options.conflict_rule in CONFLICT_RULES, "conflict_rule", "is not a known rule")
    for name in ("sft_min_rating", "min_rating_chosen", "max_rating_rejected"):
        need(1 <= getattr(options, name) <= 5, name, "must be between 1 and 5")
    need(0 <= options.min_rating_margin <= 4, "min_rating_margin", "must be between 0 and 4")
    need(
        options.max_rating_rejected < options.min_rating_chosen,
        "max_rating_rejected",
        "must be below min_rating_chosen",
    )
    for name in ("max_prompt_tokens", "max_completion_tokens"):
        need(1 <= getattr(options, name) <= 1_000_000, name, "must be between 1 and 1000000")
    need(
        0.0 < options.near_duplicate_threshold <= 1.0,
        "near_duplicate_threshold",
        "must be in (0, 1]",
    )
    for name in ("human_weight", "synthetic_weight"):
        need(0.0 <= getattr(options, name) <= 1000.0, name, "must be between 0 and 1000")
    need(0.0 <= options.eval_fraction < 1.0, "eval_fraction", "must be in [0, 1)")
    need(len(options.task) <= 63, "task", "must be at most 63 characters")
    if errors:
        raise InvalidArgument(errors)


def to_spec(options: BuildOptions) -> ds.SnapshotSpec:
    """The resolved options as a spec with every field set."""
    spec = ds.SnapshotSpec(
        task=options.task,
        kind=KINDS[options.kind],
        tokenizer=options.tokenizer or "builtin:regex",
        sft_min_rating=options.sft_min_rating,
        min_rating_chosen=options.min_rating_chosen,
        max_rating_rejected=options.max_rating_rejected,
        min_rating_margin=options.min_rating_margin,
        max_prompt_tokens=options.max_prompt_tokens,
        max_completion_tokens=options.max_completion_tokens,
        near_duplicate_threshold=options.near_duplicate_threshold,
        conflict_rule=CONFLICT_RULES[options.conflict_rule],
        human_weight=options.human_weight,
        synthetic_weight=options.synthetic_weight,
        human_only=options.human_only,
        eval_fraction=options.eval_fraction,
        seed=options.seed,
    )
    spec.cutoff.FromDatetime(options.cutoff)
    return spec
