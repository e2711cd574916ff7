"""Ingest benchmark: sustained feedback POSTs/s and latency, Flywheel against a bare baseline.

    uv run python bench/ingest.py [--duration S] [--connections C] [--bus kafka|embedded]

Starts PostgreSQL (and Kafka, the default bus) in a temporary directory, then measures, with
the same client load (wrk, C keep-alive connections, the same small JSON body):

- **flywheel**: ``POST /v1/feedback`` on the gateway -> gRPC -> feedback service -> one
  transaction with the feedback row, its revision and its outbox event in PostgreSQL; the
  relay publishes the events to the bus meanwhile, as in production. The gateway coalesces
  concurrent POSTs into ``BatchRecordFeedback`` calls (group commit).
- **baseline**: a bare FastAPI endpoint inserting one row with SQLAlchemy and committing per
  request (``bench/ingest_baseline_app.py``), on the same PostgreSQL server.

Every request answered 2xx must be durable: afterwards the benchmark counts the rows (and, for
Flywheel, the outbox events) and fails if any acknowledged one is missing. Prints a table, then
as its last line the JSON result described in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from flywheel.contracts.common.v1.common_pb2 import AdapterRef, Prompt
from flywheel.contracts.feedback.v1 import resources_pb2 as pb
from flywheel.contracts.feedback.v1 import service_pb2 as api
from flywheel.contracts.feedback.v1.service_pb2_grpc import FeedbackServiceStub
from flywheel.core.testing.local_infra import LocalKafka, LocalPostgres, free_port

BENCH_DIR = Path(__file__).resolve().parent
GOALS = {"feedback_posts_per_s": 3.0, "feedback_p99_latency": 1.0}

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [[%(body)s]]
wrk.headers["Content-Type"] = "application/json"
%(auth)s
done = function(summary, latency, requests)
  io.write(string.format(
    'WRK_JSON {"requests": %%d, "duration_us": %%d, "non2xx": %%d, "socket_errors": %%d,'
    .. ' "p50_us": %%d, "p99_us": %%d, "max_us": %%d}\\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def log(message: str) -> None:
    """Progress on stderr, so stdout stays the report."""
    print(f"[ingest] {message}", file=sys.stderr, flush=True)


@dataclass
class Load:
    """What wrk measured."""

    requests: int
    duration_s: float
    non2xx: int
    socket_errors: int
    p50_ms: float
    p99_ms: float
    cpu_s: dict[str, float] = field(default_factory=dict)

    @property
    def acknowledged(self) -> int:
        """Requests answered 2xx: each must be durable."""
        return self.requests - self.non2xx

    @property
    def per_s(self) -> float:
        """Acknowledged requests per second."""
        return self.acknowledged / self.duration_s


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CPU_PARTS = ("gateway", "feedback", "baseline app", "postgres", "kafka", "wrk", "other")


def _part_of(pid: str) -> str:
    """Which part of the benchmark process ``pid`` belongs to, from its command line."""
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    for needle, part in (
        (b"flywheel.gateway", "gateway"), (b"flywheel.feedback", "feedback"),
        (b"ingest_baseline_app", "baseline app"), (b"postgres", "postgres"),
        (b"kafka", "kafka"), (b"wrk", "wrk"),
    ):  # fmt: skip
        if needle in cmdline:
            return part
    return "other"


def cpu_by_part() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) each process on the machine has used so far, by part."""
    usage: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            # Fields after the parenthesised command name; utime and stime are 14 and 15.
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            usage[int(entry.name)] = (
                _part_of(entry.name),
                (int(fields[11]) + int(fields[12])) / CLOCK_TICKS,
            )
    return usage


