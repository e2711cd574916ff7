"""Models, adapters and a running engine for the engine contract tests and benchmarks.

Everything is seeded and offline:

- :func:`tiny_base_model`: the trainer's two-layer bootstrap Llama (a second to build),
  with our byte-level BPE tokenizer and chat template.
- :func:`random_llama`: a randomly initialised Llama of any size with a tokenizer of the
  wanted vocabulary, for benchmarks and for a real ``vllm serve``.
- :func:`random_lora_adapter`: a PEFT LoRA folder whose A *and* B are random (PEFT starts
  B at zero, which would leave the output unchanged), so greedy output visibly changes.
- :func:`engine_server`: ``python -m flywheel.inference.engine`` on a free loopback port,
  up once ``GET /health`` answers 200.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from flywheel.core.testing.local_infra import free_port
from flywheel.trainer.bootstrap import (
    BootstrapConfig,
    bootstrap_model,
    documents,
    train_tokenizer,
)
from flywheel.trainer.testing import TINY

DEFAULT_TARGET_MODULES = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)  # fmt: skip
MANIFEST = "manifest.json"
ENGINE_MODULE = "flywheel.inference.engine"


def tiny_base_model(root: Path) -> Path:
    """The trainer's tiny bootstrap Llama under ``root`` (cached there; about a second)."""
    return bootstrap_model(root, TINY, progress=False)


@dataclass(frozen=True)
class RandomLlamaConfig:
    """What :func:`random_llama` builds: every field goes into the cache folder's name."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    seed: int
    max_positions: int
    tie_embeddings: bool

    def key(self) -> str:
        """Short hash of the configuration."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _pseudo_words(count: int, seed: int) -> list[str]:
    """``count`` distinct pronounceable made-up words, seeded."""
    rng = random.Random(seed)
    onsets = [*"bcdfghjklmnprstvwz", "br", "ch", "cl", "dr", "fl", "gr", "kr", "pl", "pr", "sh"]
    vowels = [*"aeiou", "ai", "au", "ea", "ee", "ia", "io", "oa", "ou"]
    codas = ["", "", "", "n", "r", "s", "l", "x", "nd", "rk", "st"]
    words: set[str] = set()
    while len(words) < count:
        syllables = rng.randint(2, 4)
        words.add(
            "".join(
                rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                for _ in range(syllables)
            )
        )
    return sorted(words)


def _tokenizer_texts(vocab: int, seed: int, extra_words: int) -> list[str]:
    """The retail-media corpus in the chat layout, plus made-up words when asked for.

    The synthetic corpus alone saturates near 2,000 BPE tokens; the made-up words (each
    repeated, in a seeded order) give the trainer material for larger vocabularies.
    """
    texts = documents(BootstrapConfig(examples=min(20_000, max(2_000, vocab * 2)), seed=seed))
    if extra_words:
        words = _pseudo_words(extra_words, seed) * 3
        random.Random(seed).shuffle(words)
        texts += [" ".join(words[i : i + 200]) for i in range(0, len(words), 200)]
    return texts


def _tokenizer_of_size(vocab: int, seed: int) -> Any:
    """A BPE tokenizer with exactly ``vocab`` tokens (special tokens included)."""
    extra = 0
    for _ in range(6):
        tokenizer = train_tokenizer(_tokenizer_texts(vocab, seed, extra), vocab)
        if len(tokenizer) >= vocab:
            return tokenizer
        extra = max(2 * extra, 4 * (vocab - len(tokenizer)))
    raise ValueError(f"could not train a tokenizer of {vocab} tokens (got {len(tokenizer)})")


