"""The inference service's client of an engine over vLLM's HTTP API.

The same calls drive ``vllm serve`` and Flywheel's CPU engine; nothing here knows which.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx


class EngineError(RuntimeError):
    """The engine refused or failed a call; ``status`` and its error message kept."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message", body))
        return str(body.get("message", error))
    return response.text


class EngineClient:
    """Calls on one engine replica."""

    def __init__(self, base_url: str, *, timeout_s: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout_s, connect=5.0),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )

    async def close(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def healthy(self) -> bool:
        """Whether the engine answers ``/health``."""
        try:
            return (await self._http.get("/health", timeout=2.0)).status_code == 200
        except httpx.HTTPError:
            return False

    async def models(self) -> list[dict[str, Any]]:
        """``/v1/models``' entries."""
        response = await self._http.get("/v1/models")
        self._check(response)
        return list(response.json()["data"])

    async def load_adapter(self, name: str, path: str) -> None:
        """``POST /v1/load_lora_adapter``."""
        response = await self._http.post(
            "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}
        )
        self._check(response)

    async def unload_adapter(self, name: str) -> None:
        """``POST /v1/unload_lora_adapter``."""
        response = await self._http.post("/v1/unload_lora_adapter", json={"lora_name": name})
        self._check(response)

    async def complete(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A non-streamed completion (``path``: ``/v1/chat/completions`` or ``/v1/completions``)."""
        response = await self._http.post(path, json={**body, "stream": False})
        self._check(response)
        result: dict[str, Any] = response.json()
        return result

    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[str]:
        """A streamed completion: the ``data:`` payloads of its server-sent events."""
        async with self._http.stream("POST", path, json={**body, "stream": True}) as response:
            if response.status_code != 200:
                await response.aread()
                self._check(response)
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    yield line[len("data: ") :]

    @staticmethod
    def _check(response: httpx.Response) -> None:
        if response.status_code >= 400:
            raise EngineError(response.status_code, _message(response))
