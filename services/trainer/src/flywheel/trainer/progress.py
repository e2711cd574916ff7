"""Training progress as Flywheel reports it: step, epoch, loss, reward margin, tokens/s, ETA."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments


@dataclass(frozen=True)
class Progress:
    """One progress report of a run."""

    step: int
    total_steps: int
    epoch: float
    loss: float | None
    reward_margin: float | None
    tokens_per_second: float
    eta_seconds: float
    # Every other numeric metric TRL logged (learning_rate, grad_norm, rewards/...).
    metrics: dict[str, float] = field(default_factory=dict)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


class ProgressReporter(TrainerCallback):
    """Turns the trainer's logs into `Progress` for ``report``; rates count only this
    process's work, so a resumed run's tokens/s is not inflated by restored steps."""

    def __init__(self, report: Callable[[Progress], None]) -> None:
        self.report = report
        self.started = time.monotonic()
        self.first_step = 0
        self.first_tokens = 0
        # Eval logs carry no training loss: the last one seen stays the job's loss.
        self.loss: float | None = None
        self.reward_margin: float | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        self.started = time.monotonic()
        self.first_step = state.global_step
        self.first_tokens = state.num_input_tokens_seen

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **_: Any,
    ) -> None:
        logs = logs or {}
        elapsed = max(time.monotonic() - self.started, 1e-9)
        done = state.global_step - self.first_step
        per_step = elapsed / done if done else 0.0
        metrics = {k: v for k, raw in logs.items() if (v := _number(raw)) is not None}
        loss = metrics.get("loss", metrics.get("train_loss"))
        self.loss = self.loss if loss is None else loss
        margin = metrics.get("rewards/margins", metrics.get("margin"))
        self.reward_margin = self.reward_margin if margin is None else margin
        self.report(
            Progress(
                step=state.global_step,
                total_steps=state.max_steps,
                epoch=float(state.epoch or 0.0),
                loss=self.loss,
                reward_margin=self.reward_margin,
                tokens_per_second=(state.num_input_tokens_seen - self.first_tokens) / elapsed,
                eta_seconds=max(state.max_steps - state.global_step, 0) * per_step,
                metrics=metrics,
            )
        )
