"""Typed dependencies of the REST handlers: the caller, what its role allows, the services."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from flywheel.gateway.auth import Principal, Role, secret_from_headers, unauthenticated
from flywheel.gateway.problems import ProblemError
from flywheel.gateway.ratelimit import retry_after
from flywheel.gateway.state import state_of
from flywheel.gateway.upstream import Rpc

ROLES_TABLE = """| role | may |
|---|---|
| rater | read generations; record, edit, retract and read feedback (human only) |
| integrator | everything scoped to its tenant: users, task types, generations, feedback, \
datasets, training jobs, adapters, the models (OpenAI-compatible `/v1/models`, \
`/v1/chat/completions`, `/v1/completions`) |
| service | log generations, directly or by calling the models (OpenAI-compatible); record \
synthetic feedback (`source: "synthetic:<critic>"`) |
| admin | the admin endpoints (tenants and API keys of any tenant); its own tenant's datasets, \
training jobs and adapters |"""
"""What each role may do; a key has exactly one."""

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="An API key as a bearer token: `Authorization: Bearer <key>`.",
)
_api_key = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    scheme_name="apiKey",
    description="An API key in the X-API-Key header (alternative to the bearer token).",
)


async def resolve_principal(request: Request) -> Principal:
    """Authenticate the request and spend a token of its key's rate limit, once per request."""
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is not None:
        return principal
    secret = secret_from_headers(
        request.headers.get("authorization"), request.headers.get("x-api-key")
    )
    if secret is None:
        raise unauthenticated("An API key is required.")
    state = state_of(request)
    principal = await state.authenticator.authenticate(secret)
    wait = state.limits.take(principal.key_id)
    if wait is not None:
        raise ProblemError(
            429,
            "rate-limited",
            "Too many requests for this API key; retry after the time in Retry-After.",
            headers={"Retry-After": retry_after(wait)},
        )
    request.state.principal = principal
    return principal


async def get_principal(
    request: Request,
    _bearer_credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    _api_key_header: Annotated[str | None, Security(_api_key)],
) -> Principal:
    """The authenticated caller (the security parameters document the two schemes)."""
    return await resolve_principal(request)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def _allow(*roles: Role) -> Callable[[Principal], Awaitable[Principal]]:
    allowed = ", ".join(r.value for r in roles)

    # Dependencies are async so FastAPI runs them inline, not on its thread pool.
    async def check(principal: PrincipalDep) -> Principal:
        if principal.role not in roles:
            raise ProblemError(
                403,
                "forbidden",
                f"A key with role '{principal.role.value}' may not do this (allowed: {allowed}).",
            )
        return principal

    return check


AdminDep = Annotated[Principal, Depends(_allow(Role.ADMIN))]
IntegratorDep = Annotated[Principal, Depends(_allow(Role.INTEGRATOR))]
GenerationReaderDep = Annotated[Principal, Depends(_allow(Role.RATER, Role.INTEGRATOR))]
GenerationWriterDep = Annotated[Principal, Depends(_allow(Role.INTEGRATOR, Role.SERVICE))]
# Calling the models logs generations (and spends GPU time): the keys that log them.
InferenceCallerDep = GenerationWriterDep
FeedbackReaderDep = Annotated[Principal, Depends(_allow(Role.RATER, Role.INTEGRATOR))]
FeedbackWriterDep = Annotated[Principal, Depends(_allow(Role.RATER, Role.INTEGRATOR, Role.SERVICE))]
# Edits and retractions are a person's (or the tenant application's) change of mind.
FeedbackEditorDep = Annotated[Principal, Depends(_allow(Role.RATER, Role.INTEGRATOR))]
# Snapshots expose every rater's data of the tenant and requests spend GPU time: not raters'.
DatasetManagerDep = Annotated[Principal, Depends(_allow(Role.INTEGRATOR, Role.ADMIN))]
# Jobs spend GPU time and adapters are the tenant's models: the same keys as datasets.
TrainingManagerDep = Annotated[Principal, Depends(_allow(Role.INTEGRATOR, Role.ADMIN))]


def _stub(request: Request, service: str) -> Any:
    """The stub of ``service``; 503 when this gateway is not configured with it (rather
    than a 500 from deep inside the handler)."""
    try:
        return state_of(request).upstreams.stub(service)
    except KeyError:
        raise ProblemError(
            503,
            "service-unavailable",
            f"The {service} service is not configured behind this gateway.",
        ) from None


async def get_feedback_rpc(request: Request, principal: PrincipalDep) -> Rpc:
    """Calls to the feedback service on behalf of the caller."""
    state = state_of(request)
    return Rpc(
        state.upstreams.stub("feedback"), state.settings.upstream_timeout_s, principal.caller
    )


FeedbackRpcDep = Annotated[Rpc, Depends(get_feedback_rpc)]


async def get_dataset_rpc(request: Request, principal: PrincipalDep) -> Rpc:
    """Calls to the dataset service on behalf of the caller."""
    state = state_of(request)
    return Rpc(_stub(request, "dataset"), state.settings.upstream_timeout_s, principal.caller)


DatasetRpcDep = Annotated[Rpc, Depends(get_dataset_rpc)]


async def get_dataset_build_rpc(request: Request, principal: PrincipalDep) -> Rpc:
    """Calls to the dataset service that curate feedback, with their longer deadline."""
    state = state_of(request)
    return Rpc(_stub(request, "dataset"), state.settings.dataset_build_timeout_s, principal.caller)


DatasetBuildRpcDep = Annotated[Rpc, Depends(get_dataset_build_rpc)]


async def get_trainer_rpc(request: Request, principal: PrincipalDep) -> Rpc:
    """Calls to the trainer service on behalf of the caller."""
    state = state_of(request)
    return Rpc(_stub(request, "trainer"), state.settings.upstream_timeout_s, principal.caller)


TrainerRpcDep = Annotated[Rpc, Depends(get_trainer_rpc)]
