"""The engine contract suite: its marker, and the engine's log on a failed test."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import pytest

from flywheel.inference.testing import engine_log_tail


def pytest_configure(config: pytest.Config) -> None:
    # Registered here, not in the root pyproject: `-m engine_contract` selects the suite
    # (so does its folder).
    config.addinivalue_line(
        "markers", "engine_contract: the OpenAI-compatible engine contract (ours or vLLM)"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test's report ends with the tail of the engine's log (when we started it)."""
    report = yield
    if report.when == "call" and report.failed:
        engine = getattr(item, "funcargs", {}).get("engine")
        log = getattr(engine, "log", None)
        if isinstance(log, Path) and log.is_file():
            report.sections.append(("engine log (tail)", engine_log_tail(log, 6_000)))
    return report
