"""Composition by rank concatenation against PEFT's own ``add_weighted_adapter(cat)`` and
against the exact weighted sum of the components' deltas, on the tiny base model."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from flywheel.core.artifacts import sha256_tree
from flywheel.inference.composition import _to_bf16_bits, compose_cat, composite_key
from flywheel.inference.validation import (
    AdapterRejected,
    BaseModelFacts,
    read_safetensors_header,
    validate_adapter,
)

IDS = torch.tensor([[1, 5, 42, 7, 99, 3, 250, 12], [1, 8, 8, 300, 17, 64, 2, 0]])


@pytest.fixture(scope="module")
def components(make_adapter: Callable[..., Path]) -> dict[str, Path]:
    """Adapters of different ranks over different module sets, one of them rsLoRA."""
    return {
        "a": make_adapter(4, 8.0, ("q_proj", "v_proj"), seed=1),
        "b": make_adapter(2, 4.0, ("q_proj", "k_proj", "down_proj"), seed=2),
        "c": make_adapter(
            8, 16.0, ("v_proj", "o_proj", "up_proj", "gate_proj"), use_rslora=True, seed=3
        ),
    }


def load_base(base_model: Path) -> Any:
    """The tiny base in fp32 (from_pretrained leaves it in eval mode)."""
    return AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=IDS).logits
    return out


def peft_cat(base_model: Path, parts: Sequence[tuple[Path, float]]) -> torch.Tensor:
    """Logits of PEFT's own cat composition of ``parts``."""
    model = PeftModel.from_pretrained(load_base(base_model), str(parts[0][0]), adapter_name="c0")
    for i, (folder, _) in enumerate(parts[1:], start=1):
        model.load_adapter(str(folder), adapter_name=f"c{i}")
    names = [f"c{i}" for i in range(len(parts))]
    model.add_weighted_adapter(names, [w for _, w in parts], "cat", combination_type="cat")
    model.set_adapter("cat")
    return logits(model)


def composite_logits(base_model: Path, folder: Path) -> torch.Tensor:
    return logits(PeftModel.from_pretrained(load_base(base_model), str(folder)))


def deltas(parts: Sequence[tuple[Path, float]]) -> dict[str, torch.Tensor]:
    """module path -> sum_i w_i * scale_i * B_i @ A_i in float64, from the files alone."""
    out: dict[str, torch.Tensor] = {}
    for folder, weight in parts:
        config = json.loads((folder / "adapter_config.json").read_text())
        r, alpha = config["r"], config["lora_alpha"]
        scale = alpha / (math.sqrt(r) if config["use_rslora"] else r)
        tensors = load_file(folder / "adapter_model.safetensors")
        for name, a in tensors.items():
            if ".lora_A." in name:
                b = tensors[name.replace(".lora_A.", ".lora_B.")]
                module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                delta = weight * scale * (b.double() @ a.double())
                out[module] = out.get(module, torch.zeros_like(delta)) + delta
    return out


def merged_logits(base_model: Path, parts: Sequence[tuple[Path, float]]) -> torch.Tensor:
    """Logits of the base with the exact weighted deltas added to its weights."""
    model = load_base(base_model)
    with torch.no_grad():
        for module, delta in deltas(parts).items():
            weight = model.get_submodule(module).weight
            weight.copy_((weight.double() + delta).float())
    return logits(model)


@pytest.mark.parametrize(
    "recipe",
    [[("a", 0.7), ("b", 0.3)], [("b", 1.0), ("a", -0.5)], [("a", 0.5), ("c", 0.3), ("b", -0.2)]],
    ids=["0.7a+0.3b", "b-0.5a", "a+rslora c+b"],
)
def test_same_as_peft_cat(
    recipe: list[tuple[str, float]],
    components: dict[str, Path],
    base_model: Path,
    tmp_path: Path,
) -> None:
    # PEFT's composite keeps its first adapter's use_rslora, which is only exact when that
    # one is plain LoRA: every recipe here starts with one.
    parts = [(components[name], weight) for name, weight in recipe]
    out = compose_cat(parts, tmp_path / "composite", base_model_id=str(base_model))
    ours = composite_logits(base_model, out)
    torch.testing.assert_close(ours, peft_cat(base_model, parts))
    torch.testing.assert_close(ours, merged_logits(base_model, parts), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, logits(load_base(base_model)), atol=1e-2)


