"""Users and task types of the caller's tenant (integrator keys)."""

from __future__ import annotations

from flywheel.contracts.feedback.v1 import service_pb2
from flywheel.gateway.deps import FeedbackRpcDep, IntegratorDep
from flywheel.gateway.routes.catalog.mapping import task_type_of, user_of
from flywheel.gateway.routes.catalog.protocol import TaskType, TaskTypeCreate, User, UserCreate
from flywheel.gateway.routes.common import Cursor, Limit, Page
from flywheel.gateway.routing import next_cursor, page_fields, page_request, v1_router

router = v1_router(tags=["users and task types"], extra_problems=(409,))


@router.post(
    "/users",
    status_code=201,
    response_model=User,
    summary="Register a user",
    description="Integrator only. 409 if a user with this `external_id` exists.",
)
async def create_user(body: UserCreate, caller: IntegratorDep, rpc: FeedbackRpcDep) -> User:
    reply = await rpc(
        rpc.stub.CreateUser,
        service_pb2.CreateUserRequest(
            tenant_id=caller.tenant_id,
            external_id=body.external_id,
            display_name=body.display_name,
        ),
    )
    return user_of(reply.user)


@router.get(
    "/users",
    response_model=Page[User],
    summary="List users",
    description="Integrator only. The tenant's users by creation time.",
)
async def list_users(
    caller: IntegratorDep, rpc: FeedbackRpcDep, cursor: Cursor = None, limit: Limit = 50
) -> Page[User]:
    reply = await rpc(
        rpc.stub.ListUsers,
        service_pb2.ListUsersRequest(tenant_id=caller.tenant_id, page=page_request(cursor, limit)),
        fields=page_fields,
    )
    return Page[User](items=[user_of(u) for u in reply.users], next_cursor=next_cursor(reply.page))


@router.post(
    "/task-types",
    status_code=201,
    response_model=TaskType,
    summary="Declare a task type",
    description="Integrator only. 409 if the tenant has a task type of this name.",
)
async def create_task_type(
    body: TaskTypeCreate, caller: IntegratorDep, rpc: FeedbackRpcDep
) -> TaskType:
    reply = await rpc(
        rpc.stub.CreateTaskType,
        service_pb2.CreateTaskTypeRequest(
            tenant_id=caller.tenant_id,
            name=body.name,
            description=body.description,
            domain=body.domain,
        ),
    )
    return task_type_of(reply.task_type)


@router.get(
    "/task-types",
    response_model=Page[TaskType],
    summary="List task types",
    description="Integrator only.",
)
async def list_task_types(
    caller: IntegratorDep, rpc: FeedbackRpcDep, cursor: Cursor = None, limit: Limit = 50
) -> Page[TaskType]:
    reply = await rpc(
        rpc.stub.ListTaskTypes,
        service_pb2.ListTaskTypesRequest(
            tenant_id=caller.tenant_id, page=page_request(cursor, limit)
        ),
        fields=page_fields,
    )
    return Page[TaskType](
        items=[task_type_of(t) for t in reply.task_types], next_cursor=next_cursor(reply.page)
    )
