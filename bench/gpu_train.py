"""GPU training benchmark: LoRA and QLoRA tokens/s and model-FLOPs utilisation on a ~1B Llama.

    bench/gpu_train.sh [--steps N] [--batch B] [--seq-len L] [--modes lora,qlora]
    uv run python bench/gpu_train.py --tiny --device cpu      # smoke test of this script

Needs no network: the model is a randomly initialised Llama of TinyLlama's shape (1.1B
parameters: hidden 2048, 22 layers, 32 heads with 4 KV heads, vocab 32000), written once
to a temporary folder in bf16 and loaded back, plainly for LoRA and as 4-bit NF4 (double
quantisation, bf16 compute) through bitsandbytes for QLoRA; the data is a seeded stream
of random tokens. Speed does not depend on what the weights are, so random ones measure
what trained ones would.

Each mode trains a PEFT LoRA adapter (r 16, alpha 32, every linear layer) with AdamW in a
plain PyTorch loop under bf16 autocast: a few warm-up steps, then ``--steps`` timed ones.
Reported per mode: tokens/s, peak GPU memory, and MFU, model FLOPs per second over the
card's dense bf16 peak (H100 SXM and H200 989 TFLOPS, H100 PCIe 756; ``--peak-tflops``
for others), with model FLOPs per token the standard ``6 N + 12 layers hidden seq_len``
(N: parameters outside the input embedding; the second term is attention). LoRA does not
compute weight gradients of the frozen base, so about a third of those 6N FLOPs are
never done; ``mfu_4n`` (``4 N`` + attention) is printed beside it for that reason.

The last line is the JSON result described in docs/benchmarks.md (no baseline: ``ratio``
and ``goal`` are null).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Dense bf16 peak (no sparsity) by device name, most specific first.
PEAK_BF16_FLOPS = (("H200", 989.4e12), ("H100 PCIe", 756.0e12), ("H100", 989.4e12),
                   ("A100", 312.0e12))  # fmt: skip


@dataclass(frozen=True)
class Shape:
    """The Llama configuration measured."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int


ONE_B = Shape(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000)
TINY = Shape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=256)


def log(message: str) -> None:
    print(f"[gpu-train] {message}", file=sys.stderr, flush=True)


def peak_flops(device: torch.device, override: float | None) -> tuple[str, float | None]:
    """The device's name and dense bf16 peak FLOP/s (None where unknown)."""
    if override:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        return name, override * 1e12
    if device.type != "cuda":
        return device.type, None
    name = torch.cuda.get_device_name(device)
    return name, next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def write_random_model(shape: Shape, folder: Path, dtype: torch.dtype, seed: int) -> Path:
    """A randomly initialised Llama of ``shape`` saved as a normal model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=4096,
        tie_word_embeddings=False,
    )  # fmt: skip
    model: Any = LlamaForCausalLM(config)
    model = model.to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def load(folder: Path, *, qlora: bool, device: torch.device, dtype: torch.dtype) -> Any:
    """The saved model with a fresh LoRA adapter, plain or on a 4-bit NF4 base."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": dtype}
    if qlora:
        kwargs["quantization_config"] = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )  # fmt: skip
        kwargs["device_map"] = {"": device.index or 0}
    model: Any = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if qlora:
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=False
        )
    else:
        model = model.to(device)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                      task_type="CAUSAL_LM")  # fmt: skip
    return get_peft_model(model, lora)


def model_flops_per_token(shape: Shape, params: int, seq_len: int, factor: int) -> float:
    """``factor * N`` plus attention's ``12 * layers * hidden * seq_len`` (PaLM's count)."""
    return factor * params + 12 * shape.layers * shape.hidden * seq_len


