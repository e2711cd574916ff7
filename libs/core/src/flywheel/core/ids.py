"""Ids that more than one service must compute alike."""

from __future__ import annotations

import uuid

# Namespace of generation ids: uuid5(NAMESPACE_URL, "flywheel:generation"), written out so it
# can never change. Changing it would give every future log of a served generation a
# different id from the one its caller was handed.
GENERATION_NAMESPACE = uuid.UUID("41d1c568-b002-5f46-9d43-109af96b1497")


def generation_id_for(tenant_id: str, client_generation_id: str) -> str:
    """The generation id of the tenant's generation logged under ``client_generation_id``.

    Deterministic, so the inference service can hand a caller the id at once and log the
    generation later: the feedback service assigns the same id when the log arrives.
    """
    return str(uuid.uuid5(GENERATION_NAMESPACE, f"{tenant_id}/{client_generation_id}"))
