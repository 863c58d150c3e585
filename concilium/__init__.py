"""concilium: one OpenAI-compatible gateway over many experts, routed per query and per token.

The public surface is small and cheap to import (no torch, transformers or ray at import time).
"""

from concilium.config import ServiceConfig, load_config
from concilium.errors import (
    AdapterRejected,
    ConciliumError,
    ConfigError,
    Conflict,
    ExpertFailed,
    ExpertNotFound,
    InvalidInput,
    ObjectiveUnsatisfiable,
    UnsafeURL,
)
from concilium.registry.specs import LoraSpec, ModelSpec, RemoteSpec, parse_spec
from concilium.routers.base import Candidate, Query, QueryRouter, RouteDecision

__version__ = "0.1.0"

__all__ = [
    "AdapterRejected",
    "Candidate",
    "ConciliumError",
    "ConfigError",
    "Conflict",
    "ExpertFailed",
    "ExpertNotFound",
    "InvalidInput",
    "LoraSpec",
    "ModelSpec",
    "ObjectiveUnsatisfiable",
    "Query",
    "QueryRouter",
    "RemoteSpec",
    "RouteDecision",
    "ServiceConfig",
    "UnsafeURL",
    "__version__",
    "load_config",
    "parse_spec",
]
