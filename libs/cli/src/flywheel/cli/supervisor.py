"""Runs every service as its own process on loopback and keeps them running.

A service that exits unexpectedly is restarted with backoff; SIGINT/SIGTERM stop them all
(SIGTERM first, SIGKILL for any that outlive the grace period). The supervisor writes a state
file, so ``flywheel status`` in another terminal can find the services.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from flywheel.cli.services import SERVICE_NAMES, ServicePorts
from flywheel.core.rpc import check_health

STATE_FILE = "run/state.json"
MAX_BACKOFF_S = 30.0


@dataclass
class ManagedService:
    """One supervised service process."""

    ports: ServicePorts
    env: dict[str, str]
    log_path: Path
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    started_at: float = field(default=0.0)

    @property
    def name(self) -> str:
        """The service name."""
        return self.ports.name

    async def start(self) -> None:
        """Spawn ``python -m flywheel.<name>``, logging to its own file."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = self.log_path.open("ab")
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                f"flywheel.{self.name}",
                env=self.env,
                stdout=log_file,
                stderr=log_file,
                # Own process group: a Ctrl-C at the terminal reaches only the supervisor,
                # which then stops the services in order.
                start_new_session=True,
            )
        finally:
            log_file.close()
        self.started_at = time.monotonic()


class Supervisor:
    """Starts, watches and stops the services of one machine."""

    def __init__(
        self,
        plan: dict[str, ServicePorts],
        base_env: dict[str, str],
        data_dir: Path,
        *,
        grace_s: float = 10.0,
    ) -> None:
        self.data_dir = data_dir
        self.grace_s = grace_s
        upstreams = json.dumps(
            {n: f"127.0.0.1:{p.grpc_port}" for n, p in plan.items() if n != "gateway"}
        )
        inference_http = plan["inference"].http_port
        self.services: dict[str, ManagedService] = {}
        for name in SERVICE_NAMES:
            ports = plan[name]
            env = {
                **base_env,
                "FLYWHEEL_DATA_DIR": str(data_dir),
                "FLYWHEEL_GRPC_PORT": str(ports.grpc_port),
                "FLYWHEEL_METRICS_PORT": str(ports.metrics_port),
                "FLYWHEEL_UPSTREAMS": upstreams,
                # The inference service's OpenAI API, which the gateway proxies.
                "FLYWHEEL_INFERENCE_URL": f"http://127.0.0.1:{inference_http}",
            }
            if ports.http_port is not None:
                env["FLYWHEEL_HTTP_PORT"] = str(ports.http_port)
            self.services[name] = ManagedService(ports, env, data_dir / "logs" / f"{name}.log")
        self.stopping = asyncio.Event()

    @property
    def state_path(self) -> Path:
        """Where ``flywheel status`` finds the running services."""
        return self.data_dir / STATE_FILE

    def _write_state(self) -> None:
        state = {
            "supervisor_pid": os.getpid(),
            "services": {
                name: {
                    **svc.ports.to_json(),
                    "pid": svc.process.pid if svc.process else None,
                    "log": str(svc.log_path),
                    "restarts": svc.restarts,
                }
                for name, svc in self.services.items()
            },
        }
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_path)

    async def start_all(self) -> None:
        """Spawn every service."""
        for svc in self.services.values():
            await svc.start()
        self._write_state()

    async def wait_healthy(self, timeout_s: float = 120.0) -> dict[str, str]:
        """Wait until every service reports SERVING; return the last status of each."""
        deadline = time.monotonic() + timeout_s
        statuses: dict[str, str] = {}
        while True:
            statuses = await health_of({n: s.ports.grpc_port for n, s in self.services.items()})
            if all(v == "SERVING" for v in statuses.values()):
                return statuses
            dead = [
                n
                for n, s in self.services.items()
                if s.process and s.process.returncode is not None
            ]
            if dead or time.monotonic() > deadline:
                for name in dead:
                    statuses[name] = f"EXITED ({self.services[name].process.returncode})"  # type: ignore[union-attr]
                return statuses
            await asyncio.sleep(0.25)

    async def supervise(self) -> None:
        """Restart services that exit until :attr:`stopping` is set."""
        while not self.stopping.is_set():
            for svc in self.services.values():
                proc = svc.process
                if proc is None or proc.returncode is None:
                    continue
                # Back off on a service that keeps crashing soon after start.
                uptime = time.monotonic() - svc.started_at
                backoff = 0.0 if uptime > MAX_BACKOFF_S else min(MAX_BACKOFF_S, 2.0**svc.restarts)
                if uptime < backoff:
                    continue
                print(
                    f"flywheel: {svc.name} exited with {proc.returncode}; restarting "
                    f"(log: {svc.log_path})",
                    file=sys.stderr,
                )
                svc.restarts += 1
                await svc.start()
                self._write_state()
            await asyncio.wait([asyncio.ensure_future(self.stopping.wait())], timeout=0.5)

    async def stop_all(self) -> None:
        """SIGTERM every service (gateway first), SIGKILL those still alive after the grace."""
        self.stopping.set()
        running = [
            s.process
            for s in reversed(self.services.values())
            if s.process and s.process.returncode is None
        ]
        for proc in running:
            proc.terminate()
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in running)), self.grace_s)
        except TimeoutError:
            for proc in running:
                if proc.returncode is None:
                    proc.kill()
            await asyncio.gather(*(p.wait() for p in running))
        self.state_path.unlink(missing_ok=True)


async def health_of(grpc_ports: dict[str, int]) -> dict[str, str]:
    """Each service's gRPC health status."""
    names = list(grpc_ports)
    results = await asyncio.gather(
        *(check_health(f"127.0.0.1:{grpc_ports[n]}", timeout_s=1.0) for n in names)
    )
    return dict(zip(names, results, strict=True))


async def gateway_ready(http_port: int, timeout_s: float = 5.0) -> tuple[int, str]:
    """GET the gateway's /readyz: (HTTP status, body); status 0 if it does not answer."""

    def get() -> tuple[int, str]:
        url = f"http://127.0.0.1:{http_port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()
        except OSError as exc:
            return 0, str(exc)

    return await asyncio.to_thread(get)


def read_state(data_dir: Path) -> dict[str, object] | None:
    """The state file written by a running ``flywheel up``, if any."""
    path = data_dir / STATE_FILE
    if not path.is_file():
        return None
    state: dict[str, object] = json.loads(path.read_text())
    return state
