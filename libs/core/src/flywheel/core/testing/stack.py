"""The whole stack as separate processes (`flywheel up` on PostgreSQL + Kafka), for tests.

with running_stack(tmp_path, pg_url, kafka.bootstrap) as stack:
    key = stack.key("acme", "integrator")
    httpx.post(f"{stack.gateway}/v1/feedback", headers={"Authorization": f"Bearer {key}"})
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FLYWHEEL = [sys.executable, "-m", "flywheel.cli.main"]


@dataclass
class Stack:
    """A running `flywheel up`: its ports, and the bootstrap commands against it."""

    services: dict[str, Any]
    env: dict[str, str]
    data_dir: Path

    def grpc(self, service: str) -> str:
        """``host:port`` of a service's gRPC server."""
        return f"127.0.0.1:{self.services[service]['grpc_port']}"

    @property
    def gateway(self) -> str:
        """Base URL of the gateway's REST API."""
        return f"http://127.0.0.1:{self.services['gateway']['http_port']}"

    def cli(self, *args: str) -> str:
        """Run a `flywheel` command against the stack; its stdout (fails on an error)."""
        result = subprocess.run(
            [*FLYWHEEL, *args], capture_output=True, text=True, env=self.env, timeout=60
        )
        if result.returncode != 0:
            raise AssertionError(f"flywheel {' '.join(args)}: {result.stdout}{result.stderr}")
        return result.stdout

    def key(self, tenant: str, role: str, *, create_tenant: bool = True) -> str:
        """A new API key's secret for ``tenant`` (created first unless told not to)."""
        feedback = ("--feedback", self.grpc("feedback"))
        if create_tenant:
            self.cli("tenant", "create", tenant, *feedback)
        out = self.cli("key", "create", "--tenant", tenant, "--role", role, "--name", role,
                       *feedback)  # fmt: skip
        match = re.search(r"secret \(shown once, keep it safe\): (\S+)", out)
        if match is None:
            raise AssertionError(f"no secret in: {out}")
        return match.group(1)


@contextlib.contextmanager
def running_stack(
    tmp_path: Path,
    pg_url: str | None = None,
    kafka_bootstrap: str | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[Stack]:
    """`flywheel up` on free ports until the block ends (SIGINT): on PostgreSQL + Kafka when
    given their addresses, else on the embedded default."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    full_env = base | (env or {})
    if "FLYWHEEL_INFERENCE_BASE_MODEL" not in full_env:
        # The inference service serves a base model; tests get the tiny one (a second to
        # build) rather than the demo's bootstrap model (minutes). Imported here: core
        # does not depend on the services, only its test helpers use them.
        from flywheel.inference.testing import tiny_base_model

        full_env["FLYWHEEL_INFERENCE_BASE_MODEL"] = str(tiny_base_model(tmp_path / "models"))
    data = tmp_path / "data"
    stack_args = ["--stack", "embedded"]
    if pg_url is not None and kafka_bootstrap is not None:
        stack_args = ["--stack", "postgres+kafka", "--database-url", pg_url,
                      "--kafka-bootstrap", kafka_bootstrap]  # fmt: skip
    up = subprocess.Popen(
        [*FLYWHEEL, "up", "--free-ports", "--data-dir", str(data), *stack_args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
    )  # fmt: skip
    try:
        assert up.stdout is not None
        for line in up.stdout:
            if "gateway on http" in line:
                break
        else:
            raise AssertionError(f"flywheel up exited with {up.wait()}")
        services = json.loads((data / "run" / "state.json").read_text())["services"]
        yield Stack(services, full_env, data)
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=60)
