"""Token routers: which adapters each token uses. One file per router, one name → class table.

Every router returns ``(weights [T, K], idxs [T, K])`` for one adapted layer and never runs it;
``concilium.experts.moe.lora_mixture.LoRAMixture`` consumes the pair. Configs are a pydantic union
discriminated by ``kind``; a bad kind fails at load with the valid set.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, TypeAdapter, ValidationError

from concilium.explain import config_error
from concilium.routers.token.arrow import ArrowConfig, ArrowRouter
from concilium.routers.token.base import (
    TokenPrior,
    TokenRouter,
    TokenRouterConfig,
    prior_from_scores,
    stack_priors,
)
from concilium.routers.token.oracle import OracleConfig, OracleRouter
from concilium.routers.token.phatgoose import PhatgooseConfig, PhatgooseRouter
from concilium.routers.token.uniform import UniformConfig, UniformRouter

TOKEN_ROUTER_CLS: dict[str, type[TokenRouter]] = {
    "arrow": ArrowRouter,
    "oracle": OracleRouter,
    "phatgoose": PhatgooseRouter,
    "uniform": UniformRouter,
}

TokenRouterConfigUnion = Annotated[
    PhatgooseConfig | ArrowConfig | UniformConfig | OracleConfig, Field(discriminator="kind")
]
_CONFIG: TypeAdapter[Any] = TypeAdapter(TokenRouterConfigUnion)


def build_token_router(config: Any) -> TokenRouter:
    """Instantiate a token router from its config (a model or a mapping with ``kind``)."""
    try:
        cfg = _CONFIG.validate_python(config)
    except ValidationError as e:
        raise config_error(e, TokenRouterConfigUnion, "token router config") from None
    return TOKEN_ROUTER_CLS[cfg.kind](cfg)


__all__ = [
    "TOKEN_ROUTER_CLS",
    "TokenPrior",
    "TokenRouter",
    "TokenRouterConfig",
    "TokenRouterConfigUnion",
    "build_token_router",
    "prior_from_scores",
    "stack_priors",
]
