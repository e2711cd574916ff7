"""Group commit for feedback: concurrent POST /v1/feedback become one BatchRecordFeedback.

A request goes out at once while fewer than ``concurrency`` batches are in flight; beyond
that, requests queue and leave together (up to ``max_items``) as soon as a batch returns.
An idle gateway adds no wait; a busy one turns many commits into few, which is what lets
the feedback service keep up (one transaction per batch, each item succeeding or failing
on its own).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import grpc

from flywheel.contracts.feedback.v1 import service_pb2
from flywheel.gateway.problems import (
    FieldRenamer,
    ProblemError,
    problem_from_rpc,
    problem_from_status,
)
from flywheel.gateway.upstream import Caller

_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclass
class _Item:
    request: Any
    fields: FieldRenamer
    future: asyncio.Future[Any]


class FeedbackRecorder:
    """Records feedback through the feedback service, coalescing concurrent requests."""

    def __init__(self, stub: Any, *, timeout_s: float, max_items: int, concurrency: int) -> None:
        self.stub = stub
        self.timeout_s = timeout_s
        self.max_items = max_items
        self.concurrency = concurrency
        self._queue: list[_Item] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def record(self, request: Any, *, fields: FieldRenamer, caller: Caller) -> Any:
        """``RecordFeedback(request)``'s response; a failure raises its ProblemError."""
        if self.max_items <= 1:
            try:
                return await self.stub.RecordFeedback(
                    request, timeout=self.timeout_s, metadata=caller.metadata()
                )
            except grpc.aio.AioRpcError as exc:
                raise problem_from_rpc(exc, fields) from exc
        item = _Item(request, fields, asyncio.get_running_loop().create_future())
        self._queue.append(item)
        self._flush()
        return await item.future

    def _flush(self) -> None:
        while self._queue and self._in_flight < self.concurrency:
            batch = self._queue[: self.max_items]
            del self._queue[: self.max_items]
            self._in_flight += 1
            task = asyncio.create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[_Item]) -> None:
        try:
            reply = await self.stub.BatchRecordFeedback(
                service_pb2.BatchRecordFeedbackRequest(requests=[i.request for i in batch]),
                timeout=self.timeout_s,
            )
            if len(reply.results) != len(batch):
                raise ProblemError(502, "upstream-error", "A service behind the gateway failed.")
            for item, result in zip(batch, reply.results, strict=True):
                if result.WhichOneof("outcome") == "recorded":
                    _settle(item, result=result.recorded)
                    continue
                error = result.error
                code = _CODES.get(error.code, grpc.StatusCode.UNKNOWN)
                violations = [(v.field, v.message) for v in error.field_violations]
                _settle(
                    item,
                    error=problem_from_status(code, error.message, violations, item.fields),
                )
        except grpc.aio.AioRpcError as exc:
            for item in batch:
                _settle(item, error=problem_from_rpc(exc, item.fields))
        except BaseException as exc:
            for item in batch:
                _settle(item, error=exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._in_flight -= 1
            self._flush()

    async def close(self) -> None:
        """Wait for batches in flight (their callers are waiting for them)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.timeout_s)


def _settle(item: _Item, *, result: Any = None, error: BaseException | None = None) -> None:
    # A caller that went away cancelled its future; its feedback is recorded all the same.
    if item.future.done():
        return
    if error is not None:
        item.future.set_exception(error)
    else:
        item.future.set_result(result)
