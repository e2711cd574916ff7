"""`flywheel dataset build`: the service's snapshot build, run by hand into a folder.

    flywheel dataset build --from-export feedback.jsonl --kind dpo \\
        --min-rating-chosen 4 --max-rating-rejected 2 --output out/
    flywheel dataset build --database-url postgresql+asyncpg://... --tenant acme --kind sft

The source is a feedback JSONL export (``GET /v1/feedback/export``) or the dataset
service's own database; the build is the service's (same curation, checks, split and
files), so the same data gives the same snapshot id. The folder gets the data files,
``lineage.jsonl``, ``quality.json`` and ``snapshot.json`` (id, spec, stats).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from tqdm import tqdm

from flywheel.contracts.feedback.v1 import resources_pb2 as fb
from flywheel.core.db import create_engine, is_sqlite, session_factory
from flywheel.core.errors import DomainError
from flywheel.dataset import ledger
from flywheel.dataset.builder import BuildResult, build
from flywheel.dataset.options import CONFLICT_RULES, KINDS, BuildOptions, check, to_spec
from flywheel.dataset.records import (
    FeedbackFact,
    GenerationText,
    fact_from_columns,
    generation_text,
    version_columns,
)
from flywheel.dataset.tokens import load_token_counter

# Method names people use for the kinds (``--kind dpo`` builds preference pairs).
KIND_ALIASES = {"dpo": "preference", "orpo": "preference", "kto": "unpaired", "rm": "reward"}


def read_export(path: Path) -> tuple[list[FeedbackFact], dict[str, GenerationText]]:
    """Facts and generations from a feedback JSONL export (one feedback per line)."""
    facts: list[FeedbackFact] = []
    generations: dict[str, GenerationText] = {}
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(tqdm(lines, desc="reading export", unit=" lines"), 1):
            if not line.strip():
                continue
            try:
                facts_of_line = _parse_line(json.loads(line), generations)
            except (ValueError, json_format.ParseError) as exc:
                raise SystemExit(f"flywheel dataset build: {path}:{number}: {exc}") from exc
            if facts_of_line is not None:
                facts.append(facts_of_line)
    return facts, generations


def _parse_line(
    line: dict[str, Any], generations: dict[str, GenerationText]
) -> FeedbackFact | None:
    # The export adds "source" (as a string), "kind" and "generation" to the Feedback.
    source = str(line.pop("source", "human"))
    line.pop("kind", None)
    for key in ("generation", "generation_b"):
        if key in line:
            generation = fb.Generation()
            json_format.ParseDict(line.pop(key), generation, ignore_unknown_fields=True)
            generations.setdefault(generation.generation_id, generation_text(generation))
    feedback = fb.Feedback()
    json_format.ParseDict(line, feedback, ignore_unknown_fields=True)
    if feedback.HasField("retracted_at"):
        return None
    occurred = feedback.updated_at if feedback.HasField("updated_at") else feedback.created_at
    columns = version_columns(
        feedback,
        event_id=f"feedback:{feedback.feedback_id}@{feedback.revision}",
        occurred_at=occurred.ToDatetime(UTC),
    )
    columns["source"] = source
    if columns["kind"] not in ledger.USABLE_KINDS:
        return None
    return fact_from_columns(columns)


async def read_database(
    url: str, tenant_id: str, options: BuildOptions
) -> tuple[list[FeedbackFact], dict[str, GenerationText]]:
    """Facts and generations from the dataset service's database, as of the cutoff."""
    engine = create_engine(url, schema=None if is_sqlite(url) else "dataset")
    try:
        return await ledger.load_facts(session_factory(engine), tenant_id, options)
    finally:
        await engine.dispose()


