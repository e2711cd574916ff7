"""`flywheel train` by hand: a JSONL file or a snapshot id in, an adapter folder with the
manifest a service job publishes out; bad input is a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
from peft import PeftConfig

from flywheel.cli.main import main as flywheel
from flywheel.core.artifacts import LocalArtifactStore, sha256_file
from flywheel.core.layout import snapshot_file_key
from flywheel.trainer.manifest import read_manifest


def test_trains_from_a_file_into_an_adapter_folder_with_manifest(
    base_model: Path, datasets_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "acme-sft"
    code = flywheel([
        "train", "--base-model", str(base_model), "--dataset", str(datasets_dir / "sft.jsonl"),
        "--eval-dataset", str(datasets_dir / "sft-eval.jsonl"), "--method", "sft",
        "--adapter-type", "brand", "--task", "retail_media.budgeting", "--output", str(out),
        "--lora-r", "4", "--max-steps", "2", "--set", "logging_steps=1",
    ])  # fmt: skip
    assert code == 0
    assert "acme-sft" in capsys.readouterr().out
    manifest = read_manifest(out)
    assert manifest.adapter.name == "acme-sft"
    assert manifest.adapter.version.startswith("sha256-")
    assert manifest.adapter_type == "brand"
    assert manifest.lora.r == 4
    assert manifest.lineage.base_model_sha256.startswith("sha256:")
    assert "eval_loss" in manifest.metrics
    assert {f.path: f.sha256 for f in manifest.files} == {
        p.name: sha256_file(p) for p in out.iterdir() if p.name != "manifest.json"
    }
    assert PeftConfig.from_pretrained(str(out)).r == 4  # PEFT reads it unchanged


def test_trains_from_a_snapshot_id_in_the_artifact_store(
    base_model: Path, datasets_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalArtifactStore(tmp_path / "artifacts")
    snapshot = "sha256:" + "ab" * 32
    store.put_file(snapshot_file_key("acme", snapshot, "train"), datasets_dir / "preference.jsonl")
    store.put_bytes(snapshot_file_key("acme", snapshot, "eval"), b"")  # an empty eval split
    monkeypatch.setenv("FLYWHEEL_ARTIFACTS_DIR", str(store.root))
    out = tmp_path / "acme-dpo"
    code = flywheel([
        "train", "--base-model", str(base_model), "--dataset", snapshot, "--tenant", "acme",
        "--method", "dpo", "--output", str(out), "--lora-r", "4", "--max-steps", "1",
    ])  # fmt: skip
    assert code == 0
    assert read_manifest(out).lineage.dataset_snapshot_id == snapshot


def test_bad_input_is_a_clear_error(
    base_model: Path, datasets_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["train", "--base-model", str(base_model), "--output", str(tmp_path / "x")]
    assert flywheel([*common, "--dataset", str(datasets_dir / "sft.jsonl"), "--lora-r", "0"]) == 2
    assert "lora r" in capsys.readouterr().out
    wrong = [*common, "--dataset", str(datasets_dir / "sft.jsonl"), "--method", "dpo"]
    assert flywheel(wrong) == 2
    assert "lacks chosen, rejected" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="neither a file nor a snapshot id"):
        flywheel([*common, "--dataset", "nope.jsonl"])
    typo = [*common, "--dataset", str(datasets_dir / "sft.jsonl"), "--set", "lerning_rate=1"]
    assert flywheel(typo) == 2
    assert "lerning_rate" in capsys.readouterr().out
