"""Arrow: training-free routing by each adapter's top right-singular vector per layer.

An adapter's prototype at a layer is the top right-singular vector of its ``B·A`` (computed once at
registration by ``concilium.experts.moe.lora_gates.arrow_prototypes``): the input direction the
adapter changes most. A token's score for an adapter is ``|x · p|`` (the sign of a singular vector
is arbitrary), then top-k and a softmax with temperature.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from concilium.routers.token.base import TokenRouter, TokenRouterConfig, masked

if TYPE_CHECKING:
    from torch import Tensor


class ArrowConfig(TokenRouterConfig):
    """Arrow routing: top-k over |activation · prototype|."""

    kind: Literal["arrow"] = "arrow"


class ArrowRouter(TokenRouter):
    kind = "arrow"

    def __init__(self, config: ArrowConfig | None = None) -> None:
        super().__init__(config or ArrowConfig())

    def scores(self, x: Tensor, layer: str) -> Tensor:
        protos, present = self._stack(layer, x.shape[-1])  # [N, D] unit vectors, [N]
        return masked((x.float() @ protos.T).abs(), present)  # [T, N]
