"""From feedback facts to candidate training rows, one function per dataset kind.

The rules, in one place:

- A generation's votes: thumbs up and ratings >= ``sft_min_rating`` count for it, thumbs
  down and ratings <= ``max_rating_rejected`` against it, each with its source's weight
  (human vs synthetic). Ratings also give a weighted mean rating.
- **SFT**: prompt -> output of every generation whose votes for outweigh those against,
  and prompt -> corrected output of every correction (a human-edited output).
- **Unpaired (KTO)**: prompt -> output with ``label`` true or false by the same votes; a
  generation whose votes cancel out is dropped as a ``conflict``.
- **Preference / reward**: explicit A/B preferences between two generations of one prompt
  (ties dropped; disagreeing votes on the same pair resolved by the conflict rule); pairs
  derived from ratings of different outputs of one prompt (mean >= ``min_rating_chosen``
  against mean <= ``max_rating_rejected``, at least ``min_rating_margin`` apart) where no
  explicit preference decided the pair; and correction -> original output. Reward rows
  add a ``margin`` in [0, 1] (explicit: mean strength of the winning votes, 1 when unset;
  derived: rating difference / 4; correction: 1) and the critics' mean per-dimension scores
  of each side when there are any.

Candidates come out in a canonical order (task, prompt, generations), so a build does not
depend on the order events arrived in.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from flywheel.dataset.options import BuildOptions
from flywheel.dataset.records import HUMAN, FeedbackFact, GenerationText, PromptValue


@dataclass(slots=True)
class Candidate:
    """A would-be training row, with what it came from."""

    task: str
    prompt: PromptValue
    prompt_hash: str
    # SFT / unpaired: (completion,); preference / reward: (chosen, rejected).
    completions: tuple[str, ...]
    # The generations behind the completions (a correction's row: the corrected one).
    generation_ids: tuple[str, ...]
    event_ids: tuple[str, ...]
    # "human" when any person's feedback contributed, else the critic sources.
    source: str
    label: bool | None = None
    margin: float | None = None
    # Per side: {dimension: mean score} from critics.
    scores: tuple[dict[str, float], ...] = ()


@dataclass
class Dropped:
    """What curation or the quality checks removed, and why."""

    reason: str
    event_ids: tuple[str, ...]
    generation_ids: tuple[str, ...] = ()
    detail: str = ""


class Votes:
    """What the feedback on one generation says (also summed up by PostgreSQL: pg_input).

    A plain slotted class: a build makes one per judged generation (hundreds of thousands),
    and a dataclass with default factories costs several times more to create.
    """

    __slots__ = ("events", "rating_sum", "rating_weight", "scores", "sources",
                 "weight_against", "weight_for")  # fmt: skip

    def __init__(self) -> None:
        self.weight_for = 0.0
        self.weight_against = 0.0
        self.rating_weight = 0.0
        self.rating_sum = 0.0
        self.events: list[str] = []
        self.sources: set[str] = set()
        self.scores: dict[str, list[float]] | None = None

    @classmethod
    def summed(
        cls,
        events: list[str],
        sources: set[str],
        rating_weight: float,
        rating_sum: float,
        scores: dict[str, list[float]] | None,
    ) -> Votes:
        """Votes added up elsewhere, without for/against weights (pair kinds use none)."""
        votes = cls.__new__(cls)
        votes.weight_for = votes.weight_against = 0.0
        votes.rating_weight = rating_weight
        votes.rating_sum = rating_sum
        votes.events = events
        votes.sources = sources
        votes.scores = scores
        return votes

    @property
    def mean_rating(self) -> float | None:
        return self.rating_sum / self.rating_weight if self.rating_weight else None


def _source(sources: Iterable[str]) -> str:
    unique = sorted(set(sources))
    return HUMAN if HUMAN in unique else ",".join(unique)


def _mean_scores(votes: Votes | None) -> dict[str, float]:
    if votes is None or votes.scores is None:
        return {}
    return {dim: sum(v) / len(v) for dim, v in sorted(votes.scores.items())}


class Curation:
    """Turns the facts of one build into candidates of the options' kind."""

    def __init__(
        self,
        facts: Iterable[FeedbackFact],
        generations: Mapping[str, GenerationText],
        options: BuildOptions,
        votes: dict[str, Votes] | None = None,
    ) -> None:
        """``votes``: the generations' votes already summed up from the facts (pair kinds
        only: such votes carry ratings, events, sources and scores, no for/against weights),
        in which case ``facts`` need only be the preferences and corrections."""
        if votes is not None and options.kind not in ("preference", "reward"):
            raise ValueError(f"precomputed votes cannot build a {options.kind} dataset")
        self._given_votes = votes
        self.options = options
        self.generations = generations
        self.dropped: list[Dropped] = []
        kept = [f for f in facts if f.human or not options.human_only]
        # Canonical order: curation never depends on the order events arrived in.
        self.facts = sorted(kept, key=lambda f: (f.occurred_at, f.event_id))

    def candidates(self) -> list[Candidate]:
        """The candidates of the options' kind, in canonical order."""
        build: dict[str, Callable[[], list[Candidate]]] = {
            "sft": self.sft,
            "unpaired": self.unpaired,
            "preference": self.pairs,
            "reward": self.pairs,
        }
        found = build[self.options.kind]()
        return sorted(found, key=lambda c: (c.task, c.prompt_hash, c.generation_ids, c.completions))

    # -- per generation -----------------------------------------------------------------

    def _text(self, generation_id: str, fact: FeedbackFact) -> GenerationText | None:
        text = self.generations.get(generation_id)
        if text is None:
            self.dropped.append(Dropped("missing_generation", (fact.event_id,), (generation_id,)))
        return text

    def _votes(self) -> dict[str, Votes]:
        if self._given_votes is not None:
            return self._given_votes
        o = self.options
        votes: dict[str, Votes] = defaultdict(Votes)
        for f in self.facts:
            v = votes[f.generation_id]
            weight = o.weight(f.human)
            counted = False
            if f.kind == "thumbs" and f.thumbs_up is not None:
                if f.thumbs_up:
                    v.weight_for += weight
                else:
                    v.weight_against += weight
                counted = True
            elif f.kind == "rating" and f.rating is not None:
                v.rating_weight += weight
                v.rating_sum += weight * f.rating
                if f.rating >= o.sft_min_rating:
                    v.weight_for += weight
                elif f.rating <= o.max_rating_rejected:
                    v.weight_against += weight
                counted = True
            if f.dimension_scores:
                scores = v.scores if v.scores is not None else defaultdict(list)
                for dimension, score in f.dimension_scores:
                    scores[dimension].append(score)
                v.scores = scores
                counted = True
            if counted:
                v.events.append(f.event_id)
                v.sources.add(f.source)
        return votes

    def _single(self, generation_id: str, votes: Votes, label: bool | None) -> Candidate | None:
        text = self.generations.get(generation_id)
        if text is None:
            self.dropped.append(
                Dropped("missing_generation", tuple(votes.events), (generation_id,))
            )
            return None
        return Candidate(
            task=text.task,
            prompt=text.prompt,
            prompt_hash=text.prompt_hash,
            completions=(text.output,),
            generation_ids=(generation_id,),
            event_ids=tuple(votes.events),
            source=_source(votes.sources),
            label=label,
        )

    def _corrections(self) -> list[tuple[FeedbackFact, GenerationText]]:
        found = []
        for f in self.facts:
            if f.kind == "correction" and f.correction is not None:
                text = self._text(f.generation_id, f)
                if text is not None:
                    found.append((f, text))
        return found

    # -- kinds ----------------------------------------------------------------------------

    def sft(self) -> list[Candidate]:
        """Good outputs by their votes, and every correction."""
        rows = []
        for generation_id, v in self._votes().items():
            if v.weight_for > v.weight_against:
                row = self._single(generation_id, v, None)
                if row is not None:
                    rows.append(row)
        for f, text in self._corrections():
            rows.append(
                Candidate(
                    task=text.task,
                    prompt=text.prompt,
                    prompt_hash=text.prompt_hash,
                    completions=(f.correction or "",),
                    generation_ids=(text.generation_id,),
                    event_ids=(f.event_id,),
                    source=f.source,
                )
            )
        return rows

    def unpaired(self) -> list[Candidate]:
        """Outputs labelled good or bad by their votes; a tie is a conflict."""
        rows = []
        for generation_id, v in self._votes().items():
            if v.weight_for == v.weight_against:
                if v.weight_for > 0:
                    self.dropped.append(Dropped("conflict", tuple(v.events), (generation_id,)))
                continue
            row = self._single(generation_id, v, v.weight_for > v.weight_against)
            if row is not None:
                rows.append(row)
        return rows

    def pairs(self) -> list[Candidate]:
        """Explicit preferences, then pairs derived from ratings, then corrections."""
        votes = self._votes()
        rows, decided = self._explicit(votes)
        rows.extend(self._derived(votes, decided))
        for f, text in self._corrections():
            if f.correction == text.output:
                continue
            rows.append(
                Candidate(
                    task=text.task,
                    prompt=text.prompt,
                    prompt_hash=text.prompt_hash,
                    completions=(f.correction or "", text.output),
                    generation_ids=(text.generation_id, text.generation_id),
                    event_ids=(f.event_id,),
                    source=f.source,
                    margin=1.0,
                    scores=(_mean_scores(None), _mean_scores(votes.get(text.generation_id))),
                )
            )
        return rows

    def _explicit(self, votes: Mapping[str, Votes]) -> tuple[list[Candidate], set[frozenset[str]]]:
        by_pair: dict[tuple[str, str], list[FeedbackFact]] = defaultdict(list)
        for f in self.facts:
            if f.kind == "preference" and f.generation_b_id:
                by_pair[tuple(sorted((f.generation_id, f.generation_b_id)))].append(f)  # type: ignore[index]
        rows: list[Candidate] = []
        decided: set[frozenset[str]] = set()
        for (first, second), facts in by_pair.items():
            decided.add(frozenset((first, second)))
            events = tuple(f.event_id for f in facts)
            winner, strength = self._resolve(facts, events, (first, second))
            if winner is None:
                continue
            loser = second if winner == first else first
            chosen = self._text(winner, facts[0])
            rejected = self._text(loser, facts[0])
            if chosen is None or rejected is None:
                continue
            rows.append(
                Candidate(
                    task=chosen.task,
                    prompt=chosen.prompt,
                    prompt_hash=chosen.prompt_hash,
                    completions=(chosen.output, rejected.output),
                    generation_ids=(winner, loser),
                    event_ids=events,
                    source=_source(f.source for f in facts),
                    margin=strength,
                    scores=(_mean_scores(votes.get(winner)), _mean_scores(votes.get(loser))),
                )
            )
        return rows, decided

    def _resolve(
        self, facts: list[FeedbackFact], events: tuple[str, ...], pair: tuple[str, str]
    ) -> tuple[str | None, float]:
        """The winning generation of a pair's votes and the winners' mean strength."""
        o = self.options
        weight: dict[str, float] = defaultdict(float)
        strengths: dict[str, list[float]] = defaultdict(list)
        latest: str | None = None
        for f in facts:  # in canonical (time) order
            if f.choice == "tie":
                continue
            winner = f.generation_id if f.choice == "a" else f.generation_b_id or ""
            strength = f.strength if f.strength is not None else 1.0
            weight[winner] += o.weight(f.human) * (strength if strength > 0 else 1.0)
            strengths[winner].append(strength)
            latest = winner
        if latest is None:
            self.dropped.append(Dropped("tie", events, pair))
            return None, 0.0
        if len(weight) > 1:
            first, second = (weight.get(g, 0.0) for g in pair)
            if o.conflict_rule == "drop" or (
                o.conflict_rule == "weighted_majority" and first == second
            ):
                self.dropped.append(Dropped("conflict", events, pair))
                return None, 0.0
            if o.conflict_rule == "weighted_majority":
                latest = pair[0] if first > second else pair[1]
        wins = strengths[latest]
        return latest, sum(wins) / len(wins)

    def _derived(self, votes: Mapping[str, Votes], decided: set[frozenset[str]]) -> list[Candidate]:
        o = self.options
        by_prompt: dict[tuple[str, str], list[tuple[str, float]]] = defaultdict(list)
        for generation_id, v in votes.items():
            mean = v.mean_rating
            text = self.generations.get(generation_id)
            if mean is not None and text is not None:
                by_prompt[(text.task, text.prompt_hash)].append((generation_id, mean))
        rows = []
        for rated in by_prompt.values():
            rated.sort()
            chosen = [(g, m) for g, m in rated if m >= o.min_rating_chosen]
            rejected = [(g, m) for g, m in rated if m <= o.max_rating_rejected]
            for good, good_mean in chosen:
                for bad, bad_mean in rejected:
                    if good_mean - bad_mean < o.min_rating_margin:
                        continue
                    if frozenset((good, bad)) in decided:
                        continue
                    a, b = self.generations[good], self.generations[bad]
                    rows.append(
                        Candidate(
                            task=a.task,
                            prompt=a.prompt,
                            prompt_hash=a.prompt_hash,
                            completions=(a.output, b.output),
                            generation_ids=(good, bad),
                            event_ids=tuple(votes[good].events + votes[bad].events),
                            source=_source(votes[good].sources | votes[bad].sources),
                            margin=(good_mean - bad_mean) / 4,
                            scores=(_mean_scores(votes[good]), _mean_scores(votes[bad])),
                        )
                    )
        return rows
