"""A job process SIGKILLed during training, or while a checkpoint is being written, resumes
from the last complete checkpoint and ends with the adapter an uninterrupted seeded run
makes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flywheel.trainer import checkpoints
from flywheel.trainer.runner import OUTCOME, SPEC, read_outcome, run_job
from flywheel.trainer.spec import LoraSettings, TrainSpec

# The job process, with a callback that kills it (SIGKILL: no cleanup, no atexit) at a
# given step: after the step ("train") or once the checkpoint's files are written but
# before it is marked complete ("save", i.e. mid checkpoint write).
CHILD = """
import os, signal, sys
from pathlib import Path
from transformers import TrainerCallback
from flywheel.trainer.runner import run_job

mode, at = sys.argv[2], int(sys.argv[3])

class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **_):
        if mode == "train" and state.global_step == at:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_save(self, args, state, control, **_):
        if mode == "save" and state.global_step == at:
            os.kill(os.getpid(), signal.SIGKILL)

sys.exit(run_job(Path(sys.argv[1]), callbacks=[Kill()]))
"""


def _job(folder: Path, base_model: Path, datasets_dir: Path) -> Path:
    folder.mkdir()
    spec = TrainSpec(
        method="dpo", base_model=str(base_model), train_file=datasets_dir / "preference.jsonl",
        lora=LoraSettings(r=4, alpha=8, dropout=0.1),  # dropout: RNG state must resume too
        hyperparameters={"max_steps": 8, "per_device_train_batch_size": 2, "learning_rate": 5e-3},
        checkpoint_every=2, seed=3,
    )  # fmt: skip
    (folder / SPEC).write_text(json.dumps(spec.to_json()))
    return folder


def _kill_at(folder: Path, mode: str, step: int) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), mode, str(step)], capture_output=True, text=True
    )
    assert done.returncode == -9, done.stderr[-3000:]  # killed, not finished
    assert not (folder / OUTCOME).exists()


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter" / "adapter_model.safetensors")


@pytest.fixture
def uninterrupted(tmp_path: Path, base_model: Path, datasets_dir: Path) -> dict[str, torch.Tensor]:
    folder = _job(tmp_path / "straight", base_model, datasets_dir)
    assert run_job(folder) == 0
    return _weights(folder)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_killed_during_training_resumes_from_last_complete_checkpoint(
    tmp_path: Path, base_model: Path, datasets_dir: Path, uninterrupted: dict[str, torch.Tensor]
) -> None:
    folder = _job(tmp_path / "killed", base_model, datasets_dir)
    _kill_at(folder, "train", 5)
    assert checkpoints.last_step(folder / "checkpoints") == 4
    assert run_job(folder) == 0
    outcome = read_outcome(folder)
    assert outcome is not None
    assert outcome["resumed_from_step"] == 4
    _assert_same(_weights(folder), uninterrupted)


def test_killed_while_writing_a_checkpoint_ignores_the_partial_one(
    tmp_path: Path, base_model: Path, datasets_dir: Path, uninterrupted: dict[str, torch.Tensor]
) -> None:
    folder = _job(tmp_path / "killed", base_model, datasets_dir)
    _kill_at(folder, "save", 6)
    root = folder / "checkpoints"
    partial = root / "checkpoint-6"
    assert partial.is_dir()
    assert not (partial / checkpoints.MARKER).exists()
    assert checkpoints.last_step(root) == 4
    assert run_job(folder) == 0
    outcome = read_outcome(folder)
    assert outcome is not None
    assert outcome["resumed_from_step"] == 4
    _assert_same(_weights(folder), uninterrupted)


def test_a_checkpoint_whose_files_changed_is_not_trusted(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    checkpoints.write_marker(folder, 2)
    assert checkpoints.latest_complete(tmp_path) == folder
    (folder / "model.safetensors").write_bytes(b"weight")  # truncated after marking
    assert checkpoints.latest_complete(tmp_path) is None
    assert not folder.exists()  # deleted, so a resumed run cannot pick it up