def random_llama(
    root: Path,
    *,
    hidden: int = 256,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 4,
    intermediate: int = 688,
    vocab: int = 2048,
    seed: int = 0,
    max_positions: int = 2048,
    tie_embeddings: bool = False,
) -> Path:
    """A randomly initialised ``LlamaForCausalLM`` folder under ``root`` (cached there).

    Weights in safetensors (float32), a byte-level BPE tokenizer of exactly ``vocab``
    tokens trained on the retail-media corpus, and the bootstrap chat template, so
    transformers, PEFT, our engine and vLLM all load it. The defaults give a small model
    vLLM's attention kernels accept (head size 64); ``hidden=768, layers=12, heads=12,
    kv_heads=12, intermediate=2048, vocab=8000`` is about 100M parameters.
    """
    if hidden % heads or heads % kv_heads:
        raise ValueError("hidden must divide by heads, and heads by kv_heads")
    config = RandomLlamaConfig(
        hidden, layers, heads, kv_heads, intermediate, vocab, seed, max_positions, tie_embeddings
    )
    target = root / f"random-llama-{config.key()}"
    if (target / MANIFEST).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer_of_size(vocab, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=hidden,
                intermediate_size=intermediate,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=kv_heads,
                max_position_embeddings=max_positions,
                tie_word_embeddings=tie_embeddings,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    model.eval()  # type: ignore[no-untyped-call]
    building = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        model.save_pretrained(building, safe_serialization=True)
        tokenizer.save_pretrained(building)
        manifest = {
            "kind": "flywheel-random-llama",
            "config": dataclasses.asdict(config),
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        (building / MANIFEST).write_text(json.dumps(manifest, indent=2))
        try:
            building.rename(target)
        except OSError:
            if not (target / MANIFEST).is_file():  # not a concurrent build of the same
                raise
            shutil.rmtree(building, ignore_errors=True)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return target


def random_lora_adapter(
    base: Path,
    out: Path,
    *,
    rank: int = 8,
    alpha: float = 16,
    seed: int = 0,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    scale: float = 0.5,
) -> Path:
    """A PEFT LoRA adapter for ``base`` in ``out`` (adapter_config.json + safetensors).

    Built with ``get_peft_model`` and ``save_pretrained(safe_serialization=True)``, no
    training. A is seeded ``N(0, 1/fan_in)`` and B seeded ``N(0, scale^2)``, so with
    ``alpha / rank`` the update is large enough that greedy output visibly changes.
    ``base_model_name_or_path`` is the base folder's absolute path.
    """
    from peft import LoraConfig, get_peft_model

    base = base.resolve()
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # PEFT's own init draws from the global RNG
        torch.manual_seed(seed)
        model: Any = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        # PEFT types lora_alpha as int; whole numbers are written as such.
        lora_alpha: Any = int(alpha) if float(alpha).is_integer() else alpha
        config = LoraConfig(
            r=rank,
            lora_alpha=lora_alpha,
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
            target_modules=list(target_modules),
        )
        peft_model: Any = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if ".lora_A." in name:
                std = param.shape[1] ** -0.5
            elif ".lora_B." in name:
                std = scale
            else:
                continue
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    peft_model.peft_config["default"].base_model_name_or_path = str(base)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    for required in ("adapter_config.json", "adapter_model.safetensors"):
        if not (out / required).is_file():
            raise RuntimeError(f"PEFT wrote no {required} in {out}")
    return out


class EngineStartError(RuntimeError):
    """The engine exited or did not become healthy in time; the message holds its log."""


def _log_tail(path: Path, chars: int = 8_000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return text[-chars:]


@contextlib.contextmanager
def engine_server(
    model: Path,
    *,
    served_model_name: str | None = None,
    args: Sequence[str] = (),
    log_path: Path | None = None,
    timeout_s: float = 180.0,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """Run ``python -m flywheel.inference.engine`` for ``model``; yield its base URL.

    The engine listens on a free 127.0.0.1 port; the block is entered once ``GET /health``
    answers 200. Its stdout and stderr go to ``log_path`` (a temp file when None), never
    a pipe that could fill. It is terminated (then killed) when the block ends.
    """
    port = free_port()
    command = [
        sys.executable, "-m", ENGINE_MODULE, "--model", str(model),
        "--host", "127.0.0.1", "--port", str(port), *args,
    ]  # fmt: skip
    if served_model_name is not None:
        command += ["--served-model-name", served_model_name]
    owned_log = log_path is None
    if log_path is None:
        handle, name = tempfile.mkstemp(prefix="flywheel-engine-", suffix=".log")
        os.close(handle)
        log_path = Path(name)
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise EngineStartError(
                    f"engine exited with {process.returncode} before becoming healthy:\n"
                    f"{' '.join(command)}\n{_log_tail(log_path)}"
                )
            try:
                if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise EngineStartError(
                    f"engine not healthy after {timeout_s:.0f}s:\n"
                    f"{' '.join(command)}\n{_log_tail(log_path)}"
                )
            time.sleep(0.2)
        yield url
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)
        if owned_log:
            log_path.unlink(missing_ok=True)


def engine_log_tail(log_path: Path, chars: int = 8_000) -> str:
    """The last ``chars`` characters of an engine log (for failure messages)."""
    return _log_tail(log_path, chars)


def adapter_manifest(
    folder: Path,
    *,
    tenant: str,
    name: str,
    version: str,
    base_model: str,
    rank: int,
    alpha: float,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    use_rslora: bool = False,
) -> Any:
    """The ``AdapterManifest`` the trainer would write for the adapter files in ``folder``
    (every file's sha256, the base model, the LoRA shape), built by the trainer's own code."""
    from flywheel.contracts.common.v1.common_pb2 import AdapterRef
    from flywheel.trainer.manifest import build_manifest
    from flywheel.trainer.runner import RecordedOutcome
    from flywheel.trainer.spec import TrainSpec

    lora = {"r": rank, "alpha": float(alpha), "dropout": 0.0,
            "target_modules": sorted(target_modules), "use_rslora": use_rslora}  # fmt: skip
    outcome = RecordedOutcome(
        adapter_dir=folder, metrics={"eval_loss": 1.0}, hyperparameters={}, lora=lora,
        steps=1, resumed_from_step=None,
    )  # fmt: skip
    spec = TrainSpec(method="sft", base_model=base_model, train_file=Path("train.jsonl"))
    ref = AdapterRef(name=name, version=version)
    return build_manifest(spec, outcome, tenant_id=tenant, adapter=ref)


def publish_adapter(store: Any, folder: Path, **manifest_fields: Any) -> Any:
    """Put the adapter in ``folder`` into the artifact ``store`` exactly as the trainer
    publishes (files, then manifest.json); the published manifest.
    ``manifest_fields`` are :func:`adapter_manifest`'s keyword arguments."""
    from flywheel.trainer.manifest import publish

    return publish(store, adapter_manifest(folder, **manifest_fields), folder)


def published_record(manifest: Any) -> Any:
    """``adapter.published`` for ``manifest`` as an event record, as the trainer's outbox
    stages it (for a bus's ``publish``)."""
    from flywheel.contracts.trainer.v1 import events_pb2 as te
    from flywheel.core.events.bus import EventRecord
    from flywheel.core.events.envelope import event_options, wrap

    payload = te.AdapterPublished(manifest=manifest)
    envelope = wrap(manifest.tenant_id, payload, source_service="trainer")
    _type, topic = event_options(payload)
    return EventRecord(
        topic=topic, key=manifest.tenant_id, value=envelope.SerializeToString(),
        event_id=envelope.event_id, event_type=envelope.type,
    )  # fmt: skip


# A schema every answer of a random model must finish (enum, boolean, bounded integer),
# for tests of JSON-schema constrained decoding.
ALLOCATION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "retailer": {"type": "string", "enum": ["amazon", "walmart", "target"]},
        "increase": {"type": "boolean"},
        "share": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["retailer", "increase", "share"],
    "additionalProperties": False,
}


def check_allocation(content: str | None) -> dict[str, Any]:
    """``content`` parsed, after asserting it is JSON matching ``ALLOCATION_SCHEMA``."""
    assert content is not None
    value: dict[str, Any] = json.loads(content)
    assert set(value) == {"retailer", "increase", "share"}, value
    assert value["retailer"] in ("amazon", "walmart", "target")
    assert isinstance(value["increase"], bool)
    assert isinstance(value["share"], int)
    assert 0 <= value["share"] <= 100
    return value