def train(model: Any, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    """Warm-up then timed steps on random tokens; seconds, tokens and peak memory."""
    generator = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    losses: list[float] = []

    def step() -> None:
        batch = torch.randint(0, vocab, (args.batch, args.seq_len), generator=generator)
        batch = batch.to(device, non_blocking=True)
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()  # float(loss) syncs each step, as a training loop that logs does
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return seconds, args.steps * args.batch * args.seq_len, peak, losses


def measure(mode: str, folder: Path, shape: Shape, args: argparse.Namespace) -> dict[str, Any]:
    """One mode: load, train, and its figures."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load(folder, qlora=mode == "qlora", device=device, dtype=dtype)
    base = model.get_base_model()
    params = sum(p.numel() for p in base.parameters())
    params -= base.get_input_embeddings().weight.numel()  # a lookup, not a matmul
    if mode == "qlora":  # bitsandbytes packs two 4-bit weights per stored element
        params = (
            sum(
                m.in_features * m.out_features
                for m in base.modules()
                # bitsandbytes' own layer only: PEFT's LoRA wrapper around it is also
                # called Linear4bit and would count every weight twice.
                if type(m).__name__ == "Linear4bit"
                and type(m).__module__.startswith("bitsandbytes")
            )
            + sum(p.numel() for n, p in base.named_parameters() if "norm" in n)
            + base.get_output_embeddings().weight.numel()
        )
    seconds, tokens, peak, losses = train(model, args, device, dtype)
    name, peak_flops_s = peak_flops(device, args.peak_tflops)
    rate = tokens / seconds
    mfu = {
        f"mfu{suffix}": None
        if peak_flops_s is None
        else rate * model_flops_per_token(shape, params, args.seq_len, factor) / peak_flops_s
        for suffix, factor in (("", 6), ("_4n", 4))
    }
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"{mode}: {rate:,.0f} tokens/s, MFU {mfu['mfu']}, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"mode": mode, "device": name, "tokens_per_s": rate, "seconds": seconds,
            "params": params, "trainable_params": trainable, "peak_memory_bytes": peak,
            "final_loss": losses[-1], **mfu}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Measure every requested mode and print the report."""
    parser = argparse.ArgumentParser(description="LoRA / QLoRA tokens/s and MFU on a ~1B Llama")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu with --tiny")
    parser.add_argument("--tiny", action="store_true", help="a toy model: tests this script")
    parser.add_argument("--modes", default="lora,qlora", help="comma-separated (lora,qlora)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps (3)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (8)")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (1024)")
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, if unknown")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        message = "CUDA is not available (no NVIDIA GPU or driver); this benchmark needs one"
        print(f"gpu_train: {message}. Use --tiny --device cpu to test the script.", file=sys.stderr)
        return 2
    if device.type != "cuda" and not args.tiny:
        print("gpu_train: a 1B model on the CPU would take hours; add --tiny", file=sys.stderr)
        return 2
    shape = TINY if args.tiny else ONE_B
    if args.tiny:
        args.steps, args.warmup, args.batch, args.seq_len = min(args.steps, 3), 1, 2, 32
    modes = args.modes.split(",")
    if "qlora" in modes and device.type != "cuda":
        log("qlora skipped: bitsandbytes' 4-bit training path is measured on CUDA only")
        modes.remove("qlora")
    results = []
    with tempfile.TemporaryDirectory(prefix="flywheel-gpu-train-") as tmp:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        folder = write_random_model(shape, Path(tmp), dtype, args.seed)
        results = [measure(mode, folder, shape, args) for mode in modes]

    print(f"\n{'mode':<6} {'tokens/s':>10} {'MFU (6N)':>9} {'MFU (4N)':>9} {'peak GiB':>9}  device")
    for r in results:
        pct = {k: "-" if r[k] is None else f"{r[k]:.1%}" for k in ("mfu", "mfu_4n")}
        mem = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.1f}"
        print(f"{r['mode']:<6} {r['tokens_per_s']:>10,.0f} {pct['mfu']:>9} {pct['mfu_4n']:>9} "
              f"{mem:>9}  {r['device']}")  # fmt: skip
    rows: list[dict[str, Any]] = []
    for r in results:
        for metric, unit, value in (("tokens_per_s", "tokens/s", r["tokens_per_s"]),
                                    ("mfu", "fraction", r["mfu"]),
                                    ("peak_memory", "bytes", r["peak_memory_bytes"])):  # fmt: skip
            rows.append({"metric": f"{r['mode']}_{metric}", "unit": unit, "ours": value,
                         "baseline": None, "ratio": None, "goal": None})  # fmt: skip
    shape_text = f"{shape.hidden}h x {shape.layers}L, seq {args.seq_len}, batch {args.batch}"
    device_name = results[0]["device"] if results else args.device
    print(json.dumps({"bench": "gpu_train", "device": device_name, "shape": shape_text,
                      "results": rows}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
