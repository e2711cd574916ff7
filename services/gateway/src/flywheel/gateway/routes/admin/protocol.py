"""REST schemas of tenants and API keys."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from flywheel.gateway.auth import Role
from flywheel.gateway.routes.common import RequestModel, ResponseModel, Timestamp


class TenantCreate(RequestModel):
    """A tenant (brand) to create."""

    tenant_id: str = Field(
        min_length=1,
        max_length=63,
        description='Stable slug ("acme"): lowercase letters, digits and "-".',
        examples=["acme"],
    )
    display_name: str = Field("", max_length=200, examples=["ACME Corp"])


class Tenant(ResponseModel):
    """A tenant (brand); every other record belongs to exactly one."""

    tenant_id: str
    display_name: str
    created_at: datetime | None


class ApiKeyCreate(RequestModel):
    """An API key to issue for the tenant."""

    role: Role = Field(description="What the key may do: rater, integrator, admin or service.")
    name: str = Field(min_length=1, max_length=200, description='Human label ("rater ui").')
    user_id: str | None = Field(None, max_length=200, description="The user the key acts as.")
    expires_at: Timestamp | None = Field(None, description="Unset: never expires.")


class ApiKey(ResponseModel):
    """An API key's metadata (never its secret)."""

    key_id: str
    tenant_id: str
    role: Role | None
    name: str
    prefix: str = Field(description="First characters of the secret, to tell keys apart.")
    user_id: str | None
    created_at: datetime | None
    revoked_at: datetime | None
    expires_at: datetime | None


class ApiKeyCreated(ApiKey):
    """A new key with its secret: shown this once, stored only as a hash."""

    secret: str = Field(description="Send as `Authorization: Bearer <secret>`.")
