"""Serving benchmark: adapter hot-load latency and mixed-adapter throughput of the engine.

    uv run python bench/serve.py                 # ~100M Llama, 64 requests, Kafka; ~5 min
    uv run python bench/serve.py --small         # ~12M Llama, 16 requests: smoke run, ~45 s

Builds (once, cached under ``bench/.cache/``) a randomly initialised Llama with
`flywheel.inference.testing.random_llama` (hidden 768, 12 layers, 12 heads, intermediate
2048, vocab 8000: 97M parameters) and makes eight rank-16 LoRA adapters on all seven
projections on the spot (`random_lora_adapter`, random A and B). Then:

- **engine** (ours): ``python -m flywheel.inference.engine --max-loras 8 --max-lora-rank 16
  --max-num-seqs 16`` in its own process with its own threads (one per core), driven
  over HTTP;
- **baseline**: transformers + PEFT in this process, ``torch.set_num_threads`` set to the
  same cores (``--threads``, default all of them, as the engine). The engine is stopped
  (or idle, with ``--engine-url``) whenever the baseline is timed, and the other way round.

Both sides are warmed up before timing. Throughput passes alternate mixed / base-only
(``--repeat`` 2, the best of each kept, as bench/train.py does: outside load only ever
slows a run down).

Metrics:

- ``hot_load_latency``: ``POST /v1/load_lora_adapter`` sent -> the adapter is routable
  (the call returned: the engine lists it and takes requests for it), median of 8
  adapters. Baseline: what a server without hot-loading needs before it can take requests
  for a new adapter: ``from_pretrained`` of the base folder + ``PeftModel.from_pretrained``
  + ``merge_and_unload``, median of 3 (after an untimed one; tokenizer load not counted).
  ratio = baseline / ours.
- ``hot_load_to_first_token``: the same two paths each followed by a 1-token completion
  of a 1-token prompt (``model=<adapter>`` on the engine, one forward pass on the merged
  model), so the first answer is included on both sides. On a CPU the forward pass itself
  (~30 ms for 97M parameters) bounds this ratio near 30.
- ``publish_to_first_completion``: end to end through a real Kafka broker: the adapter is
  put into the inference service's artifact store as the trainer's ``publish`` does, an
  ``adapter.published`` event goes out with ``KafkaBus.publish`` (clock starts), and the
  service (``python -m flywheel.inference``, which runs its own engine) is polled every
  10 ms with ``POST /v1/chat/completions`` and ``model="<name>@<version>"`` until one
  returns 200 served by that version. Median of 3 (after an untimed one that also waits
  for the consumer group to join). No baseline.
- ``mixed_adapter_throughput``: generated tokens/s, ``--requests`` requests (request i uses
  adapter i % 8; prompts of 32 token ids; ``--max-tokens`` 32 with ``ignore_eos``;
  temperature 0) from ``--concurrency`` 16 concurrent ``httpx.AsyncClient`` clients.
  Baseline: one ``PeftModel`` holding the 8 adapters, ``set_adapter`` per request, then
  ``generate(max_new_tokens=32, min_new_tokens=32, do_sample=False)``, one request at a
  time, in process (no HTTP: the baseline pays no transport, the engine does).
- ``adapter_overhead``: the same workload on the engine with ``model`` = the base model:
  ratio = mixed tokens/s / base-only tokens/s.

``--engine-url URL --model-dir DIR --adapter-dir DIR`` drive an engine that is already
running (e.g. ``vllm serve DIR --enable-lora`` on a GPU box, ``--device cuda`` for the
baseline); see docs/benchmarks.md for the exact commands.

Prints a table, then as its last line the JSON result described in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

GOALS: dict[str, float | None] = {
    "hot_load_latency": 30.0, "hot_load_to_first_token": None,
    "publish_to_first_completion": None,
    "mixed_adapter_throughput": 2.0, "adapter_overhead": 0.8,
}  # fmt: skip
CACHE = Path(__file__).resolve().parent / ".cache"
# ~100M parameters (97.2M), and ~12M for --small.
FULL_MODEL: dict[str, Any] = {
    "hidden": 768, "layers": 12, "heads": 12, "kv_heads": 12, "intermediate": 2048, "vocab": 8000,
}  # fmt: skip
SMALL_MODEL: dict[str, Any] = {
    "hidden": 384, "layers": 6, "heads": 6, "kv_heads": 6, "intermediate": 1024, "vocab": 2048,
}  # fmt: skip
ADAPTERS = 8
RANK = 16
PROMPT_TOKENS = 32
TENANT = "bench"
TENANT_HEADER = "X-Flywheel-Tenant"
POLL_S = 0.010
KAFKA_ADAPTER = "bench-kafka"


STARTED = time.monotonic()


def log(message: str) -> None:
    """Progress on stderr (seconds since start), so stdout stays the report."""
    print(f"[serve-bench {time.monotonic() - STARTED:5.0f}s] {message}", file=sys.stderr,
          flush=True)  # fmt: skip


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# --- model, adapters, prompts ------------------------------------------------------------


def parameter_count(model_dir: Path) -> int:
    """Parameters in the folder's safetensors files (read from their headers)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as weights:
            for key in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
                total += math.prod(weights.get_slice(key).get_shape())
    return total


