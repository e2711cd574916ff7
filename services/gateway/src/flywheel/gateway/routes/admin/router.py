"""Admin endpoints: create and list tenants, issue, list and revoke their API keys."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query, Request, Response

from flywheel.contracts.feedback.v1 import service_pb2
from flywheel.gateway.deps import AdminDep, FeedbackRpcDep
from flywheel.gateway.routes.admin.mapping import (
    api_key_of,
    create_key_request,
    created_key_of,
    tenant_of,
)
from flywheel.gateway.routes.admin.protocol import (
    ApiKey,
    ApiKeyCreate,
    ApiKeyCreated,
    Tenant,
    TenantCreate,
)
from flywheel.gateway.routes.common import Cursor, Limit, Page
from flywheel.gateway.routing import next_cursor, page_fields, page_request, v1_router
from flywheel.gateway.state import state_of

router = v1_router(tags=["admin"], extra_problems=(404, 409))

TenantId = Annotated[str, Path(min_length=1, max_length=200, description="Tenant slug.")]
KeyId = Annotated[str, Path(min_length=1, max_length=200)]


@router.post(
    "/tenants",
    status_code=201,
    response_model=Tenant,
    summary="Create a tenant",
    description="Admin only. 409 if the slug is taken.",
)
async def create_tenant(
    body: TenantCreate, response: Response, _admin: AdminDep, rpc: FeedbackRpcDep
) -> Tenant:
    reply = await rpc(
        rpc.stub.CreateTenant,
        service_pb2.CreateTenantRequest(tenant_id=body.tenant_id, display_name=body.display_name),
    )
    tenant = tenant_of(reply.tenant)
    response.headers["Location"] = f"/v1/tenants/{tenant.tenant_id}"
    return tenant


@router.get(
    "/tenants",
    response_model=Page[Tenant],
    summary="List tenants",
    description="Admin only. Cursor pagination: pass `next_cursor` back as `cursor`.",
)
async def list_tenants(
    _admin: AdminDep, rpc: FeedbackRpcDep, cursor: Cursor = None, limit: Limit = 50
) -> Page[Tenant]:
    reply = await rpc(
        rpc.stub.ListTenants,
        service_pb2.ListTenantsRequest(page=page_request(cursor, limit)),
        fields=page_fields,
    )
    return Page[Tenant](
        items=[tenant_of(t) for t in reply.tenants], next_cursor=next_cursor(reply.page)
    )


@router.get(
    "/tenants/{tenant_id}",
    response_model=Tenant,
    summary="Get a tenant",
    description="Admin only (any tenant).",
)
async def get_tenant(tenant_id: TenantId, _admin: AdminDep, rpc: FeedbackRpcDep) -> Tenant:
    reply = await rpc(rpc.stub.GetTenant, service_pb2.GetTenantRequest(tenant_id=tenant_id))
    return tenant_of(reply.tenant)


@router.post(
    "/tenants/{tenant_id}/api-keys",
    status_code=201,
    response_model=ApiKeyCreated,
    summary="Issue an API key",
    description="Admin only. The response is the only one that ever contains the secret; "
    "only its hash is stored.",
)
async def create_api_key(
    tenant_id: TenantId, body: ApiKeyCreate, _admin: AdminDep, rpc: FeedbackRpcDep
) -> ApiKeyCreated:
    reply = await rpc(rpc.stub.CreateApiKey, create_key_request(tenant_id, body))
    return created_key_of(reply)


@router.get(
    "/tenants/{tenant_id}/api-keys",
    response_model=Page[ApiKey],
    summary="List a tenant's API keys",
    description="Admin only. Metadata only, never secrets.",
)
async def list_api_keys(
    tenant_id: TenantId,
    _admin: AdminDep,
    rpc: FeedbackRpcDep,
    include_revoked: Annotated[bool, Query(description="Also list revoked keys.")] = False,
    cursor: Cursor = None,
    limit: Limit = 50,
) -> Page[ApiKey]:
    reply = await rpc(
        rpc.stub.ListApiKeys,
        service_pb2.ListApiKeysRequest(
            tenant_id=tenant_id,
            include_revoked=include_revoked,
            page=page_request(cursor, limit),
        ),
        fields=page_fields,
    )
    return Page[ApiKey](
        items=[api_key_of(k) for k in reply.api_keys], next_cursor=next_cursor(reply.page)
    )


@router.delete(
    "/tenants/{tenant_id}/api-keys/{key_id}",
    response_model=ApiKey,
    summary="Revoke an API key",
    description="Admin only; idempotent. The key stops working at once on this gateway "
    "replica; other replicas may accept it until their key cache entry expires "
    "(`FLYWHEEL_AUTH_CACHE_TTL_S`, 30 s by default).",
)
async def revoke_api_key(
    tenant_id: TenantId, key_id: KeyId, request: Request, _admin: AdminDep, rpc: FeedbackRpcDep
) -> ApiKey:
    reply = await rpc(
        rpc.stub.RevokeApiKey, service_pb2.RevokeApiKeyRequest(tenant_id=tenant_id, key_id=key_id)
    )
    state_of(request).authenticator.forget(key_id)
    return api_key_of(reply.api_key)
