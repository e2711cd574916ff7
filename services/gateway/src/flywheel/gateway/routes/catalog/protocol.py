"""REST schemas of users and task types."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from flywheel.gateway.routes.common import RequestModel, ResponseModel


class UserCreate(RequestModel):
    """A person of the caller's tenant."""

    external_id: str = Field(
        min_length=1, max_length=200, description="The id the tenant's own systems use."
    )
    display_name: str = Field("", max_length=200)


class User(ResponseModel):
    """A person (usually a rater) known to the tenant."""

    user_id: str
    tenant_id: str
    external_id: str
    display_name: str
    created_at: datetime | None


class TaskTypeCreate(RequestModel):
    """A kind of task of the caller's tenant."""

    name: str = Field(
        min_length=1,
        max_length=63,
        description='Lowercase slug: letters, digits, "-" and "_" ("budgeting").',
    )
    description: str = Field("", max_length=2000)
    domain: str = Field(
        "", max_length=200, description="Domain plug-in that defines it; empty for free-form."
    )


class TaskType(ResponseModel):
    """A kind of task the model is used for ("budgeting", "creative")."""

    tenant_id: str
    name: str
    description: str
    domain: str
    created_at: datetime | None
