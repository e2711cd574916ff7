"""`flywheel train`: run any recipe by hand, outside the service, with a progress bar.

    flywheel train --base-model ./model --dataset pairs.jsonl --method dpo --output ./acme-dpo
    flywheel train --base-model ./model --dataset sha256:... --tenant acme --method sft \\
        --adapter-type brand --lora-r 8 --num-epochs 2 --qlora --output ./acme-sft
    flywheel train ... --method grpo --reward-function retail_media.budgeting
    flywheel train ... --set beta=0.05 --set 'loss_type=["ipo"]'

``--dataset`` is a TRL-column JSONL file or a dataset snapshot id (read from the artifact
store, FLYWHEEL_ARTIFACTS_DIR or FLYWHEEL_DATA_DIR/artifacts, with ``--tenant``). The
output folder holds the PEFT adapter (safetensors, adapter_config.json) and the same
manifest.json a service job publishes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from flywheel.trainer.spec import METHODS, LoraSettings, TrainSpec


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``train`` to the ``flywheel`` command line."""
    p = sub.add_parser(
        "train",
        help="train a LoRA adapter with any recipe (sft, dpo, kto, orpo, reward, grpo, rloo)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]) if __doc__ else None,
    )
    p.add_argument("--base-model", required=True, help="Hugging Face id or local folder")
    p.add_argument("--dataset", required=True, help="TRL-column JSONL file or snapshot id")
    p.add_argument("--eval-dataset", help="eval JSONL file (default: a snapshot's eval split)")
    p.add_argument("--tenant", help="tenant of a snapshot id")
    p.add_argument("--method", choices=METHODS, default="sft")
    p.add_argument("--output", type=Path, required=True, help="folder for the adapter")
    p.add_argument("--adapter-name", help="default: the output folder's name")
    p.add_argument("--adapter-type", default="task", help="brand, retailer, task or a domain's own")
    p.add_argument("--task", default="", help="task type it is for, e.g. retail_media.budgeting")
    p.add_argument("--parent-adapter", type=Path, help="continue training this adapter folder")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--target-modules", nargs="*", default=[], help="default: every linear layer")
    p.add_argument("--qlora", action="store_true", help="4-bit NF4 base (bitsandbytes)")
    p.add_argument("--num-epochs", type=float, help="num_train_epochs")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--batch-size", type=int, help="per_device_train_batch_size")
    p.add_argument(
        "--reward-function", action="append", default=[], help="online RL reward (repeatable)"
    )
    p.add_argument("--reward-dimension", default="", help="reward: learn one critic dimension")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any TRL config option; VALUE is JSON or a plain string")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every N steps")
    p.add_argument("--work-dir", type=Path, help="checkpoints folder; a rerun resumes from it")


def _hyperparameters(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    named = {
        "num_train_epochs": args.num_epochs,
        "max_steps": args.max_steps,
        "learning_rate": args.learning_rate,
        "per_device_train_batch_size": args.batch_size,
    }
    out.update({k: v for k, v in named.items() if v is not None})
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set wants KEY=VALUE, not {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _data_files(args: argparse.Namespace, scratch: Path) -> tuple[Path, Path | None, str]:
    """Train file, eval file and snapshot id of ``--dataset`` (snapshot files are copied
    out of the artifact store into ``scratch``)."""
    path = Path(args.dataset)
    eval_file = Path(args.eval_dataset) if args.eval_dataset else None
    if path.is_file():
        return path, eval_file, ""
    if not args.dataset.startswith("sha256:"):
        raise SystemExit(
            f"--dataset {args.dataset!r} is neither a file nor a snapshot id (sha256:...)"
        )
    if not args.tenant:
        raise SystemExit("a snapshot id needs --tenant")
    from flywheel.core.artifacts import LocalArtifactStore, copy_out
    from flywheel.core.config import ServiceSettings
    from flywheel.core.layout import snapshot_file_key

    store = LocalArtifactStore(ServiceSettings().resolved_artifacts_dir)
    train_key = snapshot_file_key(args.tenant, args.dataset, "train")
    if not store.exists(train_key):
        raise SystemExit(f"snapshot {args.dataset} of tenant {args.tenant} is not in {store.root}")
    eval_key = snapshot_file_key(args.tenant, args.dataset, "eval")
    if eval_file is None and store.exists(eval_key) and store.info(eval_key).size:
        eval_file = copy_out(store, eval_key, scratch / "eval.jsonl")
    return copy_out(store, train_key, scratch / "train.jsonl"), eval_file, args.dataset


def spec_from_args(args: argparse.Namespace, scratch: Path) -> TrainSpec:
    """The `TrainSpec` the command line describes."""
    train_file, eval_file, snapshot_id = _data_files(args, scratch)
    return TrainSpec(
        method=args.method,
        base_model=args.base_model,
        train_file=train_file,
        eval_file=eval_file,
        adapter_name=args.adapter_name or args.output.resolve().name,
        adapter_type=args.adapter_type,
        task=args.task,
        lora=LoraSettings(
            r=args.lora_r,
            alpha=args.lora_alpha,
            dropout=args.lora_dropout,
            target_modules=tuple(args.target_modules),
        ),
        qlora=args.qlora,
        hyperparameters=_hyperparameters(args),
        seed=args.seed,
        reward_functions=tuple(args.reward_function),
        parent_adapter=args.parent_adapter,
        checkpoint_every=args.checkpoint_every,
        dataset_snapshot_id=snapshot_id,
        reward_dimension=args.reward_dimension,
    )


def run(args: argparse.Namespace) -> int:
    """Run ``flywheel train``."""
    with tempfile.TemporaryDirectory(prefix="flywheel-train-") as scratch:
        spec = spec_from_args(args, Path(scratch))
        problems = spec.problems()
        for problem in problems:
            print(f"error: {problem}")
        return 2 if problems else _train(spec, args, args.work_dir or Path(scratch) / "work")


def _train(spec: TrainSpec, args: argparse.Namespace, work_dir: Path) -> int:
    # Imported here: torch and TRL take seconds to load.
    from tqdm import tqdm

    from flywheel.contracts.common.v1.common_pb2 import AdapterRef
    from flywheel.trainer import manifest, training
    from flywheel.trainer.progress import Progress

    bar = tqdm(total=0, unit="step", desc=f"{spec.method} {spec.adapter_name}")

    def report(p: Progress) -> None:
        bar.total = p.total_steps
        bar.update(p.step - bar.n)
        loss = "-" if p.loss is None else f"{p.loss:.4f}"
        bar.set_postfix_str(f"loss {loss}, {p.tokens_per_second:.0f} tok/s")

    try:
        outcome = training.run(spec, work_dir, on_progress=report)
    except (training.SpecError, ValueError, KeyError) as exc:
        print(f"error: {exc}")
        return 2
    finally:
        bar.close()
    version = "sha256-" + manifest.content_digest(outcome.adapter_dir)[:16]
    built = manifest.build_manifest(
        spec, outcome, tenant_id=args.tenant or "", parent=manifest.parent_ref(spec.parent_adapter),
        adapter=AdapterRef(name=spec.adapter_name, version=version),
    )  # fmt: skip
    manifest.write_folder(built, outcome.adapter_dir, args.output)
    shown = {k: v for k, v in sorted(outcome.metrics.items()) if "loss" in k or "margin" in k}
    print(f"adapter {spec.adapter_name} {version}: {args.output.resolve()}")
    print(f"{outcome.steps} steps; " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    return 0
