"""Adapter validation against real PEFT adapters: a published adapter passes, and each kind
of corruption is refused with its own reason code, the rest of the adapter left intact."""

from __future__ import annotations

import json
import pickle
import random
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from google.protobuf import json_format
from safetensors.numpy import load_file, save_file

from flywheel.core.artifacts import sha256_file, sha256_tree
from flywheel.inference import validation
from flywheel.inference.validation import (
    REASON_CODES,
    AdapterRejected,
    BaseModelFacts,
    ValidatedAdapter,
    check_name,
    read_safetensors_header,
    validate_adapter,
)
from flywheel.trainer.fingerprints import base_model_digest
from flywheel.trainer.manifest import read_manifest

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.fixture(scope="module")
def facts(base_model: Path) -> BaseModelFacts:
    return BaseModelFacts.from_model_folder(base_model, str(base_model))


@pytest.fixture
def adapter(make_adapter: Callable[..., Path], tmp_path: Path) -> Path:
    """A private copy of a published r=4, alpha=8 adapter on q_proj and v_proj."""
    return Path(shutil.copytree(make_adapter(), tmp_path / "adapter"))


def manifest_of(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / "manifest.json").read_text())
    return data


def rehash(folder: Path) -> dict[str, Any]:
    """Record the folder's current files in its manifest, as if the trainer had published
    them so: the corruption under test is then the only thing wrong."""
    data = manifest_of(folder)
    data["files"] = [
        {"path": path, "sha256": digest, "sizeBytes": str((folder / path).stat().st_size)}
        for path, digest in sha256_tree(folder, skip=frozenset({"manifest.json"})).items()
    ]
    (folder / "manifest.json").write_text(json.dumps(data))
    return data


def edit_config(folder: Path, **changes: Any) -> dict[str, Any]:
    config = json.loads((folder / CONFIG).read_text())
    (folder / CONFIG).write_text(json.dumps({**config, **changes}))
    return rehash(folder)


