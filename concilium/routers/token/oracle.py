"""Oracle: every token goes to the adapter the evaluator says is right (an upper bound).

For evaluation only: the benchmark sets the true adapter of the query being decoded with
``set_target`` before generating; the router then routes every token to it with weight 1.
The global prior is ignored: the oracle already knows the answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from concilium.errors import InvalidInput
from concilium.routers.token.base import TokenPrior, TokenRouter, TokenRouterConfig

if TYPE_CHECKING:
    from torch import Tensor


class OracleConfig(TokenRouterConfig):
    """Route every token to the adapter set with ``set_target`` (evaluation only)."""

    kind: Literal["oracle"] = "oracle"
    top_k: int = Field(default=1, ge=1, description="Always 1: the true adapter only.")


class OracleRouter(TokenRouter):
    kind = "oracle"

    def __init__(self, config: OracleConfig | None = None) -> None:
        super().__init__(config or OracleConfig())
        self.target: str | None = None

    def set_target(self, name: str) -> None:
        if name not in self.adapters:
            raise InvalidInput(f"unknown adapter {name!r} (known: {self.adapters})")
        self.target = name

    def scores(self, x: Tensor, layer: str) -> Tensor:
        if self.target is None:
            raise InvalidInput("the oracle router needs set_target(adapter) before routing")
        s = x.new_full((x.shape[0], len(self.adapters)), float("-inf"))  # [T, N]
        s[:, self.adapters.index(self.target)] = 0.0
        return s

    def select(self, scores: Tensor, prior: TokenPrior | None) -> tuple[Tensor, Tensor]:
        idxs = scores.argmax(-1, keepdim=True)  # [T, 1]
        return scores.new_ones(idxs.shape), idxs
