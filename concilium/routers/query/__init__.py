"""Query routers: one file per router, one name → class table, one discriminated config union."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, TypeAdapter

from concilium.errors import ConfigError
from concilium.routers.base import QueryRouter
from concilium.routers.query.category import CategoryConfig, CategoryRouter
from concilium.routers.query.fixed import FixedConfig, FixedRouter
from concilium.routers.query.predictive import PredictiveConfig, PredictiveRouter
from concilium.routers.query.random import RandomConfig, RandomRouter
from concilium.routers.query.retriever import RetrieverConfig, RetrieverRouter

ROUTER_CLS: dict[str, type[QueryRouter]] = {
    "category": CategoryRouter,
    "fixed": FixedRouter,
    "predictive": PredictiveRouter,
    "random": RandomRouter,
    "retriever": RetrieverRouter,
}

RouterConfig = Annotated[
    RetrieverConfig | CategoryConfig | RandomConfig | FixedConfig | PredictiveConfig,
    Field(discriminator="kind"),
]
_CONFIG: TypeAdapter[Any] = TypeAdapter(RouterConfig)


def build_router(config: Any) -> QueryRouter:
    """Instantiate a router from its config (a model or a mapping with `kind`)."""
    from pydantic import ValidationError

    try:
        cfg = _CONFIG.validate_python(config)
    except ValidationError as e:
        raise ConfigError(
            f"invalid router config {config!r}: {e.errors()[0]['msg']} "
            f"(valid kinds: {sorted(ROUTER_CLS)})"
        ) from None
    return ROUTER_CLS[cfg.kind](cfg)


__all__ = ["ROUTER_CLS", "RouterConfig", "build_router"]
