"""``python -m flywheel.inference.engine --model PATH``: Flywheel's CPU engine server.

Takes the options of ``vllm serve`` that matter on a CPU, with the same meaning, so the
inference service starts and drives either the same way.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch
import uvicorn

from flywheel.inference.engine.core import EngineCore
from flywheel.inference.engine.http_app import build_app
from flywheel.inference.engine.loading import load_base

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (names as in ``vllm serve``)."""
    parser = argparse.ArgumentParser(prog="python -m flywheel.inference.engine")
    parser.add_argument("--model", required=True, help="base model folder or Hugging Face id")
    parser.add_argument("--served-model-name", help="name in /v1/models (default: --model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-loras", type=int, default=8, help="adapters in one batch")
    parser.add_argument("--max-lora-rank", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=16, help="sequences in one batch")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Load the model, start the engine thread, serve HTTP until stopped."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_base(args.model, DTYPES[args.dtype])
    core = EngineCore(
        model,
        tokenizer,
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        max_num_seqs=args.max_num_seqs,
    )
    core.start()
    app = build_app(core, args.served_model_name or args.model, args.model)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        core.stop()


if __name__ == "__main__":
    main()
