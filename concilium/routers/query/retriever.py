"""RouterRetriever: route to the expert whose pilot examples are most similar to the query.

Each expert carries a few pilot queries; their embeddings live in a faiss inner-product index.
A query's score for an expert aggregates its cosine similarity to that expert's pilots, plus
`description_weight` times its similarity to the expert's description embedding (0 = pilots only).
Adding an expert = adding its pilots: nothing is trained.

The default aggregate is a soft maximum, ``τ·log mean exp(s/τ)`` with τ = `pilot_temperature`: it
sits between RouterRetriever's mean (τ → ∞) and nearest-pilot max (τ → 0), so one close pilot counts
without a single outlier deciding. τ = 0.1 and description weight 0.25 were chosen by
leave-one-phrasing-out cross-validation over the demo pack's pilot and training queries (the
held-out evaluation queries took no part): 93.2 % there, against 90.1 % for mean + 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from concilium.registry.index import PilotIndex
from concilium.routers.base import Candidate, Query, QueryRouter, RouteDecision, decide


class RetrieverConfig(BaseModel):
    """Configuration of the `retriever` router."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["retriever"] = "retriever"
    aggregate: Literal["softmax", "mean", "max", "topk"] = Field(
        default="softmax", description="How per-pilot similarities become one expert score."
    )
    pilot_temperature: float = Field(
        default=0.1, gt=0, description="τ of the softmax aggregate (τ·log mean exp(sim/τ))."
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


class RetrieverRouter(QueryRouter):
    kind = "retriever"

    def __init__(self, config: RetrieverConfig | None = None) -> None:
        self.config = config or RetrieverConfig()
        self._index: PilotIndex | None = None

    def prepare(self, candidates: Sequence[Candidate]) -> None:
        self._index = _build_index(candidates)

    def route(self, query: Query, candidates: Sequence[Candidate]) -> RouteDecision:
        index = self._index
        if index is None or not {c.name for c in candidates} <= index.experts | _no_pilots(
            candidates
        ):
            index = _build_index(candidates)
        sims = index.similarities(query.embedding)
        names = [c.name for c in candidates]
        scores = np.array([self._aggregate(sims.get(n)) for n in names], dtype=np.float32)
        if self.config.description_weight:
            scores += self.config.description_weight * _description_sims(query, candidates)
        return decide(
            self.kind,
            names,
            scores,
            temperature=self.config.temperature,
            reason=f"pilot similarity ({self.config.aggregate})",
        )

    def _aggregate(self, s: np.ndarray | None) -> float:
        if s is None or len(s) == 0:
            return -1.0  # an expert with no pilots is never preferred
        if self.config.aggregate == "max":
            return float(s.max())
        if self.config.aggregate == "softmax":
            tau = self.config.pilot_temperature
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
    dim = int(candidates[0].description.shape[-1]) if candidates else 1
    index = PilotIndex(dim)
    for c in candidates:
        if len(c.pilots):
            index.add(c.name, c.pilots)
    return index


def _no_pilots(candidates: Sequence[Candidate]) -> set[str]:
    return {c.name for c in candidates if not len(c.pilots)}
