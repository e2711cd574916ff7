"""Feedback statistics and JSONL exports."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, func, or_, select

from flywheel.contracts.feedback.v1.service_pb2 import (
    FeedbackFilter,
)
from flywheel.feedback import mapping
from flywheel.feedback.feedback_records import feedback_query
from flywheel.feedback.models import (
    FeedbackRow,
    GenerationRow,
)
from flywheel.feedback.store import (
    EXPORT_CHUNK_ROWS,
    Store,
)


class Reports(Store):
    """Aggregates and exports over the feedback a filter selects."""

    async def stats(
        self, tenant_id: str, flt: FeedbackFilter, group_by: Sequence[str]
    ) -> list[dict[str, Any]]:
        """Counts, mean rating, thumbs-down rate and preference win rate per group.

        ``group_by`` holds any of "adapter", "task", "source_kind". The win rate counts, for
        preferences recorded on the group's generations (side A), A wins over A + B wins.
        """
        f = FeedbackRow
        keys: list[Any] = []
        for name in group_by:
            if name == "adapter":
                keys += [f.adapter_name, f.adapter_version]
            elif name == "task":
                keys.append(f.task)
            elif name == "source_kind":
                keys.append(f.source_kind)
        base = feedback_query(tenant_id, flt).subquery()
        c = base.c
        columns = [getattr(c, k.key) for k in keys]

        def count_when(condition: Any) -> Any:
            return func.sum(case((condition, 1), else_=0))

        statement = select(
            *columns,
            func.count(func.distinct(c.generation_id)).label("generations"),
            *(count_when(c.kind == kind).label(f"n_{kind}") for kind in mapping.FEEDBACK_KINDS),
            func.avg(c.rating).label("mean_rating"),
            count_when(c.thumbs_up.is_(False)).label("thumbs_down"),
            count_when(c.preference_choice == "a").label("wins"),
            count_when(c.preference_choice == "b").label("losses"),
        ).group_by(*columns)
        async with self.sessions() as session:
            await self.tenant(session, tenant_id)
            result = (await session.execute(statement)).mappings().all()
        buckets = []
        for r in result:
            thumbs = r["n_thumbs"] or 0
            decided = (r["wins"] or 0) + (r["losses"] or 0)
            buckets.append(
                {
                    "task": r.get("task"),
                    "adapter_name": r.get("adapter_name"),
                    "adapter_version": r.get("adapter_version"),
                    "source_kind": r.get("source_kind"),
                    "generations": int(r["generations"]),
                    "count_by_kind": {
                        kind: int(r[f"n_{kind}"] or 0)
                        for kind in mapping.FEEDBACK_KINDS
                        if r[f"n_{kind}"]
                    },
                    "mean_rating": float(r["mean_rating"])
                    if r["mean_rating"] is not None
                    else None,
                    "thumbs_down_rate": (r["thumbs_down"] or 0) / thumbs if thumbs else None,
                    "preference_win_rate": (r["wins"] or 0) / decided if decided else None,
                }
            )
        return buckets

    async def export(
        self, tenant_id: str, flt: FeedbackFilter
    ) -> AsyncIterator[list[tuple[FeedbackRow, GenerationRow, GenerationRow | None]]]:
        """The tenant's feedback with its generation (and a preference's side B), oldest
        first, in chunks."""
        async with self.sessions() as session:
            await self.tenant(session, tenant_id)
        after: tuple[datetime, str] | None = None
        while True:
            f = FeedbackRow
            statement = (
                feedback_query(tenant_id, flt)
                .add_columns(GenerationRow)
                .join(GenerationRow, GenerationRow.generation_id == f.generation_id)
                .order_by(f.created_at, f.feedback_id)
                .limit(EXPORT_CHUNK_ROWS)
            )
            if after is not None:
                statement = statement.where(
                    or_(
                        f.created_at > after[0],
                        and_(f.created_at == after[0], f.feedback_id > after[1]),
                    )
                )
            async with self.sessions() as session:
                rows = [(fb, gen) for fb, gen in (await session.execute(statement)).all()]
                # Side B of each preference, so the export alone can rebuild the pairs.
                b_ids = {fb.generation_b_id for fb, _ in rows if fb.generation_b_id}
                sides_b = {
                    g.generation_id: g
                    for g in await session.scalars(
                        select(GenerationRow).where(
                            GenerationRow.tenant_id == tenant_id,
                            GenerationRow.generation_id.in_(b_ids),
                        )
                    )
                }
            if not rows:
                return
            yield [(fb, gen, sides_b.get(fb.generation_b_id or "")) for fb, gen in rows]
            last = rows[-1][0]
            after = (last.created_at, last.feedback_id)