def base_model(small: bool) -> Path:
    """The benchmark's base model, built once and cached (the cache ignores itself in git)."""
    from flywheel.inference.testing import random_llama

    CACHE.mkdir(exist_ok=True)
    (CACHE / ".gitignore").write_text("*\n")
    started = time.monotonic()
    path = random_llama(CACHE / "models", **(SMALL_MODEL if small else FULL_MODEL))
    if time.monotonic() - started > 1:
        log(f"built the base model in {time.monotonic() - started:.0f} s")
    return path


def make_adapters(model_dir: Path, folder: Path, count: int) -> list[Path]:
    """``count`` rank-16 adapters on all 7 projections (reused if ``folder`` has them)."""
    from flywheel.inference.testing import random_lora_adapter

    out = []
    for i in range(count):
        target = folder / f"adapter-{i}"
        if not (target / "adapter_model.safetensors").is_file():
            random_lora_adapter(model_dir, target, rank=RANK, alpha=RANK, seed=1000 + i)
        out.append(target)
    return out


def make_prompts(model_dir: Path, count: int, length: int, seed: int) -> list[list[int]]:
    """``count`` retail-media prompts, exactly ``length`` token ids each."""
    from transformers import AutoTokenizer

    from flywheel.domains.retail_media import budgeting_prompt, creative_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        ids: list[int] = []
        while len(ids) < length:
            text = (budgeting_prompt(rng) if rng.random() < 0.5 else creative_prompt(rng)).text
            ids += list(tokenizer(text, add_special_tokens=False)["input_ids"])
        prompts.append(ids[:length])
    return prompts


# --- the engine side ---------------------------------------------------------------------


def _check(response: httpx.Response, what: str) -> httpx.Response:
    if response.status_code != 200:
        raise RuntimeError(f"{what}: HTTP {response.status_code} {response.text[:500]}")
    return response


def served_base_name(url: str) -> str:
    """The base model's name on a running engine (the card without a parent)."""
    cards = _check(httpx.get(f"{url}/v1/models", timeout=30), "/v1/models").json()["data"]
    return str(next((c for c in cards if not c.get("parent")), cards[0])["id"])


def completion_body(model: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}  # fmt: skip


@dataclass
class HotLoad:
    """One adapter's hot-load, in seconds."""

    call: float
    routable: float
    request_again: float = 0.0


