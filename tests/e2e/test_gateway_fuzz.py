"""Property-based fuzzing of the gateway's REST API from its own OpenAPI description.

Schemathesis generates requests for every operation (valid and invalid bodies, paths,
queries), sends them over real HTTP to a gateway started by `flywheel up`, in front of the
real feedback service, and the test fails on any 5xx.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from flywheel.core.testing.stack import running_stack
from flywheel.gateway.config import GatewaySettings
from flywheel.gateway.http_api import create_app

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES_PER_OPERATION = 30
STATUSES: Counter[int] = Counter()


@dataclass
class Stack:
    """A running `flywheel up` and keys to call its gateway with."""

    gateway: str
    admin: str
    integrator: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # The fuzzer is one client sending fast: rate limits would answer most cases with 429.
    env = {"FLYWHEEL_RATE_LIMIT_PER_S": "0"}
    with running_stack(tmp_path_factory.mktemp("fuzz"), env=env) as running:
        yield Stack(
            gateway=running.gateway,
            admin=running.key("platform", "admin"),
            integrator=running.key("acme", "integrator"),
        )
    logs = running.data_dir / "logs" / "gateway.log"
    if logs.exists():
        errors = [line for line in logs.read_text().splitlines() if '"level": "error"' in line]
        assert not errors, "\n".join(errors[:5])


# The description the running gateway serves at /openapi.json, built without a server.
schema = schemathesis.openapi.from_dict(create_app(GatewaySettings()).openapi())


@pytest.fixture(scope="module", autouse=True)
def enough_cases() -> Iterator[None]:
    """After the module: the fuzzer really sent a few hundred requests."""
    yield
    sent = sum(STATUSES.values())
    print(f"\nfuzz: {sent} requests, statuses {dict(sorted(STATUSES.items()))}")
    assert sent >= 300, f"only {sent} fuzz cases ran"


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_request_gets_a_server_error(case: Any, stack: Stack) -> None:
    secret = stack.admin if case.path.startswith("/v1/tenants") else stack.integrator
    response = case.call(
        base_url=stack.gateway, headers={"Authorization": f"Bearer {secret}"}, timeout=30
    )
    STATUSES[response.status_code] += 1
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}"
    )
