"""Query routers: one file per router, one name → class table, one discriminated config union."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, TypeAdapter, ValidationError

from concilium.explain import config_error
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
    try:
        cfg = _CONFIG.validate_python(config)
    except ValidationError as e:
        raise config_error(e, RouterConfig, "router config") from None
    return ROUTER_CLS[cfg.kind](cfg)


__all__ = ["ROUTER_CLS", "RouterConfig", "build_router"]
