"""PHATGOOSE: post-hoc learned sigmoid gates, one vector per adapter and adapted layer.

Each adapter's gate vectors are trained after the adapter itself, with the adapter frozen, on that
adapter's own examples only (``concilium.experts.moe.lora_gates.train_phatgoose_gate``). At
inference a token is routed top-k over the normalised dot products of its activation with every
adapter's gate at that layer: both sides are standardised (zero mean, unit variance over D), so the
logit is their correlation times √D, then a softmax over the top k.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from concilium.routers.token.base import TokenRouter, TokenRouterConfig, inv_sqrt, masked

if TYPE_CHECKING:
    from torch import Tensor


class PhatgooseConfig(TokenRouterConfig):
    """PHATGOOSE routing: top-k over standardised activation·gate products."""

    kind: Literal["phatgoose"] = "phatgoose"


def standardise(v: Tensor, eps: float = 1e-6) -> Tensor:
    """Zero mean, unit variance along the last dim (D)."""
    v = v - v.mean(-1, keepdim=True)
    return v / (v.pow(2).mean(-1, keepdim=True).sqrt() + eps)


class PhatgooseRouter(TokenRouter):
    kind = "phatgoose"

    def __init__(self, config: PhatgooseConfig | None = None) -> None:
        super().__init__(config or PhatgooseConfig())

    def scores(self, x: Tensor, layer: str) -> Tensor:
        gates, present = self._stack(layer, x.shape[-1])  # [N, D], [N]
        logits = standardise(x.float()) @ standardise(gates).T * inv_sqrt(x.shape[-1])  # [T, N]
        return masked(logits, present)
