"""Users and task types: protobuf -> REST."""

from __future__ import annotations

from typing import Any

from flywheel.gateway.convert import datetime_of
from flywheel.gateway.routes.catalog.protocol import TaskType, User


def user_of(message: Any) -> User:
    """REST user of a ``User`` message."""
    return User(
        user_id=message.user_id,
        tenant_id=message.tenant_id,
        external_id=message.external_id,
        display_name=message.display_name,
        created_at=datetime_of(message, "created_at"),
    )


def task_type_of(message: Any) -> TaskType:
    """REST task type of a ``TaskType`` message."""
    return TaskType(
        tenant_id=message.tenant_id,
        name=message.name,
        description=message.description,
        domain=message.domain,
        created_at=datetime_of(message, "created_at"),
    )
