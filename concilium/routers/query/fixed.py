"""Baseline: always the configured expert (when the objective allows it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from concilium.errors import ObjectiveUnsatisfiable
from concilium.routers.base import Candidate, Query, QueryRouter, RouteDecision


class FixedConfig(BaseModel):
    """Configuration of the `fixed` baseline router."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["fixed"] = "fixed"
    expert: str = Field(description="The expert every query goes to.")


class FixedRouter(QueryRouter):
    kind = "fixed"

    def __init__(self, config: FixedConfig) -> None:
        self.config = config

    def route(self, query: Query, candidates: Sequence[Candidate]) -> RouteDecision:
        names = [c.name for c in candidates]
        e = self.config.expert
        if e not in names:
            raise ObjectiveUnsatisfiable(
                f"the fixed router's expert {e!r} is not among the request's candidates {names}",
                field="allowed_experts",
            )
        return RouteDecision(
            router=self.kind,
            experts=(e,),
            weights=(1.0,),
            scores={n: float(n == e) for n in names},
            confidence=1.0,
            reason="fixed",
        )
