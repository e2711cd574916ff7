"""What one training run is: the recipe, the data, the base model, the adapter to make.

The same `TrainSpec` drives a service job and `flywheel train`, so both produce the same
adapter. It is plain data (JSON round-trips), free of torch and of any transport, so the
service can store it with the job and hand it to the process that trains.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METHODS = ("sft", "dpo", "kto", "orpo", "reward", "grpo", "rloo")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA shape; PEFT's defaults where unset."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    # Empty: every linear layer of the architecture (PEFT's "all-linear"), which vLLM
    # serves too.
    target_modules: tuple[str, ...] = ()
    use_rslora: bool = False

    def problems(self) -> list[str]:
        """What is wrong with these settings (empty when valid)."""
        out = []
        if not 1 <= self.r <= 1024:
            out.append(f"lora r must be in 1..1024, not {self.r}")
        if self.alpha <= 0:
            out.append(f"lora alpha must be positive, not {self.alpha}")
        if not 0 <= self.dropout < 1:
            out.append(f"lora dropout must be in [0, 1), not {self.dropout}")
        return out


@dataclass(frozen=True)
class TrainSpec:
    """One run: everything that decides the adapter it produces."""

    method: str
    base_model: str
    # TRL-column JSONL (a dataset snapshot's train/eval files, or the user's own).
    train_file: Path
    eval_file: Path | None = None
    adapter_name: str = "adapter"
    adapter_type: str = "task"
    task: str = ""
    lora: LoraSettings = field(default_factory=LoraSettings)
    qlora: bool = False
    # Overrides of the TRL config; names outside the recipe's config are rejected.
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    # Online RL: evaluator names registered by domain plug-ins (e.g. retail_media.budgeting).
    reward_functions: tuple[str, ...] = ()
    # Continue training this PEFT adapter folder (e.g. DPO on top of the brand's SFT one).
    parent_adapter: Path | None = None
    # Checkpoint every N optimizer steps (0: only the final adapter).
    checkpoint_every: int = 0
    # Reward recipe: learn one quality dimension's scores instead of the overall preference.
    reward_dimension: str = ""
    # Lineage only: what the data and the parent are, for the manifest and caches.
    dataset_snapshot_id: str = ""

    def problems(self) -> list[str]:
        """What is wrong with this spec (empty when it can run)."""
        out = list(self.lora.problems())
        if self.method not in METHODS:
            out.append(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if not self.base_model:
            out.append("base_model is required")
        if not self.train_file.is_file():
            out.append(f"dataset file {self.train_file} does not exist")
        if self.eval_file is not None and not self.eval_file.is_file():
            out.append(f"eval file {self.eval_file} does not exist")
        if (
            self.parent_adapter is not None
            and not (self.parent_adapter / "adapter_config.json").is_file()
        ):
            out.append(f"parent adapter {self.parent_adapter} has no adapter_config.json")
        if self.method in ("grpo", "rloo") and not self.reward_functions:
            out.append(f"{self.method} needs at least one reward function")
        if self.reward_dimension and self.method != "reward":
            out.append("reward_dimension applies to the reward method only")
        if self.checkpoint_every < 0:
            out.append("checkpoint_every must be >= 0")
        if not self.adapter_name or "/" in self.adapter_name or self.adapter_name.startswith("."):
            out.append(f"adapter name {self.adapter_name!r} is not a plain name")
        return out

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (paths as strings)."""
        data = dataclasses.asdict(self)
        for key in ("train_file", "eval_file", "parent_adapter"):
            data[key] = None if data[key] is None else str(data[key])
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainSpec:
        """The spec `to_json` wrote."""
        data = dict(data)
        for key in ("train_file", "eval_file", "parent_adapter"):
            data[key] = None if data.get(key) is None else Path(data[key])
        lora = dict(data.pop("lora", {}))
        lora["target_modules"] = tuple(lora.get("target_modules", ()))
        data["reward_functions"] = tuple(data.get("reward_functions", ()))
        return cls(lora=LoraSettings(**lora), **data)
