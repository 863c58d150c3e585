"""Tryage-style predictive router: predict each candidate's quality on this query, then trade it
against cost under the caller's `quality_weight`.

Predicted quality of expert e on query x blends two sources:

* **outcomes** — the labelled rows of the outcome store (feedback on live requests, imported
  outcome tables) for e: the k nearest by cosine similarity s_i, each weighted
  w_i = exp((s_i - 1) / temperature), so near-duplicates count fully and far rows vanish;
* **a learned head** (`head: logistic`) — per expert with labelled outcomes, a logistic
  regression on the query embedding (label: quality ≥ 0.5, scikit-learn's default C), refitted in
  the background when the store has moved and `head_refit_s` has passed; its probability h_e
  enters the prior of that expert (below). A service calls `warm(dim)` at start, which loads the
  rows and fits the heads on a thread while requests are routed by pilots alone; a router used
  without `warm` (evaluation replays) loads and fits on its first request, so every decision
  uses them;
* **pilots** — RouterRetriever's pilot score r_e turned into a prior
  π_e = exp((r_e - max_c r_c) / pilot_temperature): 1 for the best-matching candidate, less for
  the others. A newly registered expert has pilots but no outcomes, so it is routed by its pilots
  rather than ignored (cold start). For an expert with a head the prior is
  p_e = (1 − β)·h_e + β·π_e, β = `pilot_blend`. β = 1 (pilots; no head is fitted) is the default:
  leave-one-phrasing-out CV over the demo pack's fit table (`benchmarks/predictive_cv.py`, the
  held-out queries never read) gave 94.5 % of oracle at β = 1, 94.0 % at 0.5, 91.0 % at 0 —
  on a phrasing it has not seen, the logistic head is a worse prior than the pilots.

    q̂_e = (Σ_i w_i q_i + m p_e) / (Σ_i w_i + m)        (m = prior_strength)

Then the chosen expert maximises  w · q̂_e − (1 − w) · cost_e / max_c cost_c  with w the request's
`quality_weight` (1 = quality only, 0 = cheapest), over the candidates that already satisfy the
hard constraints. Feedback bumps the store's version; the router reloads its rows on the next
request after `refresh_s`, so routing improves without a restart.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from typing import Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from concilium.outcomes.store import Labelled
from concilium.routers.base import Candidate, Query, QueryRouter, RouteDecision
from concilium.routers.query.retriever import RetrieverConfig, RetrieverRouter

log = logging.getLogger(__name__)


class OutcomeSource(Protocol):
    """What the router reads from an outcome store."""

    def version(self) -> int: ...

    def labelled(self, dim: int) -> Labelled: ...


class PredictiveConfig(BaseModel):
    """Configuration of the `predictive` router."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["predictive"] = "predictive"
    k: int = Field(default=32, ge=1, description="Nearest labelled outcomes used per expert.")
    temperature: float = Field(
        default=0.1, gt=0, description="Similarity → weight temperature of the neighbours."
    )
    prior_strength: float = Field(
        default=1.0, ge=0, description="Pseudo-observations of the pilot prior (cold start)."
    )
    pilot_temperature: float = Field(
        default=0.05, gt=0, description="How fast the pilot prior falls off from the best match."
    )
    default_quality_weight: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="quality_weight when the request sets none (concilium calibrate writes it).",
    )
    head: Literal["logistic", "none"] = Field(
        default="logistic", description="Learned per-expert quality head over the outcomes."
    )
    pilot_blend: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="Share of the pilot prior in the prior of an expert that has a learned head "
        "(0 = the head alone, 1 = the pilots alone).",
    )
    head_refit_s: float = Field(
        default=30.0, ge=0, description="Least time between two refits of the learned head."
    )
    pilots: RetrieverConfig = Field(
        default_factory=RetrieverConfig, description="The pilot scorer behind the prior."
    )
    refresh_s: float = Field(
        default=1.0, ge=0, description="How often the outcome store's version is checked."
    )


