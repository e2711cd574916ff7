"""Fixtures of the trainer's tests: a tiny base model of our own and small datasets."""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel.trainer.bootstrap import bootstrap_model
from flywheel.trainer.testing import TINY, write_datasets


@pytest.fixture(scope="session")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few-step pretrained two-layer Llama with its own BPE tokenizer (about a second)."""
    return bootstrap_model(tmp_path_factory.mktemp("models"), TINY, progress=False)


@pytest.fixture
def datasets_dir(tmp_path: Path) -> Path:
    """sft, preference, unpaired and reward JSONL files, with eval files."""
    return write_datasets(tmp_path)
