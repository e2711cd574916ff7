"""Tiny models and small datasets for the trainer's tests, benchmarks and demos.

Everything is seeded and offline: a two-layer Llama pretrained for a few steps with our
own BPE tokenizer (about a second), and TRL-column rows drawn from the retail-media corpus.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from flywheel.domains.retail_media import corpus
from flywheel.trainer.bootstrap import BootstrapConfig

TINY = BootstrapConfig(
    examples=300, vocab_size=400, hidden_size=32, intermediate_size=64, layers=2, heads=2,
    seq_len=64, batch_size=4, steps=20, warmup_steps=5,
)  # fmt: skip
CHOSEN = "Put 60% on Amazon Ads for its ROAS."


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    """``rows`` as a JSONL file at ``path``."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _short(text: str, limit: int) -> str:
    return text[:limit]


def sft_rows(n: int = 16, seed: int = 0, limit: int = 120) -> list[dict[str, Any]]:
    """Prompt/completion rows from the corpus's good answers."""
    good = [e for e in corpus(n * 4, seed) if e.quality == "good"][:n]
    return [
        {"prompt": _short(e.prompt, limit), "completion": _short(e.answer, limit)} for e in good
    ]


def preference_rows(n: int = 16, seed: int = 0, limit: int = 120) -> list[dict[str, Any]]:
    """A clear preference: the same short good sentence is always chosen over noise."""
    rng = random.Random(seed)
    return [
        {
            "prompt": _short(e.prompt, limit),
            "chosen": CHOSEN,
            "rejected": "".join(rng.choice("xyzq ") for _ in range(30)),
        }
        for e in corpus(n, seed)
    ]


def write_datasets(folder: Path) -> Path:
    """sft, preference, unpaired and reward JSONL files (plus eval files) in ``folder``."""
    write_jsonl(folder / "sft.jsonl", sft_rows())
    write_jsonl(folder / "sft-eval.jsonl", sft_rows(4, seed=1))
    prefs = preference_rows()
    write_jsonl(folder / "preference.jsonl", prefs)
    write_jsonl(folder / "preference-eval.jsonl", preference_rows(4, seed=1))
    write_jsonl(folder / "reward.jsonl", [{**r, "margin": 1.0} for r in prefs])
    unpaired = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in prefs]
    unpaired += [
        {"prompt": r["prompt"], "completion": r["rejected"], "label": False} for r in prefs
    ]
    write_jsonl(folder / "unpaired.jsonl", unpaired)
    return folder
