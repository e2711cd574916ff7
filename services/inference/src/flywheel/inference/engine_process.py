"""Running Flywheel's CPU engine as a child process of an inference replica.

One engine per replica: the replica starts it on a free loopback port, waits for its
``/health``, and stops it on shutdown. If the engine dies the replica fails too, so the
supervisor (``flywheel up``, Kubernetes) restarts both together.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from pathlib import Path

from flywheel.inference.engine_client import EngineClient


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def engine_command(
    model: str, name: str, port: int, *, max_loras: int, max_lora_rank: int, max_num_seqs: int
) -> list[str]:
    """The command line of a CPU engine for ``model`` served as ``name``."""
    return [
        sys.executable, "-m", "flywheel.inference.engine", "--model", model,
        "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port),
        "--max-loras", str(max_loras), "--max-lora-rank", str(max_lora_rank),
        "--max-num-seqs", str(max_num_seqs),
    ]  # fmt: skip


async def wait_healthy(client: EngineClient, deadline_s: float) -> None:
    """Return once the engine answers ``/health``; raise if time runs out (an engine that
    dies makes ``run_engine`` fail, which stops the service)."""
    loop = asyncio.get_running_loop()
    until = loop.time() + deadline_s
    while not await client.healthy():
        if loop.time() > until:
            raise TimeoutError(f"the engine at {client.base_url} was not healthy in {deadline_s}s")
        await asyncio.sleep(0.25)


async def run_engine(command: list[str], log_path: Path, stop: asyncio.Event) -> None:
    """Run the engine until ``stop``; raise if it exits on its own before that."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            *command, stdout=log, stderr=log, start_new_session=True, env={**os.environ}
        )
        waiter = asyncio.create_task(process.wait())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([waiter, stopping], return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():
            stopping.cancel()
            raise RuntimeError(
                f"the engine exited with status {process.returncode}; see {log_path}"
            )
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(waiter, timeout=10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await waiter
