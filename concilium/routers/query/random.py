"""Baseline: pick a candidate uniformly at random (seedable)."""

from __future__ import annotations

import random as _random
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from concilium.routers.base import Candidate, Query, QueryRouter, RouteDecision


class RandomConfig(BaseModel):
    """Configuration of the `random` baseline router."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["random"] = "random"
    seed: int | None = Field(default=None, description="Seed for reproducible choices.")


class RandomRouter(QueryRouter):
    kind = "random"

    def __init__(self, config: RandomConfig | None = None) -> None:
        self.config = config or RandomConfig()
        self._rng = _random.Random(self.config.seed)

    def route(self, query: Query, candidates: Sequence[Candidate]) -> RouteDecision:
        names = [c.name for c in candidates]
        chosen = self._rng.choice(names)
        p = 1.0 / len(names)
        return RouteDecision(
            router=self.kind,
            experts=(chosen,),
            weights=(1.0,),
            scores=dict.fromkeys(names, p),
            confidence=p,
            reason="uniform random",
        )