def test_rslora_first(components: dict[str, Path], base_model: Path, tmp_path: Path) -> None:
    """An rsLoRA component first: still the exact weighted sum (PEFT's cat is not, here)."""
    parts = [(components["c"], 0.6), (components["a"], 0.4)]
    out = compose_cat(parts, tmp_path / "composite", base_model_id=str(base_model))
    expected = merged_logits(base_model, parts)
    torch.testing.assert_close(composite_logits(base_model, out), expected, rtol=1e-5, atol=1e-5)
    # PEFT's composite keeps c's use_rslora: scaled by sqrt(12), not 1.
    assert not torch.allclose(peft_cat(base_model, parts), expected, atol=1e-3)


def test_layout(components: dict[str, Path], base_model: Path, tmp_path: Path) -> None:
    """One rank for every module, scale 1, zero blocks where a component does not reach,
    and the delta of every module exactly the weighted sum."""
    parts = [(components["a"], 0.7), (components["b"], 0.3), (components["c"], 0.2)]
    out = compose_cat(parts, tmp_path / "composite", base_model_id=str(base_model))
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (14, 14, False)
    assert config["base_model_name_or_path"] == str(base_model)
    assert config["target_modules"] == sorted(
        {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    )
    tensors = load_file(out / "adapter_model.safetensors")
    assert {t.shape[0] for n, t in tensors.items() if ".lora_A." in n} == {14}
    assert {t.shape[1] for n, t in tensors.items() if ".lora_B." in n} == {14}
    k_b = tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"]
    # k_proj is b's alone: a's 4 ranks and c's 8 around b's 2 are zero.
    assert k_b[:, 4:6].any()
    assert not k_b[:, :4].any()
    assert not k_b[:, 6:].any()
    for module, delta in deltas(parts).items():
        a = tensors[f"base_model.model.{module}.lora_A.weight"].double()
        b = tensors[f"base_model.model.{module}.lora_B.weight"].double()
        torch.testing.assert_close(b @ a, delta, rtol=1e-5, atol=1e-6)


def test_composite_passes_validation(
    components: dict[str, Path], base_model: Path, tmp_path: Path
) -> None:
    parts = [(components["a"], 0.5), (components["c"], 0.5)]
    out = compose_cat(parts, tmp_path / "composite", base_model_id=str(base_model))
    files = [{"path": p, "sha256": d} for p, d in sha256_tree(out).items()]
    manifest = {"files": files, "lineage": {"baseModel": str(base_model)}}
    facts = BaseModelFacts.from_model_folder(base_model, str(base_model), hash_weights=False)
    validated = validate_adapter(out, manifest, facts, max_rank=16)
    assert (validated.rank, validated.alpha, validated.use_rslora) == (12, 12.0, False)
    assert validated.target_modules == {"q_proj", "v_proj", "o_proj", "up_proj", "gate_proj"}


def test_deterministic(components: dict[str, Path], base_model: Path, tmp_path: Path) -> None:
    parts = [(components["a"], 0.7), (components["b"], 0.3)]
    first = compose_cat(parts, tmp_path / "one", base_model_id="base")
    second = compose_cat(parts, tmp_path / "two", base_model_id="base")
    assert sha256_tree(first) == sha256_tree(second)
    assert sorted(p.name for p in first.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    # Rewriting in place replaces the folder whole and leaves nothing behind.
    (first / "stale.txt").write_text("old")
    again = compose_cat(parts, first, base_model_id="base")
    assert sha256_tree(again) == sha256_tree(second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]


def retyped(folder: Path, dtype: torch.dtype, target: Path) -> Path:
    """A copy of an adapter folder with its weights stored as ``dtype``."""
    from safetensors.torch import save_file

    shutil.copytree(folder, target)
    weights = target / "adapter_model.safetensors"
    save_file({k: v.to(dtype) for k, v in load_file(weights).items()}, weights)
    return target


@pytest.mark.parametrize(
    ("first", "second", "stored"),
    [
        (torch.float16, torch.float16, "F16"),
        (torch.bfloat16, torch.bfloat16, "BF16"),
        (torch.bfloat16, torch.float16, "F32"),
        (torch.float32, torch.float16, "F32"),
    ],
)
def test_dtypes(
    first: torch.dtype,
    second: torch.dtype,
    stored: str,
    components: dict[str, Path],
    tmp_path: Path,
) -> None:
    parts = [
        (retyped(components["a"], first, tmp_path / "a"), 0.7),
        (retyped(components["b"], second, tmp_path / "b"), 0.3),
    ]
    out = compose_cat(parts, tmp_path / "composite", base_model_id="base")
    header = read_safetensors_header(out / "adapter_model.safetensors")
    assert {t.dtype for t in header.tensors.values()} == {stored}
    tensors = load_file(out / "adapter_model.safetensors")
    for module, delta in deltas(parts).items():
        a = tensors[f"base_model.model.{module}.lora_A.weight"].double()
        b = tensors[f"base_model.model.{module}.lora_B.weight"].double()
        # The composite rounds once more to the stored type: within that type's precision.
        tolerance = {"F16": 2e-3, "BF16": 2e-2, "F32": 1e-5}[stored]
        torch.testing.assert_close(b @ a, delta, rtol=tolerance, atol=tolerance)


def test_bf16_rounds_to_nearest_even(components: dict[str, Path], tmp_path: Path) -> None:
    """Our float32 -> bfloat16 cast gives torch's bits."""
    source = retyped(components["a"], torch.bfloat16, tmp_path / "a")
    out = compose_cat([(source, 1.0)], tmp_path / "composite", base_model_id="base")
    ours = load_file(out / "adapter_model.safetensors")
    for name, original in load_file(source / "adapter_model.safetensors").items():
        if ".lora_B." in name:  # B is scaled by alpha / r = 2: exact in bfloat16 too
            torch.testing.assert_close(
                ours[name], (original.float() * 2).bfloat16(), rtol=0, atol=0
            )
    # Ties to even (down, then up), a subnormal, overflow to infinity, NaN.
    values = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(2.0**-130), 3.4e38, np.nan], np.float32)
    bits = _to_bf16_bits(values)
    expected = torch.from_numpy(values).bfloat16()
    assert (bits[:4] == expected[:4].view(torch.int16).numpy().view(np.uint16)).all()
    assert torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)[4].isnan()


