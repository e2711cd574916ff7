"""A pair build's input on PostgreSQL, aggregated by the database.

A preference or reward build reads millions of feedback versions, but curation only needs,
per judged generation, what its votes add up to (:class:`~flywheel.dataset.curation.Votes`),
plus the explicit preferences and the corrections themselves. PostgreSQL picks each
feedback's latest version and sums the votes per generation, so Python receives a row per
generation instead of one per feedback; the preferences and corrections still come as facts
and go through the same curation code as everywhere else.

The result is the same as :func:`flywheel.dataset.ledger.load_facts` followed by
``Curation._votes``, bit for bit:

- the latest version is picked with the very ordering of ``ledger._latest_versions``;
- events (and dimension scores) are aggregated in curation's canonical order, time then
  event id by code point (``COLLATE "C"``: UTF-8 bytes sort like code points);
- a vote's weighted sums are exact here, so the order Python would have added them in
  cannot matter: every weight is a multiple of 2**-10 (:func:`exact_weights`, checked before
  querying) and every sum stays below 2**43 (checked per generation), so each product and
  partial sum is a float without rounding. Builds with other weights are not aggregated.

Only with the asyncpg driver: its rows are decoded in C, where SQLAlchemy's row objects cost
more than the queries.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from flywheel.dataset.builder import gc_paused
from flywheel.dataset.curation import Votes
from flywheel.dataset.options import BuildOptions
from flywheel.dataset.records import FeedbackFact, GenerationText, fact_from_row, prompt_value

_T = TypeVar("_T")

PAIR_KINDS = frozenset({"preference", "reward"})
# Weights are multiples of 1/_GRID; sums scaled by _GRID stay below 2**53 when the unscaled
# ones stay below _SUM_LIMIT: then every float sum and product is exact.
_GRID = 1 << 10
_SUM_LIMIT = float(1 << 43)

# Each feedback's latest version up to the cutoff: ledger._latest_versions on PostgreSQL.
_LATEST = """
SELECT DISTINCT ON (feedback_id)
  event_id, feedback_id, generation_id, task, kind, source, occurred_at, thumbs_up, rating,
  choice, strength, generation_b_id, correction, dimension_scores, retracted
FROM feedback_versions
WHERE tenant_id = $1 AND occurred_at < $2 AND ($3 = '' OR task = $3) {narrow}
ORDER BY feedback_id, occurred_at DESC, retracted DESC, revision DESC, event_id
"""
# A fact: a latest version that is not retracted, of a usable kind, from a kept source.
_FACT = (
    "NOT retracted AND kind IN ('thumbs', 'rating', 'preference', 'correction')"
    " AND (source = 'human' OR NOT $4)"
)
_RATED = "kind = 'rating' AND rating IS NOT NULL"
# As fact_from_row reads them: scores unless SQL NULL or the empty array.
_SCORED = "dimension_scores::text <> '[]'"
# The facts Curation._votes counts for their generation.
_COUNTED = f"((kind = 'thumbs' AND thumbs_up IS NOT NULL) OR ({_RATED}) OR {_SCORED})"
_CANONICAL = 'occurred_at, event_id COLLATE "C"'

VOTES_SQL = f"""
SELECT generation_id,
  array_agg(event_id ORDER BY {_CANONICAL}),
  array_agg(source),
  count(*) FILTER (WHERE {_RATED} AND source = 'human'),
  coalesce(sum(rating) FILTER (WHERE {_RATED} AND source = 'human'), 0),
  coalesce(sum(abs(rating)) FILTER (WHERE {_RATED} AND source = 'human'), 0),
  count(*) FILTER (WHERE {_RATED} AND source <> 'human'),
  coalesce(sum(rating) FILTER (WHERE {_RATED} AND source <> 'human'), 0),
  coalesce(sum(abs(rating)) FILTER (WHERE {_RATED} AND source <> 'human'), 0),
  array_agg(dimension_scores::text ORDER BY {_CANONICAL}) FILTER (WHERE {_SCORED})
FROM ({_LATEST.format(narrow="")}) latest
WHERE {_FACT} AND {_COUNTED}
GROUP BY generation_id
"""

# Preferences and corrections as facts. Only feedback that has such a version can end up as
# one, so the latest-version sort is narrowed to those (a tenth of the rows, typically).
FACTS_SQL = f"""
SELECT event_id, feedback_id, generation_id, task, kind, source, occurred_at, thumbs_up,
  rating, choice, strength, generation_b_id, correction, dimension_scores::text
FROM ({
    _LATEST.format(
        narrow="AND feedback_id IN (SELECT feedback_id FROM feedback_versions"
        " WHERE tenant_id = $1 AND occurred_at < $2 AND ($3 = '' OR task = $3)"
        " AND kind IN ('preference', 'correction'))"
    )
}) latest
WHERE {_FACT} AND kind IN ('preference', 'correction')
"""

# Plain-text prompts come as their text; anything else as JSON, for prompt_value.
GENERATIONS_SQL = """
SELECT generation_id, task, prompt_hash, output,
  CASE WHEN simple THEN prompt ->> 'text' END,
  CASE WHEN simple THEN NULL ELSE prompt::text END
