"""Adapter composition by rank concatenation: several LoRA adapters served as one.

The composite's delta for every module is exactly sum_i w_i * scale_i * B_i @ A_i, as
PEFT's ``add_weighted_adapter(..., combination_type="cat")``: each component's weight and
LoRA scale are folded into its B block, the A blocks are stacked along the rank and the B
blocks side by side, and the composite's own scale is 1 (lora_alpha = r, no rsLoRA). Built
with numpy (the service never imports torch); the engine loads the result like any adapter.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from safetensors import TensorSpec, serialize

from flywheel.inference.validation import (
    CONFIG,
    WEIGHTS,
    lora_settings,
    lora_tensor,
    read_safetensors_header,
)

Array = npt.NDArray[np.floating[Any]]
# How each float dtype is stored: numpy's little-endian type, and safetensors' name for it
# when serializing. numpy has no bfloat16, so BF16 travels as its raw 16 bits.
STORED = {
    "F16": ("<f2", "float16"),
    "F32": ("<f4", "float32"),
    "F64": ("<f8", "float64"),
    "BF16": ("<u2", "bfloat16"),
}


@dataclass
class _Component:
    """One adapter to compose, its B blocks already multiplied by weight * scale."""

    rank: int
    a: dict[str, Array]  # module path -> lora_A [rank, in]
    b: dict[str, Array]  # module path -> weight * scale * lora_B [out, rank]
    dtypes: set[str]
    task_type: Any


def composite_key(components: Sequence[tuple[str, str, float]]) -> str:
    """A short stable name for the composite of these (adapter name, version, weight)
    components, in order (the order decides the composite's bytes)."""
    if not components:
        raise ValueError("a composite needs at least one component")
    # repr round-trips floats exactly; + 0.0 makes -0.0 and 0.0 one weight.
    parts = [[name, version, repr(float(weight) + 0.0)] for name, version, weight in components]
    return hashlib.sha256(json.dumps(["cat", parts]).encode()).hexdigest()[:16]


def compose_cat(components: Sequence[tuple[Path, float]], out: Path, *, base_model_id: str) -> Path:
    """Write the rank-concatenated composite of (adapter folder, weight) ``components`` as
    a PEFT adapter folder at ``out`` (replaced whole if it exists); returns ``out``.

    Components are validated adapters; one that is not plain LoRA raises `AdapterRejected`,
    components that disagree on a module's shape raise ValueError. Modules that only some
    components adapt get zero blocks from the others, so every module has the same rank.
    """
    if not components:
        raise ValueError("a composite needs at least one component")
    loaded = [_load(folder, weight) for folder, weight in components]
    dtypes = set().union(*(c.dtypes for c in loaded))
    dtype = dtypes.pop() if len(dtypes) == 1 else "F32"
    tensors: dict[str, Array] = {}
    for module in sorted(set().union(*(c.a for c in loaded))):
        in_features, out_features = _features(module, loaded)
        a_blocks = [c.a.get(module, np.zeros((c.rank, in_features), np.float32)) for c in loaded]
        b_blocks = [c.b.get(module, np.zeros((out_features, c.rank), np.float32)) for c in loaded]
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.concatenate(a_blocks, axis=0)
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.concatenate(b_blocks, axis=1)
    rank = sum(c.rank for c in loaded)
    config = {
        "peft_type": "LORA",
        "task_type": loaded[0].task_type,
        "base_model_name_or_path": base_model_id,
        "r": rank,
        "lora_alpha": rank,  # with use_rslora false: PEFT's scale is exactly 1
        "use_rslora": False,
        "use_dora": False,
        "target_modules": sorted({t.split(".")[-3] for t in tensors}),
        "bias": "none",
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    _write_folder(
        out,
        {
            CONFIG: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
            WEIGHTS: _serialize(tensors, dtype),
        },
    )
    return out


def _load(folder: Path, weight: float) -> _Component:
    """A component's LoRA blocks in the compute type, B scaled by weight * scale."""
    if not math.isfinite(weight):
        raise ValueError(f"{folder}: weight {weight} is not finite")
    config = json.loads((folder / CONFIG).read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{folder / CONFIG} is not a JSON object")
    lora = lora_settings(config, max_rank=2**31)
    tensors = _read_tensors(folder / WEIGHTS)
    a: dict[str, Array] = {}
    b: dict[str, Array] = {}
    for name, (_, values) in tensors.items():
        parsed = lora_tensor(name)
        if parsed is None or values.ndim != 2:
            raise ValueError(f"{folder / WEIGHTS}: {name} is not a LoRA weight")
        module, half = parsed
        if (values.shape[0] if half == "A" else values.shape[1]) != lora.r:
            raise ValueError(f"{folder / WEIGHTS}: {name} is {values.shape}, not rank {lora.r}")
        if half == "A":
            a[module] = values
        else:
            # One multiply in the compute type, by a factor formed in double precision.
            b[module] = values * values.dtype.type(weight * lora.scale)
    if a.keys() != b.keys():
        raise ValueError(f"{folder / WEIGHTS}: modules {sorted(a.keys() ^ b.keys())} are half")
    dtypes = {dtype for dtype, _ in tensors.values()}
    return _Component(lora.r, a, b, dtypes, config.get("task_type"))


def _read_tensors(path: Path) -> dict[str, tuple[str, Array]]:
    """name -> (stored dtype, values in float32, or float64 for F64) of a safetensors file.

    Read by the offsets of its checked header rather than with safetensors.numpy, which
    refuses BF16 files (numpy has no bfloat16)."""
    header = read_safetensors_header(path)
    data = path.read_bytes()
    out: dict[str, tuple[str, Array]] = {}
    for name, info in header.tensors.items():
        if info.dtype not in STORED:
            raise ValueError(f"{path}: {name} is {info.dtype}, not a float type")
        raw = np.frombuffer(
            data,
            dtype=STORED[info.dtype][0],
            count=math.prod(info.shape),
            offset=header.data_start + info.begin,
        ).reshape(info.shape)
        if info.dtype == "BF16":  # bfloat16 is the top half of a float32
            values: Array = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            values = raw.astype(np.float64 if info.dtype == "F64" else np.float32)
        out[name] = (info.dtype, values)
    return out


def _features(module: str, components: list[_Component]) -> tuple[int, int]:
    """(in, out) features of a module, the same in every component adapting it."""
    shapes = {(c.a[module].shape[1], c.b[module].shape[0]) for c in components if module in c.a}
    if len(shapes) != 1:
        raise ValueError(f"components disagree on the shape of {module}: {sorted(shapes)}")
    return shapes.pop()


def _to_bf16_bits(values: Array) -> npt.NDArray[np.uint16]:
    """float32 -> bfloat16 bits, rounding to nearest even as torch does."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16
    out = rounded.astype(np.uint16)
    out[np.isnan(values)] = 0x7FC0  # the rounding above could turn a NaN into an infinity
    return out


def _serialize(tensors: dict[str, Array], dtype: str) -> bytes:
    """The tensors as safetensors bytes in ``dtype`` (deterministic: safetensors orders the
    header by dtype and name)."""
    numpy_type, safetensors_name = STORED[dtype]
    stored = {
        name: _to_bf16_bits(values)
        if dtype == "BF16"
        else np.ascontiguousarray(values, dtype=numpy_type)
        for name, values in tensors.items()
    }
    specs = {
        name: TensorSpec(
            dtype=safetensors_name,
            shape=list(array.shape),
            data_ptr=array.ctypes.data,
            data_len=array.nbytes,
        )
        for name, array in stored.items()
    }
    # `stored` keeps the arrays the specs point into alive until serialize returns.
    return serialize(specs, metadata={"format": "pt"})


def _write_folder(out: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` into a fresh folder beside ``out``, then rename it into place, so a
    reader sees the old composite or the new one, never half of one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        building.chmod(0o755)  # mkdtemp's 0700 would hide it from an engine running as another user
        for name, data in files.items():
            (building / name).write_bytes(data)
        if out.exists():
            # rename() cannot replace a non-empty folder: move the old one aside first.
            old = Path(tempfile.mkdtemp(prefix=f".old-{out.name}-", dir=out.parent))
            os.replace(out, old)
            os.replace(building, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(building, out)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