def test_refusals(
    components: dict[str, Path], make_adapter: Callable[..., Path], tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="at least one"):
        compose_cat([], tmp_path / "x", base_model_id="base")
    with pytest.raises(ValueError, match="not finite"):
        compose_cat([(components["a"], math.nan)], tmp_path / "x", base_model_id="base")
    with pytest.raises(AdapterRejected, match="DoRA"):
        compose_cat([(make_adapter(use_dora=True), 1.0)], tmp_path / "x", base_model_id="base")
    assert not (tmp_path / "x").exists()


def test_composite_key() -> None:
    key = composite_key([("brand", "v3", 0.7), ("task", "v1", 0.3)])
    assert key == composite_key([("brand", "v3", 0.7), ("task", "v1", 0.3)])
    assert len(key) == 16
    assert int(key, 16) >= 0
    assert key != composite_key([("task", "v1", 0.3), ("brand", "v3", 0.7)])
    assert key != composite_key([("brand", "v3", 0.7), ("task", "v1", 0.31)])
    assert key != composite_key([("brand", "v4", 0.7), ("task", "v1", 0.3)])
    # The same weight however it is written.
    assert composite_key([("a", "v", 1)]) == composite_key([("a", "v", 1.0)])
    assert composite_key([("a", "v", -0.0)]) == composite_key([("a", "v", 0.0)])
    # Names cannot run into each other.
    assert composite_key([("a", "bc", 1.0)]) != composite_key([("ab", "c", 1.0)])
    # Stable across processes and releases: composites are cached under it.
    assert key == KEY
    with pytest.raises(ValueError, match="at least one"):
        composite_key([])


KEY = "6f42554051b202fb"
