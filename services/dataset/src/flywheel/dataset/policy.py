"""The trigger policy: when enough new usable feedback has arrived, ask for training.

Per tenant and task: once ``min_new_examples`` usable feedback versions (thumbs, ratings,
preferences, corrections) arrived since the last snapshot of the task, or ``max_interval``
passed since it with at least one, and not within ``cooldown`` of the last trigger, the
policy builds a snapshot and requests training on it. The method follows the data: DPO on
a preference snapshot once it has ``min_preference_pairs`` pairs, else SFT.

The snapshot, its event, the training request and the policy's ``last_triggered_at`` are
one transaction, so a crash can neither lose a request nor make two.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from google.protobuf import json_format
from sqlalchemy.ext.asyncio import AsyncSession

from flywheel.contracts.dataset.v1 import resources_pb2 as ds
from flywheel.contracts.trainer.v1 import resources_pb2 as tr
from flywheel.core.errors import FieldError, InvalidArgument
from flywheel.dataset.models import TriggerPolicyRow


@dataclass(frozen=True, slots=True)
class PolicyDefaults:
    """The policy of a tenant and task that has not set its own."""

    enabled: bool = True
    min_new_examples: int = 50
    max_interval_s: int = 0
    cooldown_s: int = 600
    min_preference_pairs: int = 20
    base_model: str = ""

    def policy(self, tenant_id: str, task: str) -> ds.TriggerPolicy:
        """These defaults as the policy of ``tenant_id`` and ``task``."""
        policy = ds.TriggerPolicy(
            tenant_id=tenant_id,
            task=task,
            enabled=self.enabled,
            min_new_examples=self.min_new_examples,
            min_preference_pairs=self.min_preference_pairs,
            base_model=self.base_model,
        )
        if self.max_interval_s:
            policy.max_interval.FromSeconds(self.max_interval_s)
        policy.cooldown.FromSeconds(self.cooldown_s)
        return policy


def policy_of(
    row: TriggerPolicyRow | None, defaults: PolicyDefaults, tenant: str, task: str
) -> ds.TriggerPolicy:
    """The effective policy: the stored one, or the defaults."""
    if row is None or row.policy is None:
        return defaults.policy(tenant, task)
    policy = ds.TriggerPolicy()
    json_format.ParseDict(row.policy, policy)
    return policy


def check_policy(policy: ds.TriggerPolicy) -> None:
    """Refuse a policy that could never or always fire by mistake."""
    errors = []
    if not policy.task:
        errors.append(FieldError("policy.task", "is required"))
    if policy.enabled and policy.min_new_examples == 0 and not policy.HasField("max_interval"):
        errors.append(FieldError("policy.min_new_examples", "must be at least 1"))
    for name in ("max_interval", "cooldown"):
        if policy.HasField(name) and getattr(policy, name).ToTimedelta() < timedelta(0):
            errors.append(FieldError(f"policy.{name}", "must not be negative"))
    if errors:
        raise InvalidArgument(errors)


def is_due(
    policy: ds.TriggerPolicy,
    *,
    new_examples: int,
    last_snapshot_at: datetime | None,
    last_triggered_at: datetime | None,
    now: datetime,
) -> str:
    """Why the policy fires now (a reason for the request), or "" when it does not."""
    if not policy.enabled or new_examples == 0:
        return ""
    cooling = policy.cooldown.ToTimedelta() if policy.HasField("cooldown") else None
    if last_triggered_at is not None and cooling and now - last_triggered_at < cooling:
        return ""
    if policy.min_new_examples and new_examples >= policy.min_new_examples:
        return f"policy: {new_examples} new examples (threshold {policy.min_new_examples})"
    if policy.HasField("max_interval") and last_snapshot_at is not None:
        waited = now - last_snapshot_at
        if waited >= policy.max_interval.ToTimedelta():
            seconds = int(waited.total_seconds())
            return f"policy: {new_examples} new examples, {seconds}s since the last snapshot"
    return ""


def training_request(
    policy: ds.TriggerPolicy,
    snapshot: ds.Snapshot,
    method: tr.TrainingMethod.ValueType,
    reason: str,
    request_id: str,
) -> ds.TrainingRequest:
    """The training request the policy makes for ``snapshot``."""
    method_name = tr.TrainingMethod.Name(method).removeprefix("TRAINING_METHOD_").lower()
    spec = tr.TrainingSpec(
        task=policy.task,
        method=method,
        base_model=policy.base_model,
        dataset_snapshot_id=snapshot.snapshot_id,
        adapter_name=f"{policy.tenant_id}-{policy.task}-{method_name}",
        adapter_type="task",
    )
    spec.hyperparameters.CopyFrom(policy.hyperparameters)
    request = ds.TrainingRequest(
        training_request_id=request_id,
        tenant_id=policy.tenant_id,
        spec=spec,
        reason=reason,
    )
    request.created_at.FromDatetime(datetime.now(UTC))
    return request


async def mark_triggered(session: AsyncSession, tenant_id: str, task: str, when: datetime) -> None:
    """Remember that the policy of ``tenant_id`` and ``task`` fired at ``when``."""
    row = await session.get(TriggerPolicyRow, (tenant_id, task))
    if row is None:
        session.add(
            TriggerPolicyRow(
                tenant_id=tenant_id, task=task, policy=None, last_triggered_at=when, updated_at=when
            )
        )
    else:
        row.last_triggered_at = when
