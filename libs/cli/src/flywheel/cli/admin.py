"""Bootstrap commands that talk to the feedback service directly (its internal gRPC port).

The gateway only lets admin keys manage tenants and keys, so the first tenant and admin key
come from here, run by whoever operates the deployment:

    flywheel tenant create acme --name "ACME Brands"
    flywheel key create --tenant acme --role admin --name ops
"""

from __future__ import annotations

import argparse
import sys

import grpc

from flywheel.contracts.feedback.v1 import resources_pb2 as pb
from flywheel.contracts.feedback.v1 import service_pb2 as api
from flywheel.contracts.feedback.v1.service_pb2_grpc import FeedbackServiceStub
from flywheel.core.errors import field_errors_of

ROLES = {"rater": pb.ROLE_RATER, "integrator": pb.ROLE_INTEGRATOR,
         "admin": pb.ROLE_ADMIN, "service": pb.ROLE_SERVICE}  # fmt: skip


def _fail(error: grpc.aio.AioRpcError) -> int:
    details = "; ".join(f"{e.field}: {e.message}" for e in field_errors_of(error))
    print(f"flywheel: {error.details()}" + (f" ({details})" if details else ""), file=sys.stderr)
    return 1


async def create_tenant(feedback: str, tenant_id: str, name: str) -> int:
    """Create a tenant; print its id."""
    async with grpc.aio.insecure_channel(feedback) as channel:
        try:
            response = await FeedbackServiceStub(channel).CreateTenant(
                api.CreateTenantRequest(tenant_id=tenant_id, display_name=name), timeout=10
            )
        except grpc.aio.AioRpcError as error:
            return _fail(error)
    print(f"tenant {response.tenant.tenant_id} created")
    return 0


async def create_key(feedback: str, tenant_id: str, role: str, name: str) -> int:
    """Create an API key; print its secret, which is shown only this once."""
    async with grpc.aio.insecure_channel(feedback) as channel:
        try:
            response = await FeedbackServiceStub(channel).CreateApiKey(
                api.CreateApiKeyRequest(tenant_id=tenant_id, role=ROLES[role], name=name),
                timeout=10,
            )
        except grpc.aio.AioRpcError as error:
            return _fail(error)
    print(f"key {response.api_key.key_id} ({role}) for tenant {tenant_id}")
    print(f"secret (shown once, keep it safe): {response.secret}")
    return 0


def add_parsers(sub: argparse._SubParsersAction, feedback_default: str) -> None:  # type: ignore[type-arg]
    """Add ``tenant create`` and ``key create`` to the command line."""

    def feedback_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--feedback",
            default=feedback_default,
            help=f"feedback service gRPC address (default {feedback_default})",
        )

    tenant = sub.add_parser("tenant", help="manage tenants (brands)")
    tenant_sub = tenant.add_subparsers(dest="action", required=True)
    p = tenant_sub.add_parser("create", help="create a tenant")
    p.add_argument("tenant_id", help="slug: lowercase letters, digits and '-'")
    p.add_argument("--name", default="", help="display name (default: the id)")
    feedback_option(p)

    key = sub.add_parser("key", help="manage API keys")
    key_sub = key.add_subparsers(dest="action", required=True)
    p = key_sub.add_parser("create", help="create an API key and print its secret once")
    p.add_argument("--tenant", required=True)
    p.add_argument("--role", choices=sorted(ROLES), required=True)
    p.add_argument("--name", required=True, help="a label, e.g. 'rater ui'")
    feedback_option(p)