def hot_load_engine(url: str, adapters: list[tuple[str, Path]], prompt: list[int]) -> list[HotLoad]:
    """Load each adapter and serve a 1-token completion with it, one after the other."""
    out = []
    with httpx.Client(base_url=url, timeout=300) as client:
        for name, path in adapters:
            start = time.perf_counter()
            _check(client.post("/v1/load_lora_adapter",
                               json={"lora_name": name, "lora_path": str(path)}),
                   f"load {name}")  # fmt: skip
            loaded = time.perf_counter()
            _check(client.post("/v1/completions", json=completion_body(name, prompt, 1)), name)
            out.append(HotLoad(loaded - start, time.perf_counter() - start))
        # The same 1-token request once the adapter is in place: what the request costs.
        for (name, _), record in zip(adapters, out, strict=True):
            start = time.perf_counter()
            _check(client.post("/v1/completions", json=completion_body(name, prompt, 1)), name)
            record.request_again = time.perf_counter() - start
    return out


@dataclass
class Traffic:
    """One timed pass of the request workload."""

    seconds: float
    tokens: int
    texts: list[str]
    latencies: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


async def _drive(
    url: str, work: list[tuple[str, list[int]]], max_tokens: int, concurrency: int
) -> Traffic:
    texts = [""] * len(work)
    tokens = [0] * len(work)
    latencies = [0.0] * len(work)
    pending = iter(enumerate(work))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def client_loop() -> None:
            for i, (model, prompt) in pending:  # one iterator shared by every client
                sent = time.perf_counter()
                response = await client.post(
                    "/v1/completions", json=completion_body(model, prompt, max_tokens)
                )
                body = _check(response, f"request {i} ({model})").json()
                latencies[i] = time.perf_counter() - sent
                tokens[i] = int(body["usage"]["completion_tokens"])
                texts[i] = str(body["choices"][0]["text"])

        start = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return Traffic(seconds, sum(tokens), texts, latencies)


def drive(
    url: str, work: list[tuple[str, list[int]]], max_tokens: int, concurrency: int
) -> Traffic:
    """Send ``work`` ((model, prompt ids) each) from ``concurrency`` clients; the pass."""
    result = asyncio.run(_drive(url, work, max_tokens, concurrency))
    if result.tokens != len(work) * max_tokens:  # ignore_eos: every request runs to the end
        raise RuntimeError(f"{result.tokens} tokens generated, not {len(work) * max_tokens}")
    return result


def unload(url: str, names: Sequence[str]) -> None:
    with httpx.Client(base_url=url, timeout=60) as client:
        for name in names:
            client.post("/v1/unload_lora_adapter", json={"lora_name": name})


@dataclass
class EngineResults:
    hot: list[HotLoad]
    mixed: list[Traffic]
    base: list[Traffic]


def run_engine_side(
    url: str, adapters: list[Path], prompts: list[list[int]], args: argparse.Namespace
) -> EngineResults:
    """Warm up, hot-load the adapters one by one, then the mixed and base-only passes."""
    base = served_base_name(url)
    tag = uuid.uuid4().hex[:6]  # adapter names are immutable on the engine: fresh per run
    names = [f"hot-{tag}-{i}" for i in range(len(adapters))]
    warm = f"warm-{tag}"
    short = prompts[0][:1]  # the baseline's forward is of one token too
    loaded: list[str] = []
    try:
        log("engine: warm-up")
        drive(url, [(base, p) for p in prompts[: args.concurrency]], 4, args.concurrency)
        hot_load_engine(url, [(warm, adapters[0])], short)
        loaded.append(warm)
        unload(url, [warm])
        loaded.remove(warm)
        log(f"engine: hot-loading {len(names)} adapters")
        loaded += names  # (unloading one that never loaded is a harmless 404)
        hot = hot_load_engine(url, list(zip(names, adapters, strict=True)), short)
        mixed_work = [(names[i % len(names)], p) for i, p in enumerate(prompts)]
        base_work = [(base, p) for p in prompts]
        drive(url, mixed_work[: args.concurrency], 4, args.concurrency)  # every slot warm
        mixed: list[Traffic] = []
        base_only: list[Traffic] = []
        for repeat in range(args.repeat):
            # Alternate who goes first, so a burst of outside load hits both alike.
            order = ("mixed", "base") if repeat % 2 == 0 else ("base", "mixed")
            for kind in order:
                work = mixed_work if kind == "mixed" else base_work
                result = drive(url, work, args.max_tokens, args.concurrency)
                (mixed if kind == "mixed" else base_only).append(result)
                log(f"engine {kind}: {result.tokens} tokens in {result.seconds:.1f} s "
                    f"= {result.rate:,.1f} tokens/s")  # fmt: skip
        return EngineResults(hot, mixed, base_only)
    finally:
        if args.engine_url:  # leave a shared engine as we found it
            unload(url, loaded)


