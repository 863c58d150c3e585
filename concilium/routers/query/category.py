"""CoE (Composition of Experts) routing: query → category → expert, generalist on low confidence.

Step one classifies the query into a category by similarity to each category's pilots (the pilots
of the experts that list the category, pooled; the mean similarity is the category's score). Step
two maps the category to an expert through a category→expert table (configured, or the
best-matching expert of that category). When the category probability is below `threshold`, a
configured generalist answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from concilium.routers.base import Candidate, Query, QueryRouter, RouteDecision, softmax


class CategoryConfig(BaseModel):
    """Configuration of the `category` (CoE) router."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["category"] = "category"
    generalist: str | None = Field(
        default=None, description="Expert used when category confidence is below threshold."
    )
    threshold: float = Field(
        default=0.3, ge=0, le=1, description="Minimum category probability to trust the router."
    )
    temperature: float = Field(
        default=0.05, gt=0, description="Softmax temperature over categories."
    )
    table: dict[str, str] = Field(
        default_factory=dict, description="Explicit category → expert overrides."
    )


class CategoryRouter(QueryRouter):
    kind = "category"

    def __init__(self, config: CategoryConfig | None = None) -> None:
        self.config = config or CategoryConfig()

    def route(self, query: Query, candidates: Sequence[Candidate]) -> RouteDecision:
        q = query.embedding
        cat_pilots = _category_pilots(candidates)
        if not cat_pilots:
            return self._generalist_or_first(candidates, {}, 0.0, "no categorised candidates")
        cats = sorted(cat_pilots)
        cat_scores = np.array([float((cat_pilots[c] @ q).mean()) for c in cats], dtype=np.float32)
        probs = softmax(cat_scores, self.config.temperature)
        best = int(np.argmax(cat_scores))
        category, confidence = cats[best], float(probs[best])
        by_cat = dict(zip(cats, cat_scores.tolist(), strict=True))
        scores = {
            c.name: max((by_cat.get(k, -1.0) for k in c.categories), default=-1.0)
            for c in candidates
        }
        if confidence < self.config.threshold and self._generalist(candidates):
            return self._generalist_or_first(
                candidates, scores, confidence, f"category {category!r} below threshold"
            )
        expert = self._expert_for(category, query, candidates)
        return RouteDecision(
            router=self.kind,
            experts=(expert,),
            weights=(1.0,),
            scores=scores,
            confidence=confidence,
            reason=f"category {category!r}",
            extra={
                "category": category,
                "category_probs": dict(zip(cats, probs.tolist(), strict=True)),
            },
        )

    def _expert_for(self, category: str, query: Query, candidates: Sequence[Candidate]) -> str:
        names = {c.name for c in candidates}
        fixed = self.config.table.get(category)
        if fixed in names:
            return str(fixed)
        members = [c for c in candidates if category in c.categories]
        return max(
            members,
            key=lambda c: float((c.pilots @ query.embedding).mean()) if len(c.pilots) else -1.0,
        ).name

    def _generalist(self, candidates: Sequence[Candidate]) -> str | None:
        g = self.config.generalist
        return g if g is not None and any(c.name == g for c in candidates) else None

    def _generalist_or_first(
        self, candidates: Sequence[Candidate], scores: dict[str, float], confidence: float, why: str
    ) -> RouteDecision:
        g = self._generalist(candidates)
        chosen = g or max(candidates, key=lambda c: scores.get(c.name, -1.0)).name
        scores = scores or {c.name: 0.0 for c in candidates}
        return RouteDecision(
            router=self.kind,
            experts=(chosen,),
            weights=(1.0,),
            scores=scores,
            confidence=confidence,
            reason=f"{why}: {'generalist' if g else 'best available'} {chosen!r}",
        )


def _category_pilots(candidates: Sequence[Candidate]) -> dict[str, np.ndarray]:
    """category -> stacked pilot embeddings [P, dim] of the candidates listing it."""
    groups: dict[str, list[np.ndarray]] = {}
    for c in candidates:
        for cat in c.categories:
            if len(c.pilots):
                groups.setdefault(cat, []).append(c.pilots)
    return {k: np.concatenate(v) for k, v in groups.items()}