FROM (
  SELECT *, (jsonb_typeof(prompt) = 'object' AND NOT prompt ? 'messages'
             AND jsonb_typeof(prompt -> 'text') = 'string') AS simple
  FROM source_generations
  WHERE tenant_id = $1 AND ($2 = '' OR task = $2)
) g
"""


@dataclass(slots=True)
class PairInput:
    """What a pair build curates: preference and correction facts, texts, votes."""

    facts: list[FeedbackFact]
    generations: dict[str, GenerationText]
    votes: dict[str, Votes]


def exact_weights(options: BuildOptions) -> bool:
    """Whether every weighted vote sum of a build with ``options`` is exact in floats."""
    return all(
        (weight * _GRID).is_integer() for weight in (options.human_weight, options.synthetic_weight)
    )


def applies(driver: str, options: BuildOptions) -> bool:
    """Whether this module can load a build's input: asyncpg, a pair kind, exact weights."""
    return driver == "asyncpg" and options.kind in PAIR_KINDS and exact_weights(options)


class InexactVotes(Exception):
    """Some generation's vote sums are too large to be exact: build the Python way."""


async def load_pair_input(
    connections: Sequence[Any], tenant_id: str, options: BuildOptions
) -> PairInput:
    """The pair build input of ``tenant_id`` as of the options' cutoff, read over three
    asyncpg connections at once (the votes take the database longest; meanwhile the facts
    and texts arrive and are decoded), all in one snapshot of the data.

    Raises :class:`InexactVotes` when the sums cannot be trusted (see the module).
    """
    lead, *others = connections
    scope = (tenant_id, options.cutoff, options.task, options.human_only)
    async with lead.transaction(isolation="repeatable_read", readonly=True):
        snapshot = await lead.fetchval("SELECT pg_export_snapshot()")
        # A task group: should one read fail, the others are cancelled before the
        # connections go back to the pool.
        async with asyncio.TaskGroup() as group:
            votes = group.create_task(_read(lead, None, _votes_reader(options), VOTES_SQL, *scope))
            facts = group.create_task(_read(others[0], snapshot, _facts, FACTS_SQL, *scope))
            generations = group.create_task(
                _read(others[1], snapshot, _generations, GENERATIONS_SQL, tenant_id, options.task)
            )
    return PairInput(facts=facts.result(), generations=generations.result(), votes=votes.result())


async def _read(
    connection: Any, snapshot: str | None, decode: Callable[[list[Any]], _T], sql: str, *args: Any
) -> _T:
    """``decode`` of the rows of ``sql``, in the exported ``snapshot`` when one is given
    (else in the connection's current transaction)."""
    if snapshot is None:
        rows = await connection.fetch(sql, *args)
    else:
        async with connection.transaction(isolation="repeatable_read", readonly=True):
            await connection.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
            rows = await connection.fetch(sql, *args)
    with gc_paused():
        return decode(rows)


def _facts(rows: list[Any]) -> list[FeedbackFact]:
    return [fact_from_row(row) for row in rows]


def _votes_reader(options: BuildOptions) -> Callable[[list[Any]], dict[str, Votes]]:
    return lambda rows: _votes(rows, options)


def _generations(rows: list[Any]) -> dict[str, GenerationText]:
    return {
        generation_id: GenerationText(
            generation_id,
            task,
            text if text is not None else prompt_value(json.loads(prompt)),
            prompt_hash,
            output,
        )
        for generation_id, task, prompt_hash, output, text, prompt in rows
    }


def _votes(rows: list[Any], options: BuildOptions) -> dict[str, Votes]:
    """Votes per generation, as Curation._votes would add them up from the facts."""
    human, synthetic = options.human_weight, options.synthetic_weight
    summed = Votes.summed
    votes: dict[str, Votes] = {}
    for generation_id, events, sources, hn, hs, habs, sn, ss, sabs, scores in rows:
        if max(habs * human + sabs * synthetic, hn * human + sn * synthetic) >= _SUM_LIMIT:
            raise InexactVotes(generation_id)
        # 0.0 first: Python's running sums start there, so a zero is never -0.0.
        votes[generation_id] = summed(
            events,
            set(sources),
            0.0 + hn * human + sn * synthetic,
            0.0 + hs * human + ss * synthetic,
            _scores(scores) if scores else None,
        )
    return votes


def _scores(texts: list[str]) -> dict[str, list[float]]:
    """Per dimension, the scores of the facts (JSON texts, in canonical order)."""
    scores: dict[str, list[float]] = {}
    for text in texts:
        for d, x in json.loads(text):
            scores.setdefault(str(d), []).append(float(x))
    return scores