# --- the baseline side -------------------------------------------------------------------


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reload_and_merge(
    model_dir: Path, adapter: Path, device: str, dtype: str, token: int
) -> tuple[float, float]:
    """Seconds from nothing in memory to a merged model (ready), and to its first token."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=_torch_dtype(dtype))
    model = model.to(device)
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.eval()
    _sync(device)
    ready = time.perf_counter() - start
    with torch.inference_mode():
        model(input_ids=torch.tensor([[token]], device=device)).logits.argmax(-1).item()
    _sync(device)
    first_token = time.perf_counter() - start
    del model
    return ready, first_token


def hot_load_baseline(
    model_dir: Path, adapters: list[Path], runs: int, device: str, dtype: str, token: int
) -> list[tuple[float, float]]:
    """``runs`` reload-and-merge cycles (after an untimed one), each with another adapter."""
    import gc

    reload_and_merge(model_dir, adapters[-1], device, dtype, token)
    out = []
    for i in range(runs):
        gc.collect()
        out.append(reload_and_merge(model_dir, adapters[i % len(adapters)], device, dtype, token))
        log(
            f"baseline reload + merge {i + 1}/{runs}: {out[-1][0] * 1000:,.0f} ms "
            f"(+ first token: {out[-1][1] * 1000:,.0f} ms)"
        )
    return out


def peft_multi_adapter(model_dir: Path, adapters: list[Path], device: str, dtype: str) -> Any:
    """One PeftModel holding every adapter, named a0..a7."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=_torch_dtype(dtype))
    model = PeftModel.from_pretrained(model.to(device), str(adapters[0]), adapter_name="a0")
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(str(path), adapter_name=f"a{i}")
    return model.eval()


def baseline_traffic(
    model: Any, tokenizer: Any, work: list[tuple[int, list[int]]], max_tokens: int, device: str
) -> Traffic:
    """Serve ``work`` ((adapter index, prompt ids) each) one request at a time."""
    import torch

    texts, latencies, tokens = [], [], 0
    start = time.perf_counter()
    with torch.inference_mode():
        for adapter, prompt in work:
            sent = time.perf_counter()
            model.set_adapter(f"a{adapter}")
            ids = torch.tensor([prompt], device=device)
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                min_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
            new = out[0, len(prompt) :].tolist()
            tokens += len(new)
            texts.append(tokenizer.decode(new, skip_special_tokens=True))
            latencies.append(time.perf_counter() - sent)
    _sync(device)
    if tokens != len(work) * max_tokens:
        raise RuntimeError(f"baseline generated {tokens} tokens, not {len(work) * max_tokens}")
    return Traffic(time.perf_counter() - start, tokens, texts, latencies)


@dataclass
class BaselineResults:
    reload: list[tuple[float, float]]  # (ready, first token), seconds
    traffic: list[Traffic]


def run_baseline_side(
    model_dir: Path, adapters: list[Path], prompts: list[list[int]], args: argparse.Namespace
) -> BaselineResults:
    import gc

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    token = prompts[0][0]
    log(f"baseline: reload + merge, {args.reload_runs} runs")
    reload = hot_load_baseline(model_dir, adapters, args.reload_runs, args.device, args.dtype,
                               token)  # fmt: skip
    gc.collect()
    model = peft_multi_adapter(model_dir, adapters, args.device, args.dtype)
    work = [(i % len(adapters), p) for i, p in enumerate(prompts)]
    baseline_traffic(model, tokenizer, work[:2], 4, args.device)  # warm-up
    traffic = []
    for repeat in range(args.repeat):
        result = baseline_traffic(model, tokenizer, work, args.max_tokens, args.device)
        traffic.append(result)
        log(f"baseline PEFT {repeat + 1}/{args.repeat}: {result.tokens} tokens in "
            f"{result.seconds:.1f} s = {result.rate:,.1f} tokens/s")  # fmt: skip
    return BaselineResults(reload, traffic)


