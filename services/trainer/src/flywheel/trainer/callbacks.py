"""Trainer callbacks of Flywheel's runs (training side only: they import transformers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from flywheel.trainer.checkpoints import prune, write_marker


class CompletionMarker(TrainerCallback):
    """Marks each checkpoint complete once the trainer has written all of it."""

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        folder = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            write_marker(folder, state.global_step)
            prune(Path(str(args.output_dir)))
