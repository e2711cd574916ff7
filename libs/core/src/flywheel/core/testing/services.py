"""Running a real service in the test's own event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from flywheel.core.rpc import check_health
from flywheel.core.runtime import ServiceRuntime


@contextlib.asynccontextmanager
async def serving(
    runtime: ServiceRuntime, timeout_s: float = 10.0
) -> AsyncIterator[ServiceRuntime]:
    """Serve ``runtime`` until the block ends; enter once its gRPC health says SERVING."""
    task = asyncio.create_task(runtime.serve())
    target = f"127.0.0.1:{runtime.settings.grpc_port}"
    deadline = asyncio.get_running_loop().time() + timeout_s
    while await check_health(target, timeout_s=0.5) != "SERVING":
        if task.done():
            task.result()  # raises what stopped it
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"service on {target} did not become healthy")
        await asyncio.sleep(0.05)
    try:
        yield runtime
    finally:
        runtime.stop.set()
        await task