# --- publish -> first completion through Kafka --------------------------------------------


@contextlib.contextmanager
def inference_service(
    model_dir: Path, data_dir: Path, bootstrap: str, engine_url: str | None, base_id: str
) -> Iterator[str]:
    """``python -m flywheel.inference`` on Kafka; yields its HTTP URL once /health is 200."""
    from flywheel.core.testing.local_infra import free_port

    http_port, engine_port = free_port(), free_port()
    env = {
        **os.environ,
        "FLYWHEEL_INFERENCE_BASE_MODEL": str(model_dir),
        "FLYWHEEL_INFERENCE_BASE_MODEL_ID": base_id,
        "FLYWHEEL_EVENT_BUS": "kafka",
        "FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "FLYWHEEL_DATA_DIR": str(data_dir),
        "FLYWHEEL_HTTP_PORT": str(http_port),
        "FLYWHEEL_GRPC_PORT": str(free_port()),
        "FLYWHEEL_METRICS_PORT": "0",
        "FLYWHEEL_INFERENCE_MAX_LORA_RANK": str(RANK),
        "FLYWHEEL_INFERENCE_ENGINE_PORT": str(engine_port),
        "FLYWHEEL_INFERENCE_REPLICA_ID": "serve-bench",
        "FLYWHEEL_LOG_LEVEL": "WARNING",
        "FLYWHEEL_LOG_FORMAT": "text",
    }
    if engine_url:
        env["FLYWHEEL_INFERENCE_ENGINE_URL"] = engine_url
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "service.log"
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "flywheel.inference"], stdout=out, stderr=subprocess.STDOUT,
            env=env, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"inference service exited ({process.returncode}):\n"
                                   f"{log_path.read_text(errors='replace')[-6000:]}")  # fmt: skip
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("inference service not healthy after 600 s")
            time.sleep(0.2)
        yield url
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)
        if not engine_url:
            _stop_orphan_engine(engine_port)


