"""RouterRetriever: route to the expert whose pilot examples are most similar to the query.

Each expert carries a few pilot queries; their embeddings live in a faiss inner-product index.
A query's score for an expert aggregates its similarity to that expert's pilots, plus
`description_weight` times its cosine with the expert's description embedding (0 = pilots only).
Adding an expert = adding its pilots: nothing is trained.

The query-pilot similarity is *late interaction* by default (ColBERT's MaxSim): every query token
takes its best cosine among the pilot's contextual token embeddings, and the mean over the query's
tokens is the pilot's similarity. The token embeddings come from the same MiniLM forward as the
sentence embedding (registered pilots store theirs), so a paraphrase that shares one telling word
with a pilot is not averaged away by the rest of its sentence. The `rerank` best experts by
sentence cosine are re-scored this way; where the query or an expert has no token embeddings (an
encoder without them) every expert is scored by the sentence cosine.

The default aggregate is a soft maximum, ``τ·log mean exp(s/τ)`` with τ = `pilot_temperature`: it
sits between RouterRetriever's mean (τ → ∞) and nearest-pilot max (τ → 0), so one close pilot counts
without a single outlier deciding. Similarity, τ and description weight were chosen by
leave-one-phrasing-out cross-validation over the demo pack's pilot and training queries
(`benchmarks/retriever_cv.py`; the held-out evaluation queries took no part): late interaction,
τ = 0.05, description 0.25 → 95.1 % there; the best sentence setting (τ = 0.1, description 0.25)
93.2 %, RouterRetriever's plain mean 87.4 %.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from concilium.registry.index import PilotIndex
from concilium.routers.base import Candidate, Query, QueryRouter, RouteDecision, decide
from concilium.routers.query.late_interaction import TokenBank, bank_for

# τ per similarity, each chosen by benchmarks/retriever_cv.py (held-out queries never read)
DEFAULT_TAU = {"late_interaction": 0.05, "sentence": 0.1}
LI = "late_interaction"


class RetrieverConfig(BaseModel):
    """Configuration of the `retriever` router."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["retriever"] = "retriever"
    aggregate: Literal["softmax", "mean", "max", "topk"] = Field(
        default="softmax", description="How per-pilot similarities become one expert score."
    )
    pilot_temperature: float | None = Field(
        default=None,
        gt=0,
        description="τ of the softmax aggregate (τ·log mean exp(sim/τ)); default 0.05 with late "
        "interaction, 0.1 with sentence similarity.",
    )
    topk: int = Field(
        default=3, ge=1, description="Pilots averaged per expert when aggregate=topk."
    )
    description_weight: float = Field(
        default=0.25,
        ge=0,
        description="Weight of the query-description similarity added to the pilot score.",
    )
    temperature: float = Field(
        default=0.05, gt=0, description="Softmax temperature turning scores into confidence."
    )
    similarity: Literal["late_interaction", "sentence"] = Field(
        default="late_interaction",
        description="Query-pilot similarity: 'sentence' (cosine of the sentence embeddings) or "
        "'late_interaction' (ColBERT's MaxSim: each query token's best match among a pilot's "
        "tokens, averaged over the query's tokens). Late interaction needs token embeddings "
        "for the query and every pilot; without them the sentence similarity is used.",
    )
    rerank: int = Field(
        default=32,
        ge=1,
        description="Late interaction re-scores this many experts, the best by sentence "
        "similarity; the rest stay below them in their sentence order.",
    )


class RetrieverRouter(QueryRouter):
    kind = "retriever"

    def __init__(self, config: RetrieverConfig | None = None) -> None:
        self.config = config or RetrieverConfig()
        self._index: PilotIndex | None = None
        self._indexed: dict[str, np.ndarray] = {}  # expert -> the pilots array in the index
        self._bank: TokenBank | None = None

    def prepare(self, candidates: Sequence[Candidate]) -> None:
        self._index = _build_index(candidates)
        self._indexed = {c.name: c.pilots for c in _piloted(candidates)}
        self._bank = TokenBank.of(candidates)

    def route(self, query: Query, candidates: Sequence[Candidate]) -> RouteDecision:
        index = self._index
        if index is None or not all(self._holds(c) for c in candidates):
            index = _build_index(candidates)  # an expert new or re-registered since prepare
        sims = index.similarities(query.embedding)
        names = [c.name for c in candidates]
        scores = np.array([self._aggregate(sims.get(n)) for n in names], dtype=np.float32)
        how = "pilot similarity"
        bank = bank_for(query, candidates, self._bank) if self.config.similarity == LI else None
        if bank is not None:
            scores, how = self._rerank(query, bank, candidates, scores), "pilot late interaction"
        if self.config.description_weight:
            scores += self.config.description_weight * _description_sims(query, candidates)
        return decide(
            self.kind,
            names,
            scores,
            temperature=self.config.temperature,
            reason=f"{how} ({self.config.aggregate})",
        )

    def _holds(self, c: Candidate) -> bool:
        """Whether the prepared index holds exactly `c`'s pilots (the same array: a re-registered
        expert brings new ones; kept in `_indexed`, so an address is never reused)."""
        return self._indexed.get(c.name) is (c.pilots if len(c.pilots) else None)

    def _rerank(
        self, query: Query, bank: TokenBank, candidates: Sequence[Candidate], sentence: np.ndarray
    ) -> np.ndarray:
        """Late-interaction scores for the `rerank` best experts by `sentence` score; the others
        below the lowest of them, in their sentence order."""
        assert query.tokens is not None
        per_pilot = bank.maxsim(query.tokens)
        top = np.argsort(-sentence, kind="stable")[: self.config.rerank]
        late = np.array(
            [self._aggregate(per_pilot.get(candidates[i].name)) for i in top], dtype=np.float32
        )
        out = np.empty_like(sentence)
        out[:] = late.min() - 1e-3 - (sentence[top].min() - sentence)  # the rest, below
        out[top] = late
        return out

    def _aggregate(self, s: np.ndarray | None) -> float:
        if s is None or len(s) == 0:
            return -1.0  # an expert with no pilots is never preferred
        if self.config.aggregate == "max":
            return float(s.max())
        if self.config.aggregate == "softmax":
            tau = self.config.pilot_temperature or DEFAULT_TAU[self.config.similarity]
            m = float(s.max())
            return m + tau * float(np.log(np.mean(np.exp((s - m) / tau))))
        if self.config.aggregate == "topk":
            return float(np.sort(s)[::-1][: self.config.topk].mean())
        return float(s.mean())


def _description_sims(query: Query, candidates: Sequence[Candidate]) -> np.ndarray:
    """Cosine similarity of the query to each candidate's description (0 where it has none)."""
    out = np.zeros(len(candidates), dtype=np.float32)
    for i, c in enumerate(candidates):
        if c.description.size == query.embedding.size:
            out[i] = float(np.dot(c.description.ravel(), query.embedding.ravel()))
    return out


def _build_index(candidates: Sequence[Candidate]) -> PilotIndex:
    piloted = _piloted(candidates)
    index = PilotIndex(int(piloted[0].pilots.shape[-1]) if piloted else 1)
    for c in piloted:
        index.add(c.name, c.pilots)
    return index


def _piloted(candidates: Sequence[Candidate]) -> list[Candidate]:
    return [c for c in candidates if len(c.pilots)]
