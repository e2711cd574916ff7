"""API keys: who is calling, verified by the feedback service and cached briefly here.

A verified key is trusted for ``auth_cache_ttl_s`` (30 s by default) without asking the
feedback service again, so a key revoked meanwhile keeps working on this gateway replica
until its cache entry expires. Failed lookups are not cached.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import grpc

from flywheel.contracts.feedback.v1 import resources_pb2, service_pb2
from flywheel.gateway.problems import ProblemError, problem_from_rpc
from flywheel.gateway.upstream import Caller

# Longer secrets are rejected without asking the feedback service.
MAX_SECRET_LENGTH = 512
WWW_AUTHENTICATE = 'Bearer realm="flywheel"'


class Role(StrEnum):
    """What an API key may do (see the role table in the API description)."""

    RATER = "rater"
    INTEGRATOR = "integrator"
    ADMIN = "admin"
    SERVICE = "service"


ROLE_TO_PROTO = {
    Role.RATER: resources_pb2.ROLE_RATER,
    Role.INTEGRATOR: resources_pb2.ROLE_INTEGRATOR,
    Role.ADMIN: resources_pb2.ROLE_ADMIN,
    Role.SERVICE: resources_pb2.ROLE_SERVICE,
}
ROLE_FROM_PROTO = {v: k for k, v in ROLE_TO_PROTO.items()}


@dataclass(frozen=True)
class Principal:
    """The verified caller: an API key, its tenant and role."""

    key_id: str
    tenant_id: str
    role: Role
    name: str
    user_id: str | None
    expires_at: datetime | None

    @property
    def caller(self) -> Caller:
        """How the caller is named to the services behind the gateway."""
        return Caller(self.key_id, self.tenant_id, self.role.value)


def unauthenticated(detail: str) -> ProblemError:
    """A 401 problem asking for a bearer key."""
    return ProblemError(
        401, "unauthenticated", detail, headers={"WWW-Authenticate": WWW_AUTHENTICATE}
    )


def principal_of(api_key: Any) -> Principal:
    """The principal of an ``ApiKey`` message."""
    role = ROLE_FROM_PROTO.get(api_key.role)
    if role is None:
        raise unauthenticated("The API key has no usable role.")
    expires_at = (
        api_key.expires_at.ToDatetime(tzinfo=UTC) if api_key.HasField("expires_at") else None
    )
    return Principal(
        key_id=api_key.key_id,
        tenant_id=api_key.tenant_id,
        role=role,
        name=api_key.name,
        user_id=api_key.user_id if api_key.HasField("user_id") else None,
        expires_at=expires_at,
    )


class Authenticator:
    """Resolves presented secrets to principals, remembering each for a short while."""

    def __init__(
        self,
        stub: Any,
        *,
        ttl_s: float,
        max_entries: int,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stub = stub
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.timeout_s = timeout_s
        self.clock = clock
        # sha256(secret) -> (principal, monotonic deadline); least recently used first.
        self._cache: OrderedDict[str, tuple[Principal, float]] = OrderedDict()

    async def authenticate(self, secret: str) -> Principal:
        """The principal of ``secret``; a 401 problem if it is unknown, revoked or expired."""
        if not secret or len(secret) > MAX_SECRET_LENGTH or not secret.isprintable():
            raise unauthenticated("The API key is not valid.")
        digest = hashlib.sha256(secret.encode()).hexdigest()
        now = self.clock()
        cached = self._cache.get(digest)
        if cached is not None:
            principal, deadline = cached
            if now < deadline and not _expired(principal):
                self._cache.move_to_end(digest)
                return principal
            del self._cache[digest]
        try:
            response = await self.stub.AuthenticateApiKey(
                service_pb2.AuthenticateApiKeyRequest(secret=secret), timeout=self.timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.PERMISSION_DENIED,
            ):
                raise unauthenticated("The API key is unknown, revoked or expired.") from exc
            raise problem_from_rpc(exc) from exc
        principal = principal_of(response.api_key)
        if _expired(principal):
            raise unauthenticated("The API key is unknown, revoked or expired.")
        if self.ttl_s > 0:
            self._cache[digest] = (principal, now + self.ttl_s)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return principal

    def forget(self, key_id: str) -> None:
        """Drop cached entries of a key (this replica revoked it)."""
        for digest in [d for d, (p, _) in self._cache.items() if p.key_id == key_id]:
            del self._cache[digest]


def _expired(principal: Principal) -> bool:
    return principal.expires_at is not None and principal.expires_at <= datetime.now(UTC)


def secret_from_headers(authorization: str | None, api_key: str | None) -> str | None:
    """The presented secret: ``Authorization: Bearer <secret>`` or ``X-API-Key``."""
    if authorization:
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise unauthenticated("Use 'Authorization: Bearer <API key>' or 'X-API-Key'.")
        return credentials.strip()
    if api_key is not None:
        return api_key.strip()
    return None