def _stop_orphan_engine(port: int) -> None:
    """The service stops its engine (its own process group) on a clean exit; if it could
    not, end the engine it started on ``port`` (found by its command line) by pid."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"flywheel.inference.engine" in argv and str(port).encode() in argv:
            log(f"stopping the service's engine (pid {proc.name}), left after the service")
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), 15)


@dataclass
class PublishTiming:
    version: str
    acked: float
    registered: float | None
    served: float
    polls: int


def published_record(store_root: Path, model_dir: Path, folder: Path, version: str) -> Any:
    """Put the adapter in the artifact store as the trainer publishes it (manifest with
    every file's sha256, files, then manifest.json); its ``adapter.published`` record."""
    from flywheel.core.artifacts import LocalArtifactStore
    from flywheel.inference import testing

    manifest = testing.publish_adapter(
        LocalArtifactStore(store_root), folder, tenant=TENANT, name=KAFKA_ADAPTER,
        version=version, base_model=str(model_dir), rank=RANK, alpha=float(RANK),
    )  # fmt: skip
    return testing.published_record(manifest)


async def _publish_and_poll(
    url: str, bootstrap: str, store_root: Path, model_dir: Path, adapters: list[Path],
    versions: list[str],
) -> list[PublishTiming]:  # fmt: skip
    from flywheel.core.events.kafka import KafkaBus

    bus = KafkaBus(bootstrap, client_id="serve-bench")
    out = []
    headers = {TENANT_HEADER: TENANT}
    try:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as client:
            for folder, version in zip(adapters, versions, strict=True):
                record = await asyncio.to_thread(
                    published_record, store_root, model_dir, folder, version
                )
                body = {
                    "model": f"{KAFKA_ADAPTER}@{version}", "max_tokens": 1, "temperature": 0,
                    "messages": [{"role": "user", "content": "Split $10,000."}],
                    "skip_logging": True,
                }  # fmt: skip
                start = time.perf_counter()
                await bus.publish([record])
                acked = time.perf_counter() - start
                registered: float | None = None
                polls = 0
                while True:
                    response = await client.post("/v1/chat/completions", json=body)
                    polls += 1
                    now = time.perf_counter() - start
                    if response.status_code == 200:
                        served_by = response.json()["served_by"]
                        if (served_by.get("adapter") or {}).get("version") == version:
                            out.append(PublishTiming(version, acked, registered, now, polls))
                            break
                    elif response.status_code == 409 and registered is None:
                        registered = now  # known to the registry, not routable yet
                    elif response.status_code not in (404, 409):
                        raise RuntimeError(f"{response.status_code}: {response.text[:500]}")
                    if now > 300:
                        raise TimeoutError(f"{body['model']} not served 300 s after publish")
                    await asyncio.sleep(POLL_S)
                log(f"kafka {version}: acked {acked * 1000:.0f} ms, served after "
                    f"{now * 1000:.0f} ms ({polls} polls)")  # fmt: skip
    finally:
        await bus.close()
    return out


def run_kafka_side(
    model_dir: Path, adapters: list[Path], root: Path, args: argparse.Namespace
) -> list[PublishTiming]:
    """Start Kafka (unless given), the inference service, publish and time; stop both."""
    from flywheel.contracts.trainer.v1 import events_pb2 as te
    from flywheel.core.events.envelope import event_options
    from flywheel.core.events.kafka import ensure_topics
    from flywheel.core.testing.local_infra import LocalKafka
    from flywheel.inference.hotload import engine_name

    kafka = LocalKafka.attach(args.kafka) if args.kafka else LocalKafka(data_dir=root / "kafka")
    log("kafka: starting the broker" if not args.kafka else f"kafka: using {args.kafka}")
    bootstrap = kafka.start()
    try:
        ensure_topics(bootstrap, [event_options(te.AdapterPublished)[1]])
        data_dir = root / "inference"
        base_id = served_base_name(args.engine_url) if args.engine_url else str(model_dir)
        if base_id != str(model_dir):
            # The adapters name their base by folder (as the trainer's do); the service
            # rejects them unless the engine serves the model under that name.
            log(
                f"kafka: skipped: the engine serves {base_id!r}, not {str(model_dir)!r} "
                "(start it without --served-model-name)"
            )
            return []
        log("kafka: starting the inference service")
        with inference_service(model_dir, data_dir, bootstrap, args.engine_url, base_id) as url:
            versions = [f"v{i + 1}" for i in range(args.kafka_adapters + 1)]
            folders = [adapters[i % len(adapters)] for i in range(len(versions))]
            # The first (untimed) also waits for the service's consumer group to join.
            timings = asyncio.run(_publish_and_poll(url, bootstrap, data_dir / "artifacts",
                                                    model_dir, folders, versions))  # fmt: skip
        if args.engine_url:  # the service leaves its adapters loaded; a shared engine keeps none
            unload(args.engine_url, [engine_name(TENANT, KAFKA_ADAPTER, v) for v in versions])
        return timings[1:]
    finally:
        kafka.stop()


# --- report ------------------------------------------------------------------------------


def _result(metric: str, unit: str, ours: float, baseline: float | None, ratio: float | None,
            digits: int = 1) -> dict[str, Any]:  # fmt: skip
    return {"metric": metric, "unit": unit, "ours": round(ours, digits),
            "baseline": None if baseline is None else round(baseline, digits),
            "ratio": None if ratio is None else round(ratio, 3), "goal": GOALS[metric]}  # fmt: skip


def _agreement(ours: list[str], theirs: list[str]) -> int:
    return sum(a == b for a, b in zip(ours, theirs, strict=True))


def report(
    args: argparse.Namespace, params: int, engine: EngineResults, baseline: BaselineResults,
    kafka: list[PublishTiming] | None, engine_label: str,
) -> dict[str, Any]:  # fmt: skip
    hot_call = median([h.call for h in engine.hot]) * 1000
    hot_routable = median([h.routable for h in engine.hot]) * 1000
    hot_again = median([h.request_again for h in engine.hot]) * 1000
    reload = median([r[0] for r in baseline.reload]) * 1000
    reload_token = median([r[1] for r in baseline.reload]) * 1000
    mixed = max(engine.mixed, key=lambda t: t.rate)
    base = max(engine.base, key=lambda t: t.rate)
    peft = max(baseline.traffic, key=lambda t: t.rate)

    print(f"\n{engine_label}; {params / 1e6:.1f}M-parameter Llama, {args.dtype}, rank-{RANK} "
          f"adapters on all 7 projections; {os.cpu_count()} CPU cores; baseline on "
          f"{args.device} with {args.threads} threads; load average at start "
          f"{args.load_at_start:.1f}, at end {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("\nhot-load (ms)                                   median      runs")
    print(f"  engine: load call                            {hot_call:>8.1f}   "
          f"{[round(h.call * 1000, 1) for h in engine.hot]}")  # fmt: skip
    print(f"  engine: load call + 1-token completion       {hot_routable:>8.1f}   "
          f"{[round(h.routable * 1000, 1) for h in engine.hot]}")  # fmt: skip
    print(f"  engine: the same completion, adapter loaded  {hot_again:>8.1f}")
    print(f"  baseline: reload + PEFT load + merge       {reload:>8.1f}   "
          f"{[round(r[0] * 1000) for r in baseline.reload]}")  # fmt: skip
    print(f"  baseline: the same + 1-token forward       {reload_token:>8.1f}   "
          f"{[round(r[1] * 1000) for r in baseline.reload]}")  # fmt: skip
    if kafka:
        print(f"  publish -> first completion (Kafka)          "
              f"{median([k.served for k in kafka]) * 1000:>8.1f}   "
              f"{[round(k.served * 1000) for k in kafka]}")  # fmt: skip
        for k in kafka:
            known = "-" if k.registered is None else f"{k.registered * 1000:.0f}"
            print(f"    {k.version}: publish acked {k.acked * 1000:.0f}, first 409 (registered, "
                  f"loading) {known}, served {k.served * 1000:.0f}; {k.polls} polls")  # fmt: skip
    print(f"\ntraffic: {args.requests} requests x {args.max_tokens} tokens, prompts "
          f"{PROMPT_TOKENS} tokens, best of {args.repeat}")  # fmt: skip
    print(f"{'':<34} {'seconds':>8} {'tokens':>7} {'tokens/s':>9} {'p50 ms':>8} {'p99 ms':>8}"
          "  runs (tokens/s)")  # fmt: skip
    rows = (("engine, 8 adapters mixed", mixed, engine.mixed),
            ("engine, base model only", base, engine.base),
            ("baseline PEFT, set_adapter", peft, baseline.traffic))  # fmt: skip
    for label, t, runs in rows:
        ordered = sorted(t.latencies)
        p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
        print(f"{label:<34} {t.seconds:>8.2f} {t.tokens:>7} {t.rate:>9.1f} "
              f"{median(ordered) * 1000:>8.0f} {p99 * 1000:>8.0f}  "
              f"{[round(r.rate, 1) for r in runs]}")  # fmt: skip
    print(
        f"greedy texts equal to the baseline's: {_agreement(mixed.texts, peft.texts)}/"
        f"{len(peft.texts)}; mixed texts differing from base-only: "
        f"{len(mixed.texts) - _agreement(mixed.texts, base.texts)}/{len(mixed.texts)}"
    )

    results = [
        _result("hot_load_latency", "ms", hot_call, reload, reload / hot_call),
        _result("hot_load_to_first_token", "ms", hot_routable, reload_token,
                reload_token / hot_routable),
    ]  # fmt: skip
    if kafka:
        served = median([k.served for k in kafka]) * 1000
        results.append(_result("publish_to_first_completion", "ms", served, None, None))
    results += [
        _result("mixed_adapter_throughput", "tokens/s", mixed.rate, peft.rate,
                mixed.rate / peft.rate),
        _result("adapter_overhead", "tokens/s", mixed.rate, base.rate, mixed.rate / base.rate),
    ]  # fmt: skip
    return {"bench": "serve", "results": results}


def main(argv: list[str] | None = None) -> int:
    """Make the model and adapters, measure the engine, the baseline and Kafka, report."""
    parser = argparse.ArgumentParser(description="LoRA serving: Flywheel's engine vs PEFT")
    parser.add_argument("--small", action="store_true",
                        help="~12M model, 16 requests x 8 tokens: a smoke run")  # fmt: skip
    parser.add_argument("--requests", type=int, help="requests per pass (64; --small 16)")
    parser.add_argument("--max-tokens", type=int, help="tokens per request (32; --small 8)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients (16)")
    parser.add_argument("--repeat", type=int, help="passes per side, best kept (2; --small 1)")
    parser.add_argument("--reload-runs", type=int, default=3, help="baseline reloads (3)")
    parser.add_argument("--kafka-adapters", type=int, default=3, help="timed publishes (3)")
    parser.add_argument("--engine-url", help="drive this running engine (vLLM's HTTP API)")
    parser.add_argument("--model-dir", type=Path, help="base model folder (with --engine-url)")
    parser.add_argument("--adapter-dir", type=Path,
                        help="where the adapters are made (readable by the engine)")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="baseline device (cpu; cuda on a GPU)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="baseline dtype (float32, the CPU engine's)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="baseline torch threads (all cores, as the engine)")  # fmt: skip
    parser.add_argument("--kafka", help="bootstrap address of a running Kafka to use")
    parser.add_argument("--skip-kafka", action="store_true", help="skip publish -> completion")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.requests = args.requests or (16 if args.small else 64)
    args.max_tokens = args.max_tokens or (8 if args.small else 32)
    args.repeat = args.repeat or (1 if args.small else 2)
    if args.engine_url and not args.model_dir:
        parser.error("--engine-url needs --model-dir (the folder the engine serves)")

    import torch

    args.load_at_start = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    model_dir = (args.model_dir or base_model(args.small)).resolve()
    params = parameter_count(model_dir)
    log(f"model {model_dir}: {params:,} parameters")
    root = Path(tempfile.mkdtemp(prefix="flywheel-serve-bench-"))
    try:
        adapter_dir = (args.adapter_dir or root / "adapters").resolve()
        log(f"making {ADAPTERS} rank-{RANK} adapters in {adapter_dir}")
        adapters = make_adapters(model_dir, adapter_dir, ADAPTERS)
        prompts = make_prompts(model_dir, args.requests, PROMPT_TOKENS, args.seed)

        if args.engine_url:
            engine = run_engine_side(args.engine_url.rstrip("/"), adapters, prompts, args)
            label = f"engine at {args.engine_url}"
        else:
            from flywheel.inference.testing import engine_server

            engine_args = ["--max-loras", str(ADAPTERS), "--max-lora-rank", str(RANK),
                           "--max-num-seqs", "16"]  # fmt: skip
            log("engine: starting")
            with engine_server(model_dir, served_model_name="base", args=engine_args,
                               log_path=root / "engine.log") as url:  # fmt: skip
                engine = run_engine_side(url, adapters, prompts, args)
            label = "Flywheel CPU engine (--max-loras 8 --max-lora-rank 16 --max-num-seqs 16)"
        baseline = run_baseline_side(model_dir, adapters, prompts, args)
        kafka = None if args.skip_kafka else run_kafka_side(model_dir, adapters, root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    result = report(args, params, engine, baseline, kafka, label)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("FLYWHEEL_LOG_LEVEL", "WARNING")
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.exit(main())
