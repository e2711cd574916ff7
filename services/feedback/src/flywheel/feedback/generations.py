"""Generations: model outputs as served, the unit feedback attaches to."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from flywheel.contracts.feedback.v1 import events_pb2 as events
from flywheel.contracts.feedback.v1.service_pb2 import (
    GenerationFilter,
    GenerationInput,
)
from flywheel.core.ids import generation_id_for
from flywheel.core.paging import Page, utcnow
from flywheel.feedback import mapping
from flywheel.feedback.models import (
    GenerationRow,
    TaskTypeRow,
)
from flywheel.feedback.store import (
    Store,
    filtered,
    once_despite_races,
)
from flywheel.feedback.validation import (
    MAX_ID_CHARS,
    MAX_OUTPUT_CHARS,
    TASK,
    Checks,
    prompt_hash,
)


class Generations(Store):
    """Logging and reading generations; logging by client id is idempotent."""

    def _check_generation(self, data: GenerationInput, field: str, checks: Checks) -> None:
        checks.slug(data.task, f"{field}.task", TASK)
        checks.prompt(data.prompt, f"{field}.prompt")
        checks.text(data.output, f"{field}.output", max_chars=MAX_OUTPUT_CHARS, required=False)
        checks.text(data.model, f"{field}.model", max_chars=200)
        if data.HasField("client_generation_id"):
            checks.text(
                data.client_generation_id,
                f"{field}.client_generation_id",
                max_chars=MAX_ID_CHARS,
            )
        if data.HasField("adapter"):
            checks.text(data.adapter.name, f"{field}.adapter.name", max_chars=200)
        if data.latency.ToMilliseconds() < 0:
            checks.fail(f"{field}.latency", "must not be negative")
        checks.metadata(mapping.to_json(data.metadata), f"{field}.metadata")

    async def log_generations(
        self, tenant_id: str, inputs: Sequence[GenerationInput]
    ) -> list[tuple[GenerationRow, bool]]:
        """Log generations; one already logged under its client id is returned, not duplicated.

        All or nothing: one invalid input rejects the batch, naming it by index.
        """
        checks = Checks()
        many = len(inputs) > 1
        for i, data in enumerate(inputs):
            self._check_generation(data, f"generations[{i}]" if many else "generation", checks)
        checks.done()

        async def log() -> list[tuple[GenerationRow, bool]]:
            async with self.sessions() as session, session.begin():
                await self.tenant(session, tenant_id)
                return [await self._log_one(session, tenant_id, data) for data in inputs]

        results = await once_despite_races(log)
        if any(created for _, created in results):
            self.on_commit()
        return results

    async def _log_one(
        self, session: AsyncSession, tenant_id: str, data: GenerationInput
    ) -> tuple[GenerationRow, bool]:
        client_id = data.client_generation_id if data.HasField("client_generation_id") else None
        if client_id is not None:
            existing = await session.scalar(
                select(GenerationRow).where(
                    GenerationRow.tenant_id == tenant_id,
                    GenerationRow.client_generation_id == client_id,
                )
            )
            if existing is not None:
                return existing, False
        if await session.get(TaskTypeRow, (tenant_id, data.task)) is None:
            # Free-form task types come into being on first use.
            session.add(TaskTypeRow(tenant_id=tenant_id, name=data.task, created_at=utcnow()))
        created = data.served_at.ToDatetime(UTC) if data.HasField("served_at") else utcnow()
        row = GenerationRow(
            # With a client id the id is derived from it, so whoever chose the client id (the
            # inference service's durable log) knows the generation id before it is logged.
            generation_id=(
                generation_id_for(tenant_id, client_id)
                if client_id is not None
                else str(uuid.uuid4())
            ),
            tenant_id=tenant_id,
            client_generation_id=client_id,
            task=data.task,
            prompt=mapping.to_json(data.prompt),
            prompt_hash=prompt_hash(data.prompt),
            output=data.output,
            model=data.model,
            base_model=data.base_model,
            adapter_name=data.adapter.name if data.HasField("adapter") else None,
            adapter_version=data.adapter.version if data.HasField("adapter") else None,
            composed_adapters=[mapping.to_json(a) for a in data.composed_adapters],
            alias=data.alias if data.HasField("alias") else None,
            traffic_arm=data.traffic_arm if data.HasField("traffic_arm") else None,
            sampling=mapping.to_json(data.sampling),
            latency_ms=float(data.latency.ToMilliseconds()) if data.HasField("latency") else None,
            prompt_tokens=data.prompt_tokens,
            completion_tokens=data.completion_tokens,
            user_id=data.user_id if data.HasField("user_id") else None,
            extra=mapping.to_json(data.metadata),
            created_at=created,
        )
        session.add(row)
        await session.flush()
        self.event(
            session, tenant_id, events.GenerationLogged(generation=mapping.generation_message(row))
        )
        return row, True

    async def get_generation(self, tenant_id: str, generation_id: str) -> GenerationRow:
        """One generation of the tenant."""
        async with self.sessions() as session:
            return await self.scoped_get(
                session, GenerationRow, tenant_id, generation_id, "generation"
            )

    async def list_generations(
        self, tenant_id: str, flt: GenerationFilter, page_size: int = 0, cursor: str = ""
    ) -> Page[GenerationRow]:
        """The tenant's generations matching ``flt``, newest first."""
        g = GenerationRow
        statement = filtered(
            select(g).where(g.tenant_id == tenant_id),
            g,
            flt,
            ("task", "user_id", "alias", "prompt_hash", "client_generation_id"),
        )
        async with self.sessions() as session:
            await self.tenant(session, tenant_id)
            return await self.page(session, statement, g, g.generation_id, page_size, cursor)
