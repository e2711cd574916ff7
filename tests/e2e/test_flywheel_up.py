"""`flywheel up`, `status` and `demo` as a person runs them: real processes, real ports."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from flywheel.trainer.bootstrap import bootstrap_model
from flywheel.trainer.testing import TINY

pytestmark = pytest.mark.integration

FLYWHEEL = [sys.executable, "-m", "flywheel.cli.main"]
SERVICES = {"gateway", "feedback", "dataset", "trainer", "inference", "critic"}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    return {**env, "PYTHONUNBUFFERED": "1"}


def _status(data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FLYWHEEL, "status", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )


def _wait(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_supervises_and_status_reports(tmp_path: Path) -> None:
    data = tmp_path / "data"
    base_model = bootstrap_model(tmp_path / "models", TINY, progress=False)
    up = subprocess.Popen(
        [*FLYWHEEL, "up", "--free-ports", "--data-dir", str(data), "--base-model", str(base_model)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
    )
    try:
        assert up.stdout is not None
        for line in up.stdout:
            if "gateway on http" in line:
                break
            assert "not every service" not in line, line
        state = json.loads((data / "run" / "state.json").read_text())
        assert set(state["services"]) == SERVICES

        result = _status(data)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.count("SERVING") == len(SERVICES)

        # A crashed service is restarted by the supervisor.
        old_pid = state["services"]["dataset"]["pid"]
        os.kill(old_pid, signal.SIGKILL)

        def restarted() -> bool:
            s = json.loads((data / "run" / "state.json").read_text())["services"]["dataset"]
            return bool(s["restarts"] == 1 and s["pid"] != old_pid)

        _wait(restarted, 30, "the supervisor to restart dataset")
        _wait(lambda: _status(data).returncode == 0, 60, "every service to serve again")

        pids = [
            s["pid"]
            for s in json.loads((data / "run" / "state.json").read_text())["services"].values()
        ]
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
        assert not (data / "run" / "state.json").exists()
        assert not [pid for pid in pids if _alive(pid)], "Ctrl-C must stop every service"
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()

    result = _status(data)
    assert result.returncode == 1
    assert "nothing running" in result.stderr


def test_demo_on_postgres_and_kafka_gives_each_service_its_schema(
    tmp_path: Path, pg_url: str, kafka: object
) -> None:
    bootstrap = kafka.bootstrap  # type: ignore[attr-defined]
    # A tiny base model, so the demo's DPO job takes seconds (the real demo builds and
    # caches the few-minute bootstrap model).
    base_model = bootstrap_model(tmp_path / "models", TINY, progress=False)
    result = subprocess.run(
        [
            *FLYWHEEL, "demo", "--free-ports", "--data-dir", str(tmp_path / "data"),
            "--stack", "postgres+kafka", "--database-url", pg_url, "--kafka-bootstrap", bootstrap,
            "--base-model", str(base_model),
        ],
        capture_output=True, text=True, env=_env(), timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "an adapter, hot-loaded, A/B-tested, rated and promoted" in result.stdout
    assert "adapter demo-" in result.stdout
    assert "routable (GET /v1/models)" in result.stdout
    assert "lands on demo-" in result.stdout, result.stdout

    async def schemas() -> set[str]:
        url = make_url(pg_url).set(drivername="postgresql")
        conn = await asyncpg.connect(url.render_as_string(hide_password=False))
        try:
            rows = await conn.fetch(
                "SELECT table_schema FROM information_schema.tables WHERE table_name = 'outbox'"
            )
        finally:
            await conn.close()
        return {row["table_schema"] for row in rows}

    assert asyncio.run(schemas()) == SERVICES


def test_postgres_stack_without_urls_is_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [*FLYWHEEL, "demo", "--data-dir", str(tmp_path), "--stack", "postgres+kafka"],
        capture_output=True, text=True, env=_env(), timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "--database-url" in result.stderr