def write(result: BuildResult, output: Path) -> dict[str, Any]:
    """The build's files into ``output``; returns what snapshot.json says."""
    output.mkdir(parents=True, exist_ok=True)
    files = []
    for (split, fmt), data in sorted(result.files().items()):
        name = f"{split}.{fmt}.jsonl"
        (output / name).write_bytes(data)
        files.append({"file": name, "split": split, "format": fmt, "rows": result.rows(split)})
    (output / "lineage.jsonl").write_bytes(result.lineage())
    (output / "quality.json").write_bytes(result.report())
    spec = to_spec(result.options)
    spec.tokenizer = result.tokenizer
    summary = {
        "snapshot_id": result.snapshot_id,
        "spec": json_format.MessageToDict(spec, preserving_proto_field_name=True),
        "stats": result.stats(),
        "dropped_by_reason": result.dropped_by_reason(),
        "files": files,
    }
    (output / "snapshot.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return summary


def options_of(args: argparse.Namespace) -> BuildOptions:
    """The build options the command line asks for."""
    changes: dict[str, Any] = {"kind": KIND_ALIASES.get(args.kind, args.kind)}
    for field in dataclasses.fields(BuildOptions):
        value = getattr(args, field.name, None)
        if value is not None and field.name != "kind":
            changes[field.name] = value
    if args.cutoff is not None:
        changes["cutoff"] = datetime.fromisoformat(args.cutoff).astimezone(UTC)
    options = dataclasses.replace(BuildOptions(), **changes)
    check(options)
    return options


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``dataset build`` to the ``flywheel`` command line."""
    dataset = sub.add_parser("dataset", help="build training datasets by hand")
    actions = dataset.add_subparsers(dest="action", required=True)
    p = actions.add_parser(
        "build",
        help="build a snapshot from a feedback export or the dataset database into a folder",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-export", type=Path, help="feedback JSONL export file")
    source.add_argument("--database-url", help="the dataset service's database URL")
    p.add_argument("--tenant", help="tenant to build for (with --database-url)")
    p.add_argument("--output", type=Path, required=True, help="folder for the files")
    p.add_argument("--kind", default="sft", choices=[*KINDS, *KIND_ALIASES],
                   help="sft, preference (dpo, orpo), unpaired (kto) or reward (rm)")  # fmt: skip
    p.add_argument("--task", default="", help="only this task (default: every task)")
    p.add_argument("--tokenizer", help="tokenizer.json path or folder, or a model id")
    for name, kind in (
        ("sft_min_rating", int), ("min_rating_chosen", int), ("max_rating_rejected", int),
        ("min_rating_margin", int), ("max_prompt_tokens", int), ("max_completion_tokens", int),
        ("near_duplicate_threshold", float), ("human_weight", float),
        ("synthetic_weight", float), ("eval_fraction", float), ("seed", int),
    ):  # fmt: skip
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, dest=name)
    p.add_argument("--conflict-rule", choices=sorted(CONFLICT_RULES), dest="conflict_rule")
    p.add_argument("--human-only", action="store_true", default=None, dest="human_only")
    p.add_argument("--cutoff", help="only feedback before this ISO time (default: now)")


def run(args: argparse.Namespace) -> int:
    """Run ``flywheel dataset build``."""
    try:
        options = options_of(args)
        if options.cutoff == BuildOptions().cutoff and args.database_url:
            options = dataclasses.replace(options, cutoff=datetime.now(UTC))
        counter = load_token_counter(options.tokenizer)
        if args.from_export is not None:
            facts, generations = read_export(args.from_export)
            if options.task:
                facts = [f for f in facts if f.task == options.task]
        else:
            if not args.tenant:
                print(
                    "flywheel dataset build: --tenant is required with --database-url",
                    file=sys.stderr,
                )
                return 2
            facts, generations = asyncio.run(read_database(args.database_url, args.tenant, options))
    except DomainError as error:
        print(f"flywheel dataset build: {error.message}", file=sys.stderr)
        return 2
    result = build(_progress(facts), generations, options, counter)
    summary = write(result, args.output)
    stats = summary["stats"]
    print(f"snapshot {summary['snapshot_id']}")
    print(f"  {stats['train_rows']} train rows, {stats['eval_rows']} eval rows, "
          f"{stats['prompts']} prompts, {stats['tokens']} tokens")  # fmt: skip
    for reason, count in summary["dropped_by_reason"].items():
        print(f"  dropped {count}: {reason}")
    print(f"  written to {args.output}")
    return 0


def _progress(facts: list[FeedbackFact]) -> Iterator[FeedbackFact]:
    return iter(tqdm(facts, desc="curating", unit=" feedback", leave=False))
