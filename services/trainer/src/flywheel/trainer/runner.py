"""The process that trains one job: ``python -m flywheel.trainer.runner WORK_DIR``.

The service runs every job in its own process, so cancelling is a signal, a crash (or
an out-of-memory kill) takes down the job and not the service, and a GPU's memory is
whole again when the process exits. The work folder is the whole interface:

- ``spec.json`` (in): the `TrainSpec`;
- ``progress.jsonl`` (out): one `Progress` per line as training logs;
- ``outcome.json`` (out, written atomically when training is done): the `Outcome`;
- ``checkpoints/`` and ``adapter/``: see training.py.

Started again on the same folder, it resumes from the newest complete checkpoint.
stdout/stderr are the job's log.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

SPEC = "spec.json"
PROGRESS = "progress.jsonl"
OUTCOME = "outcome.json"
ARTIFACTS_ENV = "FLYWHEEL_ARTIFACTS_DIR"


@dataclasses.dataclass(frozen=True)
class RecordedOutcome:
    """A finished run's outcome as the job process recorded it in outcome.json."""

    adapter_dir: Path
    metrics: dict[str, float]
    hyperparameters: dict[str, Any]
    lora: dict[str, Any]
    steps: int
    resumed_from_step: int | None

    @classmethod
    def read(cls, work_dir: Path) -> RecordedOutcome | None:
        data = read_outcome(work_dir)
        if data is None:
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        return cls(**{**values, "adapter_dir": Path(data["adapter_dir"])})


def read_outcome(work_dir: Path) -> dict[str, Any] | None:
    """The finished run's outcome, or None while there is none."""
    try:
        data: dict[str, Any] = json.loads((work_dir / OUTCOME).read_text())
    except FileNotFoundError:
        return None
    return data


def run_job(work_dir: Path, callbacks: list[Any] | None = None) -> int:
    """Train the spec in ``work_dir``; 0 on success, 2 for a spec that cannot run."""
    # Imported here so `--help` and the service's imports stay light.
    from flywheel.core.artifacts import LocalArtifactStore, atomic_write_text
    from flywheel.trainer import training
    from flywheel.trainer.progress import Progress
    from flywheel.trainer.spec import TrainSpec

    log = logging.getLogger("flywheel.trainer.runner")
    spec = TrainSpec.from_json(json.loads((work_dir / SPEC).read_text()))
    store = (
        LocalArtifactStore(Path(os.environ[ARTIFACTS_ENV])) if ARTIFACTS_ENV in os.environ else None
    )
    progress_file = (work_dir / PROGRESS).open("a", encoding="utf-8")

    def report(p: Progress) -> None:
        progress_file.write(json.dumps(dataclasses.asdict(p)) + "\n")
        progress_file.flush()
        loss = "-" if p.loss is None else f"{p.loss:.4f}"
        log.info(
            "step %d/%d loss %s tokens/s %.0f", p.step, p.total_steps, loss, p.tokens_per_second
        )

    try:
        outcome = training.run(
            spec, work_dir, on_progress=report, artifacts=store, callbacks=callbacks
        )
    except training.SpecError as exc:
        log.error("the spec cannot run: %s", exc)
        return 2
    finally:
        progress_file.close()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under accelerate, rank 0 records the outcome for all
    result = dataclasses.asdict(outcome)
    result["adapter_dir"] = str(outcome.adapter_dir)
    text = json.dumps(result, indent=1, sort_keys=True, default=str)
    atomic_write_text(work_dir / OUTCOME, text, durable=True)
    resumed = outcome.resumed_from_step
    how = f"resumed from step {resumed}" if resumed is not None else "from the start"
    log.info("done: %d steps, %s; adapter in %s", outcome.steps, how, outcome.adapter_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the job process."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m flywheel.trainer.runner WORK_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return run_job(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main())
