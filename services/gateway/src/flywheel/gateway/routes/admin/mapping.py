"""Tenants and API keys: REST <-> protobuf."""

from __future__ import annotations

from typing import Any

from flywheel.contracts.feedback.v1 import service_pb2
from flywheel.gateway.auth import ROLE_FROM_PROTO, ROLE_TO_PROTO
from flywheel.gateway.convert import datetime_of, optional_str, timestamp
from flywheel.gateway.routes.admin.protocol import ApiKey, ApiKeyCreate, ApiKeyCreated, Tenant


def tenant_of(message: Any) -> Tenant:
    """REST tenant of a ``Tenant`` message."""
    return Tenant(
        tenant_id=message.tenant_id,
        display_name=message.display_name,
        created_at=datetime_of(message, "created_at"),
    )


def api_key_of(message: Any) -> ApiKey:
    """REST key metadata of an ``ApiKey`` message."""
    return ApiKey(
        key_id=message.key_id,
        tenant_id=message.tenant_id,
        role=ROLE_FROM_PROTO.get(message.role),
        name=message.name,
        prefix=message.prefix,
        user_id=optional_str(message, "user_id"),
        created_at=datetime_of(message, "created_at"),
        revoked_at=datetime_of(message, "revoked_at"),
        expires_at=datetime_of(message, "expires_at"),
    )


def created_key_of(response: Any) -> ApiKeyCreated:
    """REST key with its secret, from a ``CreateApiKeyResponse``."""
    return ApiKeyCreated(**api_key_of(response.api_key).model_dump(), secret=response.secret)


def create_key_request(tenant_id: str, body: ApiKeyCreate) -> Any:
    """The ``CreateApiKeyRequest`` of a REST body."""
    request = service_pb2.CreateApiKeyRequest(
        tenant_id=tenant_id, role=ROLE_TO_PROTO[body.role], name=body.name
    )
    if body.user_id is not None:
        request.user_id = body.user_id
    if body.expires_at is not None:
        request.expires_at.CopyFrom(timestamp(body.expires_at))
    return request
