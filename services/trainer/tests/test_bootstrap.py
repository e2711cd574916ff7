"""`flywheel bootstrap-model` on a tiny configuration: a real tokenizer and a real Llama."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flywheel.cli.main import main as flywheel
from flywheel.trainer.bootstrap import BootstrapConfig, bootstrap_model, sample

TINY = BootstrapConfig(
    examples=300, vocab_size=400, hidden_size=32, intermediate_size=64, layers=2, heads=2,
    seq_len=64, batch_size=4, steps=40, warmup_steps=5,
)  # fmt: skip


def test_builds_a_loadable_model_that_learned_and_is_cached(tmp_path: Path) -> None:
    path = bootstrap_model(tmp_path, TINY, progress=False)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["final_loss"] < manifest["first_loss"] - 1.0  # it learned the corpus
    assert "model.safetensors" in manifest["files"]
    assert not list(path.glob("*.bin"))  # safetensors only

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Allocate $10,000"}], add_generation_prompt=True,
        tokenize=False,
    )  # fmt: skip
    assert text == "<|bos|><|user|>\nAllocate $10,000\n<|assistant|>\n"
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[0]) == text  # byte-level: the text round-trips
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))

    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert bootstrap_model(tmp_path, TINY, progress=False) == path  # cached: not rebuilt
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    prompt, answer = sample(path)
    assert "ROAS" in prompt
    assert isinstance(answer, str)


def test_same_seed_same_weights_other_seed_other_folder(tmp_path: Path) -> None:
    first = bootstrap_model(tmp_path / "a", TINY, progress=False)
    again = bootstrap_model(tmp_path / "b", TINY, progress=False)
    files = json.loads((first / "manifest.json").read_text())["files"]
    assert files == json.loads((again / "manifest.json").read_text())["files"]
    other = bootstrap_model(tmp_path / "a", BootstrapConfig(**{**TINY.__dict__, "seed": 1}),
                            progress=False)  # fmt: skip
    assert other != first


def test_the_command_prints_the_folder(tmp_path: Path, capsys: object) -> None:
    code = flywheel(["bootstrap-model", "--output-root", str(tmp_path), "--steps", "2",
                     "--examples", "200", "--no-sample"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    folder = Path(out.split("base model: ", 1)[1].strip())
    assert (folder / "manifest.json").is_file()
