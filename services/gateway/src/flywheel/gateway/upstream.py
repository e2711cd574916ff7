"""The services behind the gateway: one gRPC channel and stub each, opened at start-up."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from flywheel.contracts.critic.v1 import service_pb2_grpc as critic_grpc
from flywheel.contracts.dataset.v1 import service_pb2_grpc as dataset_grpc
from flywheel.contracts.feedback.v1 import service_pb2_grpc as feedback_grpc
from flywheel.contracts.inference.v1 import service_pb2_grpc as inference_grpc
from flywheel.contracts.trainer.v1 import service_pb2_grpc as trainer_grpc
from flywheel.gateway.problems import FieldRenamer, identity, problem_from_rpc

# The gRPC stub of each service the gateway knows by name.
STUBS: dict[str, Callable[[grpc.aio.Channel], Any]] = {
    "feedback": feedback_grpc.FeedbackServiceStub,
    "dataset": dataset_grpc.DatasetServiceStub,
    "trainer": trainer_grpc.TrainerServiceStub,
    "inference": inference_grpc.InferenceServiceStub,
    "critic": critic_grpc.CriticServiceStub,
}

_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
]


class Upstreams:
    """A channel and stub per configured service, shared by every request."""

    def __init__(self, targets: dict[str, str]) -> None:
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.stubs: dict[str, Any] = {}
        for name, target in targets.items():
            channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
            self.channels[name] = channel
            if name in STUBS:
                self.stubs[name] = STUBS[name](channel)

    def stub(self, name: str) -> Any:
        """The stub of service ``name``; KeyError when it is not configured."""
        return self.stubs[name]

    async def close(self) -> None:
        """Close every channel, cancelling calls still running."""
        for channel in self.channels.values():
            await channel.close()


@dataclass(frozen=True)
class Caller:
    """Who a call is made for, passed to the service as metadata (for its audit logs)."""

    key_id: str
    tenant_id: str
    role: str

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (
            ("flywheel-caller-key-id", self.key_id),
            ("flywheel-caller-tenant-id", self.tenant_id),
            ("flywheel-caller-role", self.role),
        )


@dataclass(frozen=True)
class Rpc:
    """Calls one service for one request, with the gateway's deadline and error mapping."""

    stub: Any
    timeout_s: float
    caller: Caller | None = None

    async def __call__(
        self,
        method: Callable[..., Awaitable[Any]],
        request: Any,
        *,
        fields: FieldRenamer = identity,
    ) -> Any:
        """``method(request)``; a failed call raises the ProblemError it maps to."""
        metadata = self.caller.metadata() if self.caller else ()
        try:
            return await method(request, timeout=self.timeout_s, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise problem_from_rpc(exc, fields) from exc

    async def stream(
        self,
        method: Callable[..., Any],
        request: Any,
        *,
        fields: FieldRenamer = identity,
    ) -> AsyncGenerator[Any, None]:
        """A server-streaming call, started: its first message has arrived (or the stream
        ended), so a call that fails at once raises the ProblemError it maps to here,
        before any response is sent. Later failures end the iteration with the error."""
        metadata = self.caller.metadata() if self.caller else ()
        # No deadline: an export takes as long as the data; a client that goes away
        # cancels the call.
        call = method(request, metadata=metadata)
        try:
            first = await call.read()
        except grpc.aio.AioRpcError as exc:
            raise problem_from_rpc(exc, fields) from exc
        except BaseException:
            call.cancel()
            raise
        return _rest_of(call, first)

    def stream_lazily(
        self,
        method: Callable[..., Any],
        request: Any,
        *,
        fields: FieldRenamer = identity,
    ) -> AsyncGenerator[Any, None]:
        """A server-streaming call made only when iterated, for a stream whose first
        message may be long in coming (a followed log): the response can start before it.
        Check what can fail first (the object exists) with a unary call; a failure here
        ends the iteration with the ProblemError it maps to."""
        metadata = self.caller.metadata() if self.caller else ()
        return _lazily(method, request, metadata, fields)


async def _lazily(
    method: Callable[..., Any],
    request: Any,
    metadata: tuple[tuple[str, str], ...],
    fields: FieldRenamer,
) -> AsyncGenerator[Any, None]:
    # No deadline, as in Rpc.stream: a client that goes away cancels the call.
    call = method(request, metadata=metadata)
    try:
        while True:
            message = await call.read()
            if message is grpc.aio.EOF:
                return
            yield message
    except grpc.aio.AioRpcError as exc:
        raise problem_from_rpc(exc, fields) from exc
    finally:
        call.cancel()


async def _rest_of(call: Any, first: Any) -> AsyncGenerator[Any, None]:
    try:
        message = first
        while message is not grpc.aio.EOF:
            yield message
            message = await call.read()
    finally:
        call.cancel()