def cpu_between(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU seconds per part spent between two ``cpu_by_part`` snapshots."""
    spent: dict[str, float] = {}
    for pid, (part, seconds) in after.items():
        spent[part] = spent.get(part, 0.0) + seconds - before.get(pid, (part, 0.0))[1]
    return spent


def _children_cpu_s() -> float:
    """CPU seconds used by this process's waited-for children (wrk, once it has exited)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_wrk(url: str, body: str, auth: str | None, seconds: float, connections: int) -> Load:
    """Drive ``url`` with wrk for ``seconds``, accounting the CPU every process spent meanwhile."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        header = f'wrk.headers["Authorization"] = "Bearer {auth}"' if auth else ""
        script.write(WRK_SCRIPT % {"body": body, "auth": header})
    try:
        cpu_before, wrk_before = cpu_by_part(), _children_cpu_s()
        out = subprocess.run(
            ["wrk", "-t2", f"-c{connections}", f"-d{round(seconds)}s", "-s", script.name, url],
            capture_output=True, text=True, check=True, timeout=seconds + 60,
        ).stdout  # fmt: skip
        cpu = cpu_between(cpu_before, cpu_by_part())
        # wrk has exited by now, so /proc no longer shows it: it is this process's child.
        cpu["wrk"] = _children_cpu_s() - wrk_before
    finally:
        os.unlink(script.name)
    line = next(line for line in out.splitlines() if line.startswith("WRK_JSON "))
    data = json.loads(line.removeprefix("WRK_JSON "))
    return Load(
        requests=data["requests"],
        duration_s=data["duration_us"] / 1e6,
        non2xx=data["non2xx"],
        socket_errors=data["socket_errors"],
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        cpu_s=cpu,
    )


def wait_http(url: str, process: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    """Wait until ``url`` answers 200 (or the process dies)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as response:
            if response.status == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer in {timeout_s}s")


@contextlib.contextmanager
def process(
    args: list[str], env: dict[str, str], log_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """A child process that is stopped (SIGTERM, then SIGKILL) on exit."""
    with log_path.open("wb") as out:
        child = subprocess.Popen(args, env={**os.environ, **env}, stdout=out, stderr=out)
        try:
            yield child
        finally:
            child.terminate()
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


async def count(url: str, sql: str) -> int:
    """One number from the database."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return int((await conn.execute(text(sql))).scalar_one())
    finally:
        await engine.dispose()


async def bootstrap(grpc_target: str) -> tuple[str, str]:
    """A tenant, an integrator key and one generation to rate: (secret, generation_id)."""
    async with grpc.aio.insecure_channel(grpc_target) as channel:
        stub = FeedbackServiceStub(channel)
        await stub.CreateTenant(api.CreateTenantRequest(tenant_id="bench", display_name="Bench"))
        key = await stub.CreateApiKey(
            api.CreateApiKeyRequest(tenant_id="bench", role=pb.ROLE_INTEGRATOR, name="bench")
        )
        logged = await stub.LogGeneration(
            api.LogGenerationRequest(
                tenant_id="bench",
                generation=api.GenerationInput(
                    task="budgeting",
                    prompt=Prompt(text="Split 10k across search and display."),
                    output="70% search, 30% display.",
                    model="bench/base",
                    adapter=AdapterRef(name="bench-budget", version="v1"),
                ),
            )
        )
    return key.secret, logged.generation.generation_id


def measure_flywheel(
    args: argparse.Namespace, root: Path, db_url: str, bus_env: dict[str, str]
) -> tuple[Load, int, int]:
    """Load the gateway + feedback service; return the load and the rows and events stored."""
    feedback_port, gateway_port = free_port(), free_port()
    common = {
        "FLYWHEEL_DATABASE_URL": db_url,
        "FLYWHEEL_DATA_DIR": str(root / "data"),
        "FLYWHEEL_METRICS_PORT": "0",
        "FLYWHEEL_LOG_LEVEL": "WARNING",
        **bus_env,
    }
    feedback_env = {**common, "FLYWHEEL_GRPC_PORT": str(feedback_port)}
    gateway_env = {
        **common,
        "FLYWHEEL_GRPC_PORT": str(free_port()),
        "FLYWHEEL_HTTP_PORT": str(gateway_port),
        "FLYWHEEL_UPSTREAMS": json.dumps({"feedback": f"127.0.0.1:{feedback_port}"}),
        # One client key drives the whole load: per-key limits would measure the limiter.
        "FLYWHEEL_RATE_LIMIT_PER_S": "0",
    }
    python = sys.executable
    with (
        process([python, "-m", "flywheel.feedback"], feedback_env, root / "feedback.log") as fb,
        process([python, "-m", "flywheel.gateway"], gateway_env, root / "gateway.log") as gw,
    ):
        base = f"http://127.0.0.1:{gateway_port}"
        wait_http(f"{base}/healthz", gw)
        secret, generation_id = asyncio.run(bootstrap(f"127.0.0.1:{feedback_port}"))
        body = json.dumps({"generation_id": generation_id, "rating": 4})
        log("flywheel: warm-up")
        run_wrk(f"{base}/v1/feedback", body, secret, args.warmup, args.connections)
        time.sleep(1.0)  # let requests cut off at the end of the warm-up finish
        before = asyncio.run(count(db_url, "SELECT count(*) FROM feedback.feedback"))
        log(f"flywheel: {args.duration:.0f}s at {args.connections} connections")
        load = run_wrk(f"{base}/v1/feedback", body, secret, args.duration, args.connections)
        if fb.poll() is not None:
            raise RuntimeError("the feedback service died during the run")
    rows = asyncio.run(count(db_url, "SELECT count(*) FROM feedback.feedback")) - before
    events = asyncio.run(
        count(db_url, "SELECT count(*) FROM feedback.outbox WHERE event_type = 'feedback.recorded'")
    )
    return load, rows, events - before


def measure_baseline(args: argparse.Namespace, root: Path, db_url: str) -> tuple[Load, int]:
    """Load the bare FastAPI endpoint; return the load and the rows it stored."""
    port = free_port()
    env = {"BASELINE_DATABASE_URL": db_url, "PYTHONPATH": str(BENCH_DIR)}
    command = [sys.executable, "-m", "uvicorn", "ingest_baseline_app:app", "--port", str(port),
               "--log-level", "warning", "--no-access-log"]  # fmt: skip
    with process(command, env, root / "baseline.log") as app:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/docs", app)
        body = json.dumps({"generation_id": "00000000-0000-0000-0000-000000000000", "rating": 4})
        log("baseline: warm-up")
        run_wrk(f"{base}/v1/feedback", body, None, args.warmup, args.connections)
        time.sleep(1.0)  # let requests cut off at the end of the warm-up finish
        before = asyncio.run(count(db_url, "SELECT count(*) FROM baseline_feedback"))
        log(f"baseline: {args.duration:.0f}s at {args.connections} connections")
        load = run_wrk(f"{base}/v1/feedback", body, None, args.duration, args.connections)
    rows = asyncio.run(count(db_url, "SELECT count(*) FROM baseline_feedback")) - before
    return load, rows


def check_durable(name: str, load: Load, rows: int, connections: int) -> None:
    """Every acknowledged request is a row; at most the requests cut off at the end are extra."""
    if rows < load.acknowledged or rows > load.acknowledged + connections:
        raise AssertionError(
            f"{name}: {load.acknowledged} requests acknowledged but {rows} rows stored"
        )


def print_cpu(ours: Load, baseline: Load) -> None:
    """CPU milliseconds per acknowledged request, by part: what bounds throughput here."""
    cores = os.cpu_count() or 1
    print(f"\nCPU ms per acknowledged request ({cores} cores on this machine)")
    print(f"{'':<10} " + " ".join(f"{part:>12}" for part in (*CPU_PARTS, "total")))
    for name, load in (("flywheel", ours), ("baseline", baseline)):
        per = {part: 1000 * load.cpu_s.get(part, 0.0) / load.acknowledged for part in CPU_PARTS}
        cells = [per[part] for part in CPU_PARTS] + [sum(per.values())]
        print(f"{name:<10} " + " ".join(f"{cell:>12.3f}" for cell in cells))
    # At full use of every core, throughput is at most cores / (CPU seconds per request).
    for name, load in (("flywheel", ours), ("baseline", baseline)):
        spent = sum(load.cpu_s.values()) / load.acknowledged
        print(f"{name}: {cores} cores bound it at {cores / spent:.0f} POSTs/s")


def main(argv: list[str] | None = None) -> int:
    """Run both measurements and print the report."""
    parser = argparse.ArgumentParser(description="feedback ingest: Flywheel vs a bare endpoint")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured (20)")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of warm-up (5)")
    parser.add_argument("--connections", type=int, default=64, help="client connections (64)")
    parser.add_argument("--bus", choices=["kafka", "embedded"], default="kafka")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        log("installing wrk (Debian package)")
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=True, capture_output=True)

    root = Path(tempfile.mkdtemp(prefix="flywheel-ingest-"))
    postgres = LocalPostgres(data_dir=root / "postgres")
    kafka = LocalKafka(data_dir=root / "kafka") if args.bus == "kafka" else None
    try:
        postgres.start()
        bus_env = {"FLYWHEEL_EVENT_BUS": "embedded"}
        if kafka is not None:
            bus_env = {
                "FLYWHEEL_EVENT_BUS": "kafka",
                "FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS": kafka.start(),
            }
        ours_db = postgres.create_database("ingest_flywheel")
        base_db = postgres.create_database("ingest_baseline")
        baseline, baseline_rows = measure_baseline(args, root, base_db)
        ours, ours_rows, ours_events = measure_flywheel(args, root, ours_db, bus_env)
    finally:
        if kafka is not None:
            kafka.stop()
        postgres.stop()

    check_durable("baseline", baseline, baseline_rows, args.connections)
    check_durable("flywheel", ours, ours_rows, args.connections)
    if ours_events != ours_rows:
        raise AssertionError(f"flywheel: {ours_rows} feedback rows but {ours_events} events")

    print(
        f"\nfeedback ingest, {args.connections} connections, {args.duration:.0f}s, bus={args.bus}"
    )
    print(f"{'':<10} {'POSTs/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} {'rows':>8}")
    for name, load, rows in (("flywheel", ours, ours_rows), ("baseline", baseline, baseline_rows)):
        print(
            f"{name:<10} {load.per_s:>9.0f} {load.p50_ms:>8.1f} {load.p99_ms:>8.1f} "
            f"{load.non2xx:>8} {rows:>8}"
        )
    throughput_ratio = ours.per_s / baseline.per_s
    latency_ratio = baseline.p99_ms / ours.p99_ms
    print(
        f"ratio: throughput {throughput_ratio:.2f}x (goal 3.0), p99 {latency_ratio:.2f}x (goal 1.0)"
    )
    print(f"durable: every acknowledged POST is a row; {ours_events} events for {ours_rows} rows")
    print_cpu(ours, baseline)
    result = {
        "bench": "ingest",
        "results": [
            {"metric": "feedback_posts_per_s", "unit": "1/s", "ours": round(ours.per_s, 1),
             "baseline": round(baseline.per_s, 1), "ratio": round(throughput_ratio, 3),
             "goal": GOALS["feedback_posts_per_s"]},
            {"metric": "feedback_p99_latency", "unit": "ms", "ours": round(ours.p99_ms, 2),
             "baseline": round(baseline.p99_ms, 2), "ratio": round(latency_ratio, 3),
             "goal": GOALS["feedback_p99_latency"]},
        ],
    }  # fmt: skip
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
