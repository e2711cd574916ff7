"""The services ``flywheel up`` runs on one machine, and the ports each gets."""

from __future__ import annotations

import socket
from dataclasses import asdict, dataclass

# Start order: the gateway last, since its readiness depends on everyone else.
SERVICE_NAMES = ("feedback", "dataset", "trainer", "inference", "critic", "gateway")
GRPC_BASE_PORT = 50050
METRICS_BASE_PORT = 9100
GATEWAY_HTTP_PORT = 8080
# The inference service's OpenAI-compatible API (the gateway proxies it).
INFERENCE_HTTP_PORT = 8105
# Same numbering as each service's settings defaults: gateway 1, feedback 2, ...
_PORT_INDEX = {"gateway": 1, "feedback": 2, "dataset": 3, "trainer": 4, "inference": 5, "critic": 6}


@dataclass(frozen=True)
class ServicePorts:
    """Where one service listens on loopback."""

    name: str
    grpc_port: int
    metrics_port: int
    http_port: int | None = None

    def to_json(self) -> dict[str, int | str | None]:
        """A JSON-ready copy."""
        return asdict(self)


HTTP_DEFAULTS = {"gateway": GATEWAY_HTTP_PORT, "inference": INFERENCE_HTTP_PORT}


class _FreePorts:
    """Free loopback ports, all different: each socket stays bound until the plan is made,
    so the kernel cannot hand the same port out twice."""

    def __init__(self) -> None:
        self._held: list[socket.socket] = []

    def take(self) -> int:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self._held.append(sock)
        return int(sock.getsockname()[1])

    def release(self) -> None:
        for sock in self._held:
            sock.close()


def plan_ports(free: bool = False) -> dict[str, ServicePorts]:
    """The fixed default ports, or free ones (``free=True``, for tests and parallel runs)."""
    plan = {}
    ports = _FreePorts()
    try:
        for name in SERVICE_NAMES:
            i = _PORT_INDEX[name]
            http = None
            if name in HTTP_DEFAULTS:
                http = ports.take() if free else HTTP_DEFAULTS[name]
            plan[name] = ServicePorts(
                name=name,
                grpc_port=ports.take() if free else GRPC_BASE_PORT + i,
                metrics_port=ports.take() if free else METRICS_BASE_PORT + i,
                http_port=http,
            )
    finally:
        ports.release()
    return plan
