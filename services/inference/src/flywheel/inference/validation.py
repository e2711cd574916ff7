"""Adapter validation: what an adapter version must pass before the engine may load it.

An adapter arrives as a folder (PEFT's ``adapter_config.json`` and
``adapter_model.safetensors`` beside the trainer's ``manifest.json``). Nothing in it is
trusted until every file matches the manifest's sha256, no file can hold a pickle, the
safetensors header (parsed here by hand) describes exactly the bytes that follow it, and
the LoRA fits the base model being served. Every refusal is an `AdapterRejected` carrying
the reason code of the ``adapter.rejected`` event. No torch here: the service never imports
it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import struct
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from flywheel.core.artifacts import sha256_file

MANIFEST = "manifest.json"
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
REASON_CODES = frozenset(
    {
        "sha256_mismatch", "not_safetensors", "base_mismatch", "rank_too_high",
        "unknown_target_module", "unsafe_path", "load_failed", "unsupported_config",
        "missing_file", "shape_mismatch", "bad_config",
    }
)  # fmt: skip
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SHA256 = re.compile(r"[0-9a-f]{64}")
# Formats that can carry a pickle (torch.save, numpy object arrays, joblib): loading one
# runs whatever code it names.
PICKLE_SUFFIXES = frozenset(
    {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz"}
)
# The pickle PROTO opcode, and the zip torch.save wraps its pickle in.
PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")
# As flywheel.trainer.fingerprints.WEIGHT_SUFFIXES: the base digest must be computed the way
# the trainer records it in manifests (the trainer's package is not a dependency here).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
MAX_HEADER = 100_000_000  # safetensors' own limit
MAX_TENSOR_NAME = 512
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
# adapter_config.json keys that may be set (checked below, or harmless for serving). Any
# other key with a truthy value is a LoRA variant (lora_bias, target_parameters,
# trainable_token_indices, layer_replication, aLoRA, ...) the engine would not apply as is.
PLAIN_LORA_KEYS = frozenset(
    {
        "peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "modules_to_save",
        "rank_pattern", "alpha_pattern", "bias", "init_lora_weights", "target_modules",
        "base_model_name_or_path", "revision", "task_type", "inference_mode", "lora_dropout",
        "auto_mapping", "peft_version", "layers_to_transform", "layers_pattern",
        "exclude_modules", "megatron_core", "qalora_group_size",
    }
)  # fmt: skip
_IDENT = re.compile(r"[A-Za-z0-9_]+")


class AdapterRejected(Exception):
    """An adapter that will not be served: ``code`` is the event's reason code, ``reason``
    the detail a person reads (naming the file or tensor at fault)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class BaseModelFacts:
    """What the served base model is, for matching adapters against it."""

    model_id: str
    weights_sha256: str | None
    # Target-module suffix ("q_proj") -> (in_features, out_features).
    module_shapes: Mapping[str, tuple[int, int]]
    num_layers: int

    @classmethod
    def from_model_folder(
        cls, folder: Path, model_id: str, *, hash_weights: bool = True
    ) -> BaseModelFacts:
        """The facts of a Llama-style model folder (its ``config.json``); with
        ``hash_weights``, also its weights' digest as the trainer's manifests record it."""
        try:
            config = json.loads((folder / "config.json").read_text())
            config = config.get("text_config") or config  # multimodal wrappers nest it
            hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])
            heads = int(config["num_attention_heads"])
            kv_heads = int(config.get("num_key_value_heads") or heads)
            head_dim = int(config.get("head_dim") or hidden // heads)
            layers = int(config["num_hidden_layers"])
        except (OSError, ValueError, LookupError, TypeError, AttributeError) as e:
            raise ValueError(f"{folder}: no readable Llama-style config.json ({e})") from e
        shapes = {
            "q_proj": (hidden, heads * head_dim),
            "k_proj": (hidden, kv_heads * head_dim),
            "v_proj": (hidden, kv_heads * head_dim),
            "o_proj": (heads * head_dim, hidden),
            "gate_proj": (hidden, inter),
            "up_proj": (hidden, inter),
            "down_proj": (inter, hidden),
        }
        return cls(model_id, weights_digest(folder) if hash_weights else None, shapes, layers)


@dataclass(frozen=True)
class ValidatedAdapter:
    """An adapter that passed every check, with what serving it needs to know."""

    rank: int
    alpha: float
    use_rslora: bool
    target_modules: frozenset[str]
    files: dict[str, str]  # relative path -> sha256


@dataclass(frozen=True)
class LoraSettings:
    """The scale-deciding settings of a plain LoRA ``adapter_config.json``."""

    r: int
    alpha: float
    use_rslora: bool

    @property
    def scale(self) -> float:
        """PEFT's scaling of B @ A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors header; offsets are relative to the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed safetensors header whose layout has been checked."""

    data_start: int  # 8 + header length: where the data section starts
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def _reject(code: str, reason: str) -> NoReturn:
    raise AdapterRejected(code, reason)


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_name(value: str, what: str) -> None:
    """Refuse a tenant, adapter name or version that could not safely be a path part."""
    if not isinstance(value, str) or not NAME.fullmatch(value) or ".." in value:
        _reject(
            "unsafe_path",
            f"{what} {_short(value)} must be 1-128 letters, digits, '.', '_' or '-', "
            "start with a letter or digit and not contain '..'",
        )


def weights_digest(folder: Path) -> str:
    """``sha256:`` + the digest the trainer records for a local base model (sha256 over the
    names and sha256s of its weight files), the files hashed in parallel."""
    paths = [
        p for p in sorted(folder.rglob("*")) if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
    ]
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(paths)))) as pool:
        digests = list(pool.map(sha256_file, paths))
    entries = {p.relative_to(folder).as_posix(): d for p, d in zip(paths, digests, strict=True)}
    return "sha256:" + hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """The header of a safetensors file, refused (``not_safetensors``) unless it is one JSON
    object of known dtypes whose offsets are contiguous and cover the data exactly."""
    name = path.name
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            _reject("not_safetensors", f"{name}: {size} bytes, too short for a header")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER or 8 + length > size:
            _reject("not_safetensors", f"{name}: header of {length} bytes in {size} bytes")
        raw = f.read(length)
    if not raw.startswith(b"{"):
        _reject("not_safetensors", f"{name}: the header is not a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:
        _reject("not_safetensors", f"{name}: unreadable header ({_short(str(e))})")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        _reject("not_safetensors", f"{name}: __metadata__ must map strings to strings")
    tensors = {key: _tensor_info(name, key, entry) for key, entry in header.items()}
    data_size, position = size - 8 - length, 0
    for key, info in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin != position:
            _reject("not_safetensors", f"{name}: {_short(key)} does not start at {position}")
        position = info.end
    if position != data_size:
        _reject("not_safetensors", f"{name}: tensors cover {position} of {data_size} bytes")
    return SafetensorsHeader(8 + length, tensors, metadata)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len({k for k, _ in pairs}) != len(pairs):
        raise ValueError("duplicate keys")
    return dict(pairs)


def _tensor_info(file: str, key: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict):
        _reject("not_safetensors", f"{file}: entry {_short(key)} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        _reject("not_safetensors", f"{file}: {_short(key)} has dtype {_short(dtype)}")
    if (
        not isinstance(shape, list)
        or len(shape) > 8
        or not all(_is_int(d) and d >= 0 for d in shape)
    ):
        _reject("not_safetensors", f"{file}: {_short(key)} has shape {_short(shape)}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
        or offsets[1] - offsets[0] != math.prod(shape) * DTYPE_SIZES[dtype]
    ):
        _reject("not_safetensors", f"{file}: {_short(key)} has offsets {_short(offsets)}")
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


def lora_settings(config: Mapping[str, Any], *, max_rank: int) -> LoraSettings:
    """The settings of a plain LoRA ``adapter_config.json``; anything else is refused."""
    at = CONFIG
    if config.get("peft_type") != "LORA":
        _reject("unsupported_config", f"{at}: peft_type {_short(config.get('peft_type'))}")
    if config.get("use_dora"):
        _reject("unsupported_config", f"{at}: DoRA (use_dora) is not served")
    if config.get("modules_to_save"):
        _reject("unsupported_config", f"{at}: modules_to_save {_short(config['modules_to_save'])}")
    r, alpha, rslora = config.get("r"), config.get("lora_alpha"), config.get("use_rslora", False)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        _reject("bad_config", f"{at}: r {_short(r)} is not a positive integer")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not 0 < alpha < math.inf:
        _reject("bad_config", f"{at}: lora_alpha {_short(alpha)} is not a positive number")
    if not isinstance(rslora, bool):
        _reject("bad_config", f"{at}: use_rslora {_short(rslora)} is not a boolean")
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    if not isinstance(ranks, dict) or not all(_is_int(v) for v in ranks.values()):
        _reject("bad_config", f"{at}: rank_pattern {_short(ranks)} does not map to integers")
    if not isinstance(alphas, dict):
        _reject("bad_config", f"{at}: alpha_pattern {_short(alphas)} is not an object")
    for where, rank in [("r", r), *((f"rank_pattern[{k!r}]", v) for k, v in ranks.items())]:
        if rank > max_rank:
            _reject("rank_too_high", f"{at}: {where} is {rank}, above the limit of {max_rank}")
    # vLLM applies one lora_alpha / r scale to the whole adapter: per-module ranks or alphas
    # would be served with the wrong scale, silently.
    if any(v != r for v in ranks.values()) or any(v != alpha for v in alphas.values()):
        _reject("unsupported_config", f"{at}: per-module rank_pattern or alpha_pattern")
    if config.get("bias", "none") != "none":
        _reject("unsupported_config", f"{at}: bias {_short(config['bias'])} is not served")
    init = config.get("init_lora_weights", True)
    # PiSSA, OLoRA, LoftQ, ... initialisations change the base weights the adapter expects.
    if not (init is True or init is False or init == "gaussian"):
        _reject("unsupported_config", f"{at}: init_lora_weights {_short(init)} alters the base")
    for key, value in sorted(config.items()):
        if key not in PLAIN_LORA_KEYS and value:
            _reject("unsupported_config", f"{at}: {key} = {_short(value)} is not plain LoRA")
    return LoraSettings(r, float(alpha), rslora)


def lora_tensor(name: str) -> tuple[str, str] | None:
    """(module path, "A" or "B") of a PEFT LoRA weight name such as
    ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``; None otherwise."""
    parts = name.split(".")
    if (
        len(name) > MAX_TENSOR_NAME
        or len(parts) < 5
        or parts[:2] != ["base_model", "model"]
        or parts[-2] not in ("lora_A", "lora_B")
        or parts[-1] != "weight"
        or not all(_IDENT.fullmatch(p) for p in parts)
    ):
        return None
    return ".".join(parts[2:-2]), parts[-2][-1]


def _field(message: Mapping[str, Any], snake: str) -> Any:
    """A manifest field under its proto name or the camelCase name json_format writes."""
    if snake in message:
        return message[snake]
    head, *rest = snake.split("_")
    return message.get(head + "".join(w.title() for w in rest))


def _listed_files(manifest: Mapping[str, Any]) -> dict[str, tuple[str, int | None]]:
    """Relative path -> (sha256, size if recorded) of the manifest's files, paths checked."""
    files = _field(manifest, "files")
    if not isinstance(files, list) or not files:
        _reject("bad_config", f"{MANIFEST}: no file list")
    listed: dict[str, tuple[str, int | None]] = {}
    for entry in files:
        entry = entry if isinstance(entry, dict) else {}
        path, digest, size = entry.get("path"), entry.get("sha256"), _field(entry, "size_bytes")
        if not isinstance(path, str) or not isinstance(digest, str) or not SHA256.fullmatch(digest):
            _reject("bad_config", f"{MANIFEST}: {_short(entry)} is not a path with a sha256")
        check_relative_path(path)
        if path in listed:
            _reject("bad_config", f"{MANIFEST}: {_short(path)} is listed twice")
        # json_format writes uint64 fields as strings.
        known = isinstance(size, int | str) and str(size).isdecimal()
        listed[path] = (digest, int(size) if known else None)
    return listed


def check_relative_path(path: str) -> None:
    """Reject a manifest file path that is not a plain relative path inside the folder."""
    if (
        not path
        or path.startswith("/")
        or "\\" in path
        or "\x00" in path
        or any(part in ("", ".", "..") for part in path.split("/"))
    ):
        _reject("unsafe_path", f"{MANIFEST}: {_short(path)} is not a plain relative path")


def _raise(error: OSError) -> NoReturn:
    raise error


def _scan(folder: Path) -> set[str]:
    """Relative paths of the folder's regular files; links, special files and files that
    can hold a pickle are refused."""
    found: set[str] = set()
    # followlinks=False: a linked folder shows up below as a link, and is never entered.
    for top, dirs, files in os.walk(folder, onerror=_raise):
        for entry in (*dirs, *files):
            path = Path(top, entry)
            rel = path.relative_to(folder).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                _reject("unsafe_path", f"{rel} is a symbolic link")
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                _reject("unsafe_path", f"{rel} is not a regular file")
            _refuse_pickle(path, rel)
            found.add(rel)
    return found


def _refuse_pickle(path: Path, rel: str) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        _reject("not_safetensors", f"{rel}: {path.suffix} files can hold pickles")
    if path.name.endswith(".safetensors"):
        return  # starts with a length, whose first byte may be 0x80: its header parse decides
    with path.open("rb") as f:
        if f.read(4).startswith(PICKLE_MAGIC):
            _reject("not_safetensors", f"{rel} holds a pickle (or a torch zip)")


def _verify_files(folder: Path, manifest: Mapping[str, Any]) -> dict[str, str]:
    """Check the folder holds exactly the manifest's files, each with its sha256."""
    listed = _listed_files(manifest)
    if not folder.is_dir():
        _reject("missing_file", f"adapter folder {folder} does not exist")
    present = _scan(folder)
    for rel in sorted(present - listed.keys() - {MANIFEST}):
        _reject("sha256_mismatch", f"{rel} is not in {MANIFEST}'s file list")
    for required in (CONFIG, WEIGHTS):
        if required not in listed:
            _reject("missing_file", f"{MANIFEST} lists no {required}")
    root = folder.resolve()
    for rel, (digest, size) in sorted(listed.items()):
        path = folder / rel
        if rel not in present:
            _reject("missing_file", f"{rel} is in {MANIFEST} but not in the folder")
        if not path.resolve().is_relative_to(root):
            _reject("unsafe_path", f"{rel} resolves outside the adapter folder")
        if size is not None and path.stat().st_size != size:
            _reject("sha256_mismatch", f"{rel}: {path.stat().st_size} bytes, not {size}")
        if sha256_file(path) != digest:
            _reject("sha256_mismatch", f"{rel}: sha256 differs from {MANIFEST}'s")
        if rel.endswith(".safetensors"):
            read_safetensors_header(path)
    return {rel: digest for rel, (digest, _) in sorted(listed.items())}


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:
        _reject("bad_config", f"{CONFIG}: not JSON ({_short(str(e))})")
    if not isinstance(config, dict):
        _reject("bad_config", f"{CONFIG}: not a JSON object")
    return config


def _bare_sha256(value: object) -> str | None:
    """The hex of a ``sha256:``-prefixed (or bare) digest; None for "hf:<id>" and the like,
    which name a base without digesting its weights."""
    if not isinstance(value, str):
        return None
    hexdigest = value.removeprefix("sha256:").lower()
    return hexdigest if SHA256.fullmatch(hexdigest) else None


def _check_base(
    manifest: Mapping[str, Any], config: Mapping[str, Any], base: BaseModelFacts
) -> None:
    lineage = _field(manifest, "lineage")
    lineage = lineage if isinstance(lineage, dict) else {}
    named = {
        f"{MANIFEST} lineage.base_model": _field(lineage, "base_model"),
        f"{CONFIG} base_model_name_or_path": config.get("base_model_name_or_path"),
    }
    named = {where: name for where, name in named.items() if name}
    if not named:
        _reject("base_mismatch", "the adapter does not name its base model")
    for where, name in named.items():
        if name != base.model_id:
            _reject("base_mismatch", f"{where} is {_short(name)}, not {base.model_id!r}")
    trained = _bare_sha256(_field(lineage, "base_model_sha256"))
    served = _bare_sha256(base.weights_sha256)
    if trained and served and trained != served:
        _reject("base_mismatch", f"trained on base weights {trained[:12]}, served {served[:12]}")


def _check_manifest_lora(manifest: Mapping[str, Any], lora: LoraSettings) -> None:
    """The manifest's LoRA shape must be the config's (else they describe different runs)."""
    recorded = _field(manifest, "lora")
    if not isinstance(recorded, dict):
        return
    r, alpha, rslora = recorded.get("r"), recorded.get("alpha"), _field(recorded, "use_rslora")
    if (
        (r is not None and r != lora.r)
        or (isinstance(alpha, int | float) and not math.isclose(alpha, lora.alpha, rel_tol=1e-6))
        or (rslora is not None and rslora != lora.use_rslora)
    ):
        said = f"r={r}, alpha={alpha}, use_rslora={rslora}"
        _reject("bad_config", f"{MANIFEST} lora says {said}; {CONFIG} {lora}")


def _check_targets(config: Mapping[str, Any], base: BaseModelFacts) -> None:
    targets = config.get("target_modules")
    if isinstance(targets, list):
        for target in targets:
            if not isinstance(target, str) or target.rsplit(".", 1)[-1] not in base.module_shapes:
                _reject("unknown_target_module", f"{CONFIG}: the base has no {_short(target)}")
    elif targets is not None and not isinstance(targets, str):  # a string is PEFT's regex
        _reject("bad_config", f"{CONFIG}: target_modules {_short(targets)}")


def _layer_and_kind(name: str, module: str) -> tuple[int, str]:
    """Decoder-layer index and module kind of ``model.layers.3.mlp.up_proj``: (3, up_proj)."""
    parts = module.split(".")
    for i in range(len(parts) - 2):
        if parts[i] == "layers" and parts[i + 1].isascii() and parts[i + 1].isdigit():
            return int(parts[i + 1]), parts[-1]
    _reject("unknown_target_module", f"{WEIGHTS}: {name} is not in a decoder layer")


def _check_tensors(header: SafetensorsHeader, r: int, base: BaseModelFacts) -> frozenset[str]:
    """Every tensor is the LoRA A or B of a module the base has, shaped for it; returns the
    module kinds (``q_proj``, ...) adapted."""
    halves: dict[str, set[str]] = {}
    if not header.tensors:
        _reject("bad_config", f"{WEIGHTS} holds no tensors")
    for name, info in sorted(header.tensors.items()):
        parsed = lora_tensor(name)
        if parsed is None:
            _reject("unsupported_config", f"{WEIGHTS}: {_short(name)} is not a LoRA A/B weight")
        module, half = parsed
        layer, kind = _layer_and_kind(name, module)
        if layer >= base.num_layers:
            _reject("unknown_target_module", f"{WEIGHTS}: {name}: the base has no layer {layer}")
        if kind not in base.module_shapes:
            _reject("unknown_target_module", f"{WEIGHTS}: {name}: the base has no {kind}")
        if info.dtype not in FLOAT_DTYPES:
            _reject("unsupported_config", f"{WEIGHTS}: {name} is {info.dtype}")
        in_features, out_features = base.module_shapes[kind]
        want = (r, in_features) if half == "A" else (out_features, r)
        if info.shape != want:
            _reject("shape_mismatch", f"{WEIGHTS}: {name} is {list(info.shape)}, not {list(want)}")
        halves.setdefault(module, set()).add(half)
    for module, have in sorted(halves.items()):
        if have != {"A", "B"}:
            _reject("shape_mismatch", f"{WEIGHTS}: {module} has only lora_{min(have)}")
    return frozenset(module.rsplit(".", 1)[-1] for module in halves)


def validate_adapter(
    folder: Path, manifest: Mapping[str, Any], base: BaseModelFacts, *, max_rank: int
) -> ValidatedAdapter:
    """Check an adapter folder against its manifest and the served base model; raise
    `AdapterRejected` (and nothing else) at the first problem found."""
    try:
        files = _verify_files(folder, manifest)
        config = _read_config(folder / CONFIG)
        lora = lora_settings(config, max_rank=max_rank)
        _check_manifest_lora(manifest, lora)
        _check_base(manifest, config, base)
        _check_targets(config, base)
        kinds = _check_tensors(read_safetensors_header(folder / WEIGHTS), lora.r, base)
    except OSError as e:  # unreadable files, or a folder changing while it is read
        raise AdapterRejected("load_failed", f"{folder.name}: {e}") from e
    return ValidatedAdapter(lora.r, lora.alpha, lora.use_rslora, kinds, files)
