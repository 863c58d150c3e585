"""Uniform merge: every candidate adapter at equal weight on every token (the baseline).

With a global prior the candidates are the prior's; without one, all registered adapters. K is the
number of candidates, whatever ``top_k`` says: this is the equal-weight merge, not a sparse mixture.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from concilium.routers.token.base import TokenPrior, TokenRouter, TokenRouterConfig, top_k_softmax

if TYPE_CHECKING:
    from torch import Tensor


class UniformConfig(TokenRouterConfig):
    """Equal weights over all candidate adapters."""

    kind: Literal["uniform"] = "uniform"


class UniformRouter(TokenRouter):
    kind = "uniform"

    def __init__(self, config: UniformConfig | None = None) -> None:
        super().__init__(config or UniformConfig())

    def scores(self, x: Tensor, layer: str) -> Tensor:
        return x.new_zeros(x.shape[0], len(self.adapters))  # [T, N]

    def select(self, scores: Tensor, prior: TokenPrior | None) -> tuple[Tensor, Tensor]:
        if prior is not None and prior.bias is not None:
            prior = TokenPrior(prior.allowed)  # a bias would make the merge unequal
        return top_k_softmax(scores, len(self.adapters), 1.0, prior)