def edit_tensors(folder: Path, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    tensors = load_file(folder / WEIGHTS)
    change(tensors)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    return rehash(folder)


def rejected(
    folder: Path, manifest: dict[str, Any], facts: BaseModelFacts, max_rank: int = 16
) -> AdapterRejected:
    """The rejection of ``folder``, checking that validation left the folder as it was."""
    before = sha256_tree(folder)
    with pytest.raises(AdapterRejected) as caught:
        validate_adapter(folder, manifest, facts, max_rank=max_rank)
    assert sha256_tree(folder) == before
    assert caught.value.code in REASON_CODES
    return caught.value


def test_published_adapter_passes(adapter: Path, facts: BaseModelFacts) -> None:
    result = validate_adapter(adapter, manifest_of(adapter), facts, max_rank=16)
    assert result == ValidatedAdapter(
        rank=4,
        alpha=8.0,
        use_rslora=False,
        target_modules=frozenset({"q_proj", "v_proj"}),
        files={p: sha256_file(adapter / p) for p in ("README.md", CONFIG, WEIGHTS)},
    )


def test_snake_case_manifest_passes(adapter: Path, facts: BaseModelFacts) -> None:
    """json_format reads both spellings of a manifest: so does validation."""
    snake = json_format.MessageToDict(read_manifest(adapter), preserving_proto_field_name=True)
    assert validate_adapter(adapter, snake, facts, max_rank=16).rank == 4


def test_base_facts(base_model: Path, facts: BaseModelFacts) -> None:
    assert facts.num_layers == 2
    assert facts.module_shapes["q_proj"] == (32, 32)
    assert facts.module_shapes["up_proj"] == (32, 64)
    assert facts.module_shapes["down_proj"] == (64, 32)
    # The digest the trainer records in manifests, computed without the trainer.
    assert facts.weights_sha256 == base_model_digest(str(base_model))
    cheap = BaseModelFacts.from_model_folder(base_model, "tiny", hash_weights=False)
    assert cheap.weights_sha256 is None
    assert cheap.module_shapes == facts.module_shapes


def test_base_facts_grouped_query_attention(tmp_path: Path) -> None:
    config = {
        "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 8,
        "num_key_value_heads": 2, "num_hidden_layers": 3,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    facts = BaseModelFacts.from_model_folder(tmp_path, "gqa")
    assert (facts.module_shapes["q_proj"], facts.module_shapes["k_proj"]) == ((64, 64), (64, 16))
    assert facts.module_shapes["o_proj"] == (64, 64)
    assert facts.num_layers == 3
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"config\.json"):
        BaseModelFacts.from_model_folder(tmp_path, "gqa")


def test_service_modules_do_not_import_torch() -> None:
    code = (
        "import sys, flywheel.inference.validation, flywheel.inference.composition; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.parametrize("name", ["acme", "A", "brand-x_2.v7", "v" + "1" * 127])
def test_good_names(name: str) -> None:
    check_name(name, "adapter name")


@pytest.mark.parametrize(
    "name", ["", "..", "a..b", "-a", ".hidden", "a/b", "a\\b", "a b", "é", "x" * 129, "a\n"]
)
def test_unsafe_names(name: str) -> None:
    with pytest.raises(AdapterRejected) as caught:
        check_name(name, "tenant")
    assert caught.value.code == "unsafe_path"
    assert "tenant" in caught.value.reason


def truncate(
    size: Callable[[int], int], *, rehashed: bool = True
) -> Callable[[Path], dict[str, Any]]:
    def corrupt(folder: Path) -> dict[str, Any]:
        data = (folder / WEIGHTS).read_bytes()
        (folder / WEIGHTS).write_bytes(data[: size(len(data))])
        return rehash(folder) if rehashed else manifest_of(folder)

    return corrupt


def flip_byte(name: str) -> Callable[[Path], dict[str, Any]]:
    def corrupt(folder: Path) -> dict[str, Any]:
        data = bytearray((folder / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (folder / name).write_bytes(bytes(data))
        return manifest_of(folder)

    return corrupt


def add_file(name: str, content: bytes, *, listed: bool) -> Callable[[Path], dict[str, Any]]:
    def corrupt(folder: Path) -> dict[str, Any]:
        (folder / name).write_bytes(content)
        return rehash(folder) if listed else manifest_of(folder)

    return corrupt


def list_path(path: str) -> Callable[[Path], dict[str, Any]]:
    def corrupt(folder: Path) -> dict[str, Any]:
        data = manifest_of(folder)
        data["files"].append({"path": path, "sha256": "0" * 64, "sizeBytes": "1"})
        return data

    return corrupt


def torch_pickle(folder: Path) -> dict[str, Any]:
    torch.save({"w": torch.zeros(2)}, folder / WEIGHTS)
    return rehash(folder)


def symlink_file(folder: Path) -> dict[str, Any]:
    outside = folder.parent / "README.md"
    shutil.copy(folder / "README.md", outside)
    (folder / "README.md").unlink()
    (folder / "README.md").symlink_to(outside)
    return manifest_of(folder)  # same bytes, same sha256: only the link is wrong


def symlink_folder(folder: Path) -> dict[str, Any]:
    (folder.parent / "elsewhere").mkdir()
    (folder / "sub").symlink_to(folder.parent / "elsewhere")
    return manifest_of(folder)


def remove(name: str) -> Callable[[Path], dict[str, Any]]:
    def corrupt(folder: Path) -> dict[str, Any]:
        (folder / name).unlink()
        return manifest_of(folder)

    return corrupt


def lineage(**changes: str) -> Callable[[Path], dict[str, Any]]:
    def corrupt(folder: Path) -> dict[str, Any]:
        data = manifest_of(folder)
        data["lineage"].update(changes)
        return data

    return corrupt


def config(**changes: Any) -> Callable[[Path], dict[str, Any]]:
    return lambda folder: edit_config(folder, **changes)


def tensors(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], dict[str, Any]]:
    return lambda folder: edit_tensors(folder, change)


def rename_module(old: str, new: str) -> Callable[[dict[str, Any]], None]:
    def change(values: dict[str, Any]) -> None:
        for name in [n for n in values if old in n]:
            values[name.replace(old, new)] = values.pop(name)

    return change


def reshape_a(values: dict[str, Any]) -> None:
    values[Q_A] = values[Q_A][:, :31].copy()


def drop_b(values: dict[str, Any]) -> None:
    del values[Q_B]


def add_tensor(values: dict[str, Any]) -> None:
    values["base_model.model.lm_head.weight"] = values[Q_B].copy()


def manifest_lora_r(folder: Path) -> dict[str, Any]:
    data = manifest_of(folder)
    data["lora"]["r"] = 8
    return data


CORRUPTIONS: dict[str, tuple[Callable[[Path], dict[str, Any]], str]] = {
    "truncated, manifest unchanged": (
        truncate(lambda n: n // 2, rehashed=False),
        "sha256_mismatch",
    ),
    "truncated to nothing": (truncate(lambda n: 0), "not_safetensors"),
    "truncated in the length": (truncate(lambda n: 5), "not_safetensors"),
    "truncated in the header": (truncate(lambda n: 40), "not_safetensors"),
    "truncated in the data": (truncate(lambda n: n - 1), "not_safetensors"),
    "flipped weight byte": (flip_byte(WEIGHTS), "sha256_mismatch"),
    "flipped config byte": (flip_byte(CONFIG), "sha256_mismatch"),
    "extra pickle": (
        add_file("extra.pkl", pickle.dumps({"a": 1}), listed=False),
        "not_safetensors",
    ),
    "listed .bin weights": (
        add_file("adapter_model.bin", b"\0" * 8, listed=True),
        "not_safetensors",
    ),
    "listed pickle named .txt": (
        add_file("notes.txt", pickle.dumps([1]), listed=True),
        "not_safetensors",
    ),
    "torch.save as safetensors": (torch_pickle, "not_safetensors"),
    "unlisted file": (add_file("notes.txt", b"hello", listed=False), "sha256_mismatch"),
    "missing file": (remove("README.md"), "missing_file"),
    "../ path": (list_path("../x"), "unsafe_path"),
    "absolute path": (list_path("/etc/passwd"), "unsafe_path"),
    "backslash path": (list_path("a\\b"), "unsafe_path"),
    "dot path": (list_path("./README.md"), "unsafe_path"),
    "empty path": (list_path(""), "unsafe_path"),
    "symlinked file": (symlink_file, "unsafe_path"),
    "symlinked folder": (symlink_folder, "unsafe_path"),
    "other base in the manifest": (lineage(baseModel="meta-llama/Llama-3.1-8B"), "base_mismatch"),
    "other base in the config": (config(base_model_name_or_path="other"), "base_mismatch"),
    "other base weights": (lineage(baseModelSha256="sha256:" + "1" * 64), "base_mismatch"),
    "rank pattern above the limit": (config(rank_pattern={"q_proj": 64}), "rank_too_high"),
    "per-module rank": (config(rank_pattern={"q_proj": 8}), "unsupported_config"),
    "per-module alpha": (config(alpha_pattern={"q_proj": 2}), "unsupported_config"),
    "modules_to_save": (config(modules_to_save=["lm_head"]), "unsupported_config"),
    "not LoRA": (config(peft_type="IA3"), "unsupported_config"),
    "LoRA bias": (config(lora_bias=True), "unsupported_config"),
    "PiSSA init": (config(init_lora_weights="pissa"), "unsupported_config"),
    "r not an integer": (config(r="4"), "bad_config"),
    "manifest r differs": (manifest_lora_r, "bad_config"),
    "unknown target module": (tensors(rename_module("q_proj", "x_proj")), "unknown_target_module"),
    "layer beyond the base": (
        tensors(rename_module("layers.1.", "layers.7.")),
        "unknown_target_module",
    ),
    "unknown configured target": (
        config(target_modules=["q_proj", "x_proj"]),
        "unknown_target_module",
    ),
    "non-LoRA tensor": (tensors(add_tensor), "unsupported_config"),
    "A of the wrong shape": (tensors(reshape_a), "shape_mismatch"),
    "A without B": (tensors(drop_b), "shape_mismatch"),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corruption_rejected(
    corrupt: tuple[Callable[[Path], dict[str, Any]], str], adapter: Path, facts: BaseModelFacts
) -> None:
    change, code = corrupt
    manifest = change(adapter)
    error = rejected(adapter, manifest, facts)
    assert error.code == code, error.reason


def test_rank_above_limit(adapter: Path, facts: BaseModelFacts) -> None:
    error = rejected(adapter, manifest_of(adapter), facts, max_rank=2)
    assert error.code == "rank_too_high"
    assert "r is 4" in error.reason


def test_other_base_weights_served(adapter: Path, facts: BaseModelFacts) -> None:
    other = BaseModelFacts(facts.model_id, "sha256:" + "2" * 64, facts.module_shapes, 2)
    assert rejected(adapter, manifest_of(adapter), other).code == "base_mismatch"
    # Without a digest on either side the name alone decides.
    unknown = BaseModelFacts(facts.model_id, None, facts.module_shapes, 2)
    assert validate_adapter(adapter, manifest_of(adapter), unknown, max_rank=16).rank == 4


def test_dora_rejected(
    make_adapter: Callable[..., Path], tmp_path: Path, facts: BaseModelFacts
) -> None:
    folder = Path(shutil.copytree(make_adapter(use_dora=True), tmp_path / "dora"))
    error = rejected(folder, manifest_of(folder), facts)
    assert error.code == "unsupported_config"
    assert "DoRA" in error.reason


def test_messages_name_the_culprit(adapter: Path, facts: BaseModelFacts) -> None:
    manifest = tensors(reshape_a)(adapter)
    assert Q_A in rejected(adapter, manifest, facts).reason
    assert WEIGHTS in rejected(adapter, flip_byte(WEIGHTS)(adapter), facts).reason


def test_header_length_starting_with_pickle_byte(adapter: Path, facts: BaseModelFacts) -> None:
    """A safetensors header 0x180 bytes long starts with 0x80, like a pickle: still fine."""
    data = (adapter / WEIGHTS).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + length].rstrip(b" ")
    header = header.ljust(len(header) + (0x80 - len(header)) % 256, b" ")
    assert len(header) % 256 == 0x80
    (adapter / WEIGHTS).write_bytes(struct.pack("<Q", len(header)) + header + data[8 + length :])
    assert validate_adapter(adapter, rehash(adapter), facts, max_rank=16).rank == 4


def test_any_truncation_is_rejected_cleanly(adapter: Path, facts: BaseModelFacts) -> None:
    data = (adapter / WEIGHTS).read_bytes()
    for size in range(0, len(data), 37):
        (adapter / WEIGHTS).write_bytes(data[:size])
        with pytest.raises(AdapterRejected) as caught:
            validate_adapter(adapter, rehash(adapter), facts, max_rank=16)
        assert caught.value.code == "not_safetensors", (size, caught.value.reason)


def test_garbled_headers_are_rejected_cleanly(adapter: Path, facts: BaseModelFacts) -> None:
    """Random byte changes in the header: each passes or is an AdapterRejected, nothing else."""
    data = (adapter / WEIGHTS).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    rng = random.Random(0)
    codes = set()
    for _ in range(200):
        garbled = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            garbled[rng.randrange(8 + length)] = rng.randrange(256)
        (adapter / WEIGHTS).write_bytes(bytes(garbled))
        try:
            validate_adapter(adapter, rehash(adapter), facts, max_rank=16)
        except AdapterRejected as e:
            codes.add(e.code)
    assert "not_safetensors" in codes


def header_file(header: object, data: bytes = b"", *, length: int | None = None) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
BAD_FILES = {
    "empty": b"",
    "short length": b"\x10\x00",
    "huge length": header_file({}, length=2**40),
    "length past the end": header_file({}, length=100),
    "not JSON": header_file(b"{not json"),
    "not an object": header_file([1, 2]),
    "not UTF-8": header_file(b'{"\xff": 1}'),
    "duplicate tensor": header_file(
        b'{"a": %s, "a": %s}' % ((json.dumps(F32).encode(),) * 2), b"\0" * 8
    ),
    "unknown dtype": header_file({"a": {**F32, "dtype": "F7"}}, b"\0" * 8),
    "negative dim": header_file({"a": {**F32, "shape": [-2]}}, b"\0" * 8),
    "boolean dim": header_file({"a": {**F32, "shape": [True, 2]}}, b"\0" * 8),
    "offsets too short": header_file({"a": {**F32, "data_offsets": [0, 4]}}, b"\0" * 4),
    "offsets reversed": header_file({"a": {**F32, "data_offsets": [8, 0]}}, b"\0" * 8),
    "gap": header_file({"a": {**F32, "data_offsets": [4, 12]}}, b"\0" * 12),
    "overlap": header_file({"a": F32, "b": F32}, b"\0" * 16),
    "trailing data": header_file({"a": F32}, b"\0" * 9),
    "missing data": header_file({"a": F32}, b"\0" * 7),
    "bad metadata": header_file({"__metadata__": {"format": 1}, "a": F32}, b"\0" * 8),
}


@pytest.mark.parametrize("content", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_safetensors_headers(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(AdapterRejected) as caught:
        read_safetensors_header(path)
    assert caught.value.code == "not_safetensors"


def test_good_safetensors_header(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    second = {"dtype": "BF16", "shape": [2, 0], "data_offsets": [8, 8]}
    path.write_bytes(header_file({"__metadata__": {"k": "v"}, "a": F32, "b": second}, b"\0" * 8))
    header = read_safetensors_header(path)
    assert header.metadata == {"k": "v"}
    assert header.tensors["a"].shape == (2,)
    assert header.tensors["b"].dtype == "BF16"


def test_unreadable_file_is_load_failed(
    adapter: Path, facts: BaseModelFacts, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreadable(path: Path) -> str:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(validation, "sha256_file", unreadable)
    with pytest.raises(AdapterRejected) as caught:
        validate_adapter(adapter, manifest_of(adapter), facts, max_rank=16)
    assert caught.value.code == "load_failed"
    assert "Permission denied" in caught.value.reason
