"""Router interfaces. Routers decide; the orchestrator executes.

A query router sees the query (text + embedding) and the candidate experts that survived the
request's objective, and returns a `RouteDecision`: pure data, no expert is called.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np


@dataclass(frozen=True, slots=True)
class Candidate:
    """An expert as routers see it: identity, pilots, categories and its cost profile."""

    name: str
    kind: str  # model | lora | remote
    task: str  # generate | embed
    pilots: np.ndarray  # [P, dim] L2-normalised pilot embeddings
    description: np.ndarray  # [dim]
    categories: tuple[str, ...] = ()
    base: str | None = None  # the base model of a lora expert
    est_cost: float = 0.0  # estimated cost of this request on this expert
    est_latency_ms: float = 0.0  # estimated latency of this request on this expert
    est_energy_j: float | None = None  # estimated energy, when the expert declares it
    params_active: int | None = None
    params_total: int | None = None
    # late interaction: the pilots' contextual token embeddings [sum m, dim], L2-normalised, and
    # the offsets [P + 1] of each pilot's tokens (aligned with `pilots`); None when not built
    pilot_tokens: np.ndarray | None = None
    pilot_token_offsets: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class Query:
    """The routed query: its text, its L2-normalised embedding [dim] and the caller's preference.

    `quality_weight` (1 = quality only, 0 = cost only; None = the router's default) is what
    cost-aware routers trade quality against cost with; the others ignore it.
    """

    text: str
    embedding: np.ndarray
    quality_weight: float | None = None
    tokens: np.ndarray | None = None  # [m, dim] L2-normalised token embeddings (late interaction)


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """What a router chose, and why. `experts` is best-first; `weights` align with it."""

    router: str
    experts: tuple[str, ...]
    weights: tuple[float, ...]
    scores: Mapping[str, float]  # every candidate's score
    confidence: float
    reason: str
    decision_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def expert(self) -> str:
        """The chosen (first) expert."""
        return self.experts[0]

    def ranked(self) -> list[str]:
        """All scored candidates, best first (the fallback order)."""
        return sorted(self.scores, key=lambda e: -self.scores[e])


class QueryRouter(ABC):
    """Chooses expert(s) for one query among candidates. Subclasses set `kind`."""

    kind: ClassVar[str]

    def __init__(self, config: Any = None) -> None:
        self.config = config

    @property
    def name(self) -> str:
        return self.kind

    def prepare(self, candidates: Sequence[Candidate]) -> None:  # noqa: B027 - optional hook
        """Called when the candidate catalogue changes (registry version bump)."""

    @abstractmethod
    def route(self, query: Query, candidates: Sequence[Candidate]) -> RouteDecision:
        """Pick among `candidates` (non-empty, already filtered by the objective)."""


def softmax(x: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = (x - x.max()) / max(temperature, 1e-6)
    e = np.exp(z)
    return e / e.sum()


def gate_qualities(decision: RouteDecision) -> dict[str, float]:
    """Per-candidate gate in [0, 1]: the router's predicted quality when it makes one, else the
    softmax of its scores (temperature 0.05, RouterRetriever's)."""
    pred = decision.extra.get("predicted_quality")
    if isinstance(pred, Mapping):
        return {str(k): float(v) for k, v in pred.items()}
    names = list(decision.scores)
    if not names:
        return {}
    probs = softmax(np.array([decision.scores[n] for n in names], dtype=np.float64), 0.05)
    return {n: float(p) for n, p in zip(names, probs, strict=True)}


def decide(
    router: str,
    names: Sequence[str],
    scores: np.ndarray,
    *,
    temperature: float,
    reason: str,
    top: int = 1,
    extra: Mapping[str, Any] | None = None,
) -> RouteDecision:
    """Build a decision from per-candidate scores: best `top` experts, softmax confidence."""
    probs = softmax(scores, temperature)
    order = np.argsort(-scores, kind="stable")[:top]
    chosen = tuple(names[i] for i in order)
    w = probs[order] / probs[order].sum()
    return RouteDecision(
        router=router,
        experts=chosen,
        weights=tuple(float(x) for x in w),
        scores={n: float(s) for n, s in zip(names, scores, strict=True)},
        confidence=float(probs[order[0]]),
        reason=reason,
        extra=dict(extra or {}),
    )