class PredictiveRouter(QueryRouter):
    kind = "predictive"

    def __init__(self, config: PredictiveConfig | None = None) -> None:
        self.config = config or PredictiveConfig()
        self._pilots = RetrieverRouter(self.config.pilots)
        self._source: OutcomeSource | None = None
        self._rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._version: int | None = None
        self._dim: int | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self._heads: dict[str, _Head] = {}
        self._head_version: int | None = None
        self._head_fitted = -math.inf
        self._fitting = False
        self._warming = False  # warm() is loading the rows: requests do not wait for them

    def attach(self, source: OutcomeSource | None) -> None:
        """Learn from `source` (an OutcomeStore); None = pilots only."""
        with self._lock:
            self._source, self._version, self._rows = source, None, {}

    def prepare(self, candidates: Sequence[Candidate]) -> None:
        self._pilots.prepare(candidates)

    def warm(self, dim: int) -> threading.Thread | None:
        """Load the labelled rows of `dim`-d embeddings and fit the heads on a thread, off the
        request path; meanwhile requests are routed by pilots. The thread, or None when there is
        no outcome store."""
        src = self._source
        if src is None:
            return None
        with self._lock:
            self._warming = self._fitting = True

        def run() -> None:
            try:
                version = src.version()
                rows = _group(src.labelled(dim))
                with self._lock:
                    self._rows, self._version, self._dim = rows, version, dim
                    self._checked = time.monotonic()
                    self._warming = False
                if self._uses_heads:
                    self._head_fitted = time.monotonic()
                    self._fit_heads(rows, version)
            except Exception as e:  # e.g. the store closed under it: requests reload inline
                log.warning("predictive router: warm-up failed (%s); learning on demand", e)
            finally:
                self._warming = self._fitting = False

        thread = threading.Thread(target=run, name="predictive-warm", daemon=True)
        thread.start()
        return thread

    @property
    def _uses_heads(self) -> bool:
        """Heads are fitted only when they take part in the prior."""
        return self.config.head != "none" and self.config.pilot_blend < 1

    # -- prediction -----------------------------------------------------------------------------
    def predict(self, query: Query, candidates: Sequence[Candidate]) -> np.ndarray:
        """Predicted quality in [0, 1] of each candidate on `query`."""
        names = [c.name for c in candidates]
        r = self._pilots.route(query, candidates).scores
        pilot = np.array([r[n] for n in names], dtype=np.float64)
        prior = np.exp((pilot - pilot.max()) / self.config.pilot_temperature)
        rows = self._labelled(query.embedding.size)
        heads = self._heads
        m = self.config.prior_strength
        out = np.empty(len(names))
        for i, name in enumerate(names):
            p, head = prior[i], heads.get(name)
            if head is not None and head.reads(query.embedding):
                b = self.config.pilot_blend
                p = (1 - b) * head.predict(query.embedding) + b * prior[i]
            num, den = m * p, m
            if name in rows:
                emb, q = rows[name]
                sims = emb @ query.embedding.astype(np.float32)
                top = np.argsort(-sims)[: self.config.k]
                w = np.exp((sims[top].astype(np.float64) - 1.0) / self.config.temperature)
                num += float(w @ q[top])
                den += float(w.sum())
            out[i] = num / den if den > 0 else prior[i]
        return out

    def route(self, query: Query, candidates: Sequence[Candidate]) -> RouteDecision:
        names = [c.name for c in candidates]
        q_hat = self.predict(query, candidates)
        w = (
            self.config.default_quality_weight
            if query.quality_weight is None
            else query.quality_weight
        )
        cost = np.array([c.est_cost for c in candidates], dtype=np.float64)
        rel_cost = cost / cost.max() if cost.max() > 0 else np.zeros_like(cost)
        utility = w * q_hat - (1 - w) * rel_cost - 1e-9 * rel_cost  # cost breaks exact ties
        order = np.argsort(-utility, kind="stable")
        best = int(order[0])
        return RouteDecision(
            router=self.kind,
            experts=(names[best],),
            weights=(1.0,),
            scores={n: float(u) for n, u in zip(names, utility, strict=True)},
            confidence=float(q_hat[best]),
            reason=f"max predicted quality - cost (quality_weight={w:g})",
            extra={
                "predicted_quality": {
                    n: round(float(q), 4) for n, q in zip(names, q_hat, strict=True)
                },
                "quality_weight": w,
            },
        )

    def _labelled(self, dim: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        src = self._source
        if src is None:
            return {}
        now = time.monotonic()
        fresh = self._version is not None and now - self._checked < self.config.refresh_s
        if self._warming or (fresh and self._dim == dim):
            return self._rows
        with self._lock:
            self._checked = now
            version = src.version()
            if version != self._version or dim != self._dim:
                if dim != self._dim:
                    self._head_version = None  # the heads read the old width: refit them
                self._rows = _group(src.labelled(dim))
                self._version, self._dim = version, dim
            self._maybe_refit(now)
            return self._rows

    def _maybe_refit(self, now: float) -> None:
        """Refit the heads (in a background thread once a model exists) when the rows moved."""
        if not self._uses_heads or self._fitting or self._head_version == self._version:
            return
        if now - self._head_fitted < self.config.head_refit_s:
            return
        self._fitting, self._head_fitted = True, now
        rows, version = self._rows, self._version

        def fit() -> None:
            try:
                self._fit_heads(rows, version)
            finally:
                self._fitting = False

        if not self._heads:  # the first fit happens inline: the first decisions use it
            fit()
        else:
            threading.Thread(target=fit, name="predictive-head-fit", daemon=True).start()

    def _fit_heads(
        self, rows: dict[str, tuple[np.ndarray, np.ndarray]], version: int | None
    ) -> None:
        """One logistic head per expert with labelled rows; `version` is the rows' store version."""
        self._heads = {n: _Head.fit(e, q) for n, (e, q) in rows.items()}
        self._head_version = version


class _Head:
    """P(quality ≥ 0.5 | query embedding) for one expert: a logistic regression's weights."""

    def __init__(self, constant: float, coef: np.ndarray | None = None, bias: float = 0.0) -> None:
        self.constant, self.coef, self.bias = constant, coef, bias

    @classmethod
    def fit(cls, emb: np.ndarray, quality: np.ndarray) -> _Head:
        y = (quality >= 0.5).astype(np.int64)
        if y.min() == y.max():  # one class only: its rate is the prediction
            return cls(float(y[0]))
        from sklearn.linear_model import LogisticRegression

        lr = LogisticRegression(max_iter=1000).fit(emb.astype(np.float64), y)
        return cls(float(y.mean()), lr.coef_[0].astype(np.float64), float(lr.intercept_[0]))

    def reads(self, x: np.ndarray) -> bool:
        """Whether the head takes embeddings of `x`'s width (a constant one takes any)."""
        return self.coef is None or self.coef.size == x.size

    def predict(self, x: np.ndarray) -> float:
        if self.coef is None:
            return self.constant
        z = float(x.astype(np.float64) @ self.coef) + self.bias
        return 1.0 / (1.0 + math.exp(-max(min(z, 50.0), -50.0)))


def _group(rows: Labelled) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Labelled rows per expert: (embeddings [N_e, dim], quality [N_e])."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    experts = np.asarray(rows.experts)
    for name in sorted(set(rows.experts)):
        mask = experts == name
        out[name] = (rows.embeddings[mask], rows.quality[mask].astype(np.float64))
    return out
