"""Tenants, their users, API keys and task types."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import select

from flywheel.core.db import SessionFactory
from flywheel.core.errors import (
    AlreadyExists,
)
from flywheel.core.paging import Page, utcnow
from flywheel.feedback import mapping
from flywheel.feedback.models import (
    ApiKeyRow,
    TaskTypeRow,
    TenantRow,
    UserRow,
)
from flywheel.feedback.store import (
    Store,
    as_utc,
)
from flywheel.feedback.validation import (
    MAX_ID_CHARS,
    TASK,
    Checks,
)


class Accounts(Store):
    """Tenants, users, API keys (stored as keyed hashes) and task types."""

    def __init__(
        self,
        sessions: SessionFactory,
        *,
        key_pepper: bytes,
        on_commit: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(sessions, on_commit=on_commit)
        self.key_pepper = key_pepper

    async def create_tenant(self, tenant_id: str, display_name: str) -> TenantRow:
        """Create a tenant (brand) with a slug id."""
        checks = Checks()
        checks.slug(tenant_id, "tenant_id")
        checks.text(display_name or tenant_id, "display_name", max_chars=200)
        checks.done()
        async with self.sessions() as session, session.begin():
            if await session.get(TenantRow, tenant_id) is not None:
                raise AlreadyExists(f"tenant {tenant_id!r} already exists")
            row = TenantRow(
                tenant_id=tenant_id, display_name=display_name or tenant_id, created_at=utcnow()
            )
            session.add(row)
        return row

    async def get_tenant(self, tenant_id: str) -> TenantRow:
        """One tenant."""
        async with self.sessions() as session:
            return await self.tenant(session, tenant_id)

    async def list_tenants(self, page_size: int = 0, cursor: str = "") -> Page[TenantRow]:
        """Every tenant, newest first (admin only, enforced by the caller)."""
        async with self.sessions() as session:
            return await self.page(
                session, select(TenantRow), TenantRow, TenantRow.tenant_id, page_size, cursor
            )

    async def create_user(self, tenant_id: str, external_id: str, display_name: str) -> UserRow:
        """Register a person of the tenant by the tenant's own id for them."""
        checks = Checks()
        checks.text(external_id, "external_id", max_chars=MAX_ID_CHARS)
        checks.text(display_name, "display_name", max_chars=200, required=False)
        checks.done()
        async with self.sessions() as session, session.begin():
            await self.tenant(session, tenant_id)
            existing = await session.scalar(
                select(UserRow).where(
                    UserRow.tenant_id == tenant_id, UserRow.external_id == external_id
                )
            )
            if existing is not None:
                raise AlreadyExists(f"user with external_id {external_id!r} already exists")
            row = UserRow(
                user_id=str(uuid.uuid4()),
                tenant_id=tenant_id,
                external_id=external_id,
                display_name=display_name,
                created_at=utcnow(),
            )
            session.add(row)
        return row

    async def list_users(
        self, tenant_id: str, page_size: int = 0, cursor: str = ""
    ) -> Page[UserRow]:
        """The tenant's users, newest first."""
        async with self.sessions() as session:
            await self.tenant(session, tenant_id)
            statement = select(UserRow).where(UserRow.tenant_id == tenant_id)
            return await self.page(session, statement, UserRow, UserRow.user_id, page_size, cursor)

    def _hash_secret(self, secret: str) -> str:
        # Keys are 256-bit random, so a keyed hash (no slow KDF) is enough; the pepper keeps a
        # leaked table useless without the service's configuration.
        return hmac.new(self.key_pepper, secret.encode(), hashlib.sha256).hexdigest()

    async def create_api_key(
        self,
        tenant_id: str,
        role: str,
        name: str,
        user_id: str | None = None,
        expires_at: datetime | None = None,
    ) -> tuple[ApiKeyRow, str]:
        """Create a key; return it and its secret, which is never shown again."""
        checks = Checks()
        checks.require(role in mapping.ROLES, "role", f"must be one of {', '.join(mapping.ROLES)}")
        checks.text(name, "name", max_chars=200)
        if expires_at is not None and expires_at <= utcnow():
            checks.fail("expires_at", "must be in the future")
        checks.done()
        body = secrets.token_urlsafe(32)
        secret = f"fw_{body}"
        async with self.sessions() as session, session.begin():
            await self.tenant(session, tenant_id)
            if user_id is not None:
                await self.scoped_get(session, UserRow, tenant_id, user_id, "user")
            row = ApiKeyRow(
                key_id=str(uuid.uuid4()),
                tenant_id=tenant_id,
                role=role,
                name=name,
                prefix=secret[:10],
                secret_hash=self._hash_secret(secret),
                user_id=user_id,
                created_at=utcnow(),
                expires_at=expires_at,
            )
            session.add(row)
        return row, secret

    async def list_api_keys(
        self, tenant_id: str, include_revoked: bool = False, page_size: int = 0, cursor: str = ""
    ) -> Page[ApiKeyRow]:
        """The tenant's keys (metadata only), newest first."""
        async with self.sessions() as session:
            await self.tenant(session, tenant_id)
            statement = select(ApiKeyRow).where(ApiKeyRow.tenant_id == tenant_id)
            if not include_revoked:
                statement = statement.where(ApiKeyRow.revoked_at.is_(None))
            return await self.page(
                session, statement, ApiKeyRow, ApiKeyRow.key_id, page_size, cursor
            )

    async def revoke_api_key(self, tenant_id: str, key_id: str) -> ApiKeyRow:
        """Revoke a key for good (revoking twice keeps the first time)."""
        async with self.sessions() as session, session.begin():
            row = await self.scoped_get(session, ApiKeyRow, tenant_id, key_id, "api key")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
        return row

    async def authenticate(self, secret: str) -> ApiKeyRow | None:
        """The live key whose secret this is, or None."""
        if not secret.startswith("fw_") or len(secret) > 200:
            return None
        async with self.sessions() as session:
            row = await session.scalar(
                select(ApiKeyRow).where(ApiKeyRow.secret_hash == self._hash_secret(secret))
            )
        if row is None or row.revoked_at is not None:
            return None
        if row.expires_at is not None and as_utc(row.expires_at) <= utcnow():
            return None
        return row

    async def create_task_type(
        self, tenant_id: str, name: str, description: str = "", domain: str = ""
    ) -> TaskTypeRow:
        """Declare a task type for the tenant."""
        checks = Checks()
        checks.slug(name, "name", TASK)
        checks.text(description, "description", max_chars=2000, required=False)
        checks.done()
        async with self.sessions() as session, session.begin():
            await self.tenant(session, tenant_id)
            if await session.get(TaskTypeRow, (tenant_id, name)) is not None:
                raise AlreadyExists(f"task type {name!r} already exists")
            row = TaskTypeRow(
                tenant_id=tenant_id,
                name=name,
                description=description,
                domain=domain,
                created_at=utcnow(),
            )
            session.add(row)
        return row

    async def list_task_types(
        self, tenant_id: str, page_size: int = 0, cursor: str = ""
    ) -> Page[TaskTypeRow]:
        """The tenant's task types, newest first."""
        async with self.sessions() as session:
            await self.tenant(session, tenant_id)
            statement = select(TaskTypeRow).where(TaskTypeRow.tenant_id == tenant_id)
            return await self.page(
                session, statement, TaskTypeRow, TaskTypeRow.name, page_size, cursor
            )
