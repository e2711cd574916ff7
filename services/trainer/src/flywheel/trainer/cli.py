"""`flywheel bootstrap-model`: build (or find cached) the demo's base model.

    flywheel bootstrap-model                      # ~4 CPU minutes the first time, cached after
    flywheel bootstrap-model --steps 50 --output-root /tmp/models

Prints the model folder, which any `--base-model` option (and transformers) accepts.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

DEFAULT_ROOT = Path(os.environ.get("FLYWHEEL_DATA_DIR", ".flywheel/data")) / "models"


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``bootstrap-model`` to the ``flywheel`` command line."""
    p = sub.add_parser(
        "bootstrap-model",
        help="pretrain (or find cached) a small Llama on the synthetic retail-media corpus",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--output-root", type=Path, default=DEFAULT_ROOT,
                   help=f"folder of cached models (default {DEFAULT_ROOT})")  # fmt: skip
    p.add_argument("--steps", type=int, help="optimizer steps (default 300)")
    p.add_argument("--examples", type=int, help="corpus examples (default 20000)")
    p.add_argument("--seed", type=int, help="seed of corpus, tokenizer and weights (default 0)")
    p.add_argument("--force", action="store_true", help="rebuild even when cached")
    p.add_argument("--no-sample", action="store_true", help="do not print a sample answer")


def run(args: argparse.Namespace) -> int:
    """Run ``flywheel bootstrap-model``."""
    # Imported here: torch takes seconds to load, and other commands do not need it.
    from flywheel.trainer.bootstrap import BootstrapConfig, bootstrap_model, sample

    changes = {k: getattr(args, k) for k in ("steps", "examples", "seed") if getattr(args, k)}
    config = dataclasses.replace(BootstrapConfig(), **changes)
    path = bootstrap_model(args.output_root, config, force=args.force)
    print(f"base model: {path.resolve()}")
    if not args.no_sample:
        prompt, answer = sample(path, seed=config.seed)
        print(f"sample prompt: {prompt}\nsample answer: {answer}")
    return 0
