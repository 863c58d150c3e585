"""Routers and strategies replayed over an outcome table (RouterBench's offline method).

The same routers and planners the service runs decide for each test query; the table says what
the chosen expert(s) answered, at what cost and latency — nothing is regenerated. Ensembles fuse
the table's answers with the gate weights (the service's `fuse`); cascades walk their stages using
the table's confidences (mean token log-probabilities) against the threshold.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from concilium.orchestrator.catalog import estimate_tokens
from concilium.orchestrator.fusion import Vote, fuse
from concilium.orchestrator.planning import Budget, Option, plan_cascade, plan_ensemble
from concilium.outcomes.store import Labelled
from concilium.outcomes.table import OutcomeTable
from concilium.routers.base import Candidate, Query, QueryRouter, RouteDecision, gate_qualities


@dataclass(frozen=True, slots=True)
class Result:
    """Per-query outcome of one router/strategy setting: arrays [Q]."""

    quality: np.ndarray
    cost: np.ndarray
    latency_ms: np.ndarray
    calls: np.ndarray  # experts run per query
    chosen: list[str]  # the answering expert per query

    def mean(self) -> dict[str, float]:
        return {
            "quality": float(self.quality.mean()),
            "cost": float(self.cost.mean()),
            "latency_ms": float(self.latency_ms.mean()),
            "calls": float(self.calls.mean()),
        }


class TableSource:
    """An outcome table as the predictive router's outcome source (every cell labelled)."""

    def __init__(self, table: OutcomeTable, embeddings: np.ndarray) -> None:
        q, e = table.quality.shape
        self._rows = Labelled(
            embeddings=np.repeat(embeddings.astype(np.float32), e, axis=0),
            experts=[x for _ in range(q) for x in table.experts],
            quality=table.quality.reshape(-1).astype(np.float32),
        )

    def version(self) -> int:
        return 0

    def labelled(self, dim: int) -> Labelled:
        return self._rows


@dataclass
class Replay:
    """Everything needed to replay routing over `table` (the test table)."""

    table: OutcomeTable
    embeddings: np.ndarray  # [Q, dim] query embeddings
    candidates: list[Candidate]  # static candidates, in table.experts order
    prices: dict[str, tuple[float, float]] | None  # None: estimate from `mean_cost`
    mean_cost: dict[str, float] | None = None
    max_tokens: int = 48
    tokens: list[np.ndarray] | None = None  # per query [m, dim] token embeddings, when known

    def candidates_for(self, i: int) -> list[Candidate]:
        """The candidates with this query's estimated (upper-bound) cost, as the service does."""
        import dataclasses

        prompt = estimate_tokens(self.table.prompts[i])
        out = []
        for c in self.candidates:
            if self.prices is not None:
                p_in, p_out = self.prices[c.name]
                est = (prompt * p_in + self.max_tokens * p_out) / 1000
            else:
                est = (self.mean_cost or {}).get(c.name, 0.0)
            j = self.table.column(c.name)
            out.append(
                dataclasses.replace(
                    c, est_cost=est, est_latency_ms=float(self.table.latency_ms[i, j])
                )
            )
        return out

    def decide(
        self, router: QueryRouter, i: int, quality_weight: float | None = None
    ) -> tuple[RouteDecision, list[Candidate]]:
        cands = self.candidates_for(i)
        tokens = None if self.tokens is None else self.tokens[i]
        q = Query(self.table.prompts[i], self.embeddings[i], quality_weight, tokens)
        return router.route(q, cands), cands

    # -- strategies ------------------------------------------------------------------------------
    def single(self, router: QueryRouter, quality_weight: float | None = None) -> Result:
        return self._collect(lambda i: self._single(router, i, quality_weight))

    def _single(self, router: QueryRouter, i: int, w: float | None) -> tuple[list[int], int]:
        d, _ = self.decide(router, i, w)
        j = self.table.column(d.expert)
        return [j], j

    def ensemble(
        self,
        router: QueryRouter,
        *,
        max_cost: float | None,
        max_experts: int = 3,
        quality_weight: float | None = None,
    ) -> Result:
        def one(i: int) -> tuple[list[int], int]:
            d, cands = self.decide(router, i, quality_weight)
            budget = Budget(
                max_cost=max_cost,
                max_experts=max_experts,
                quality_weight=1.0 if quality_weight is None else quality_weight,
            )
            plan = plan_ensemble(_options(d, cands), budget)
            if plan is None:
                return self._cheapest(i)
            cols = [self.table.column(n) for n in plan.experts]
            votes = [
                Vote(n, self._answer(i, j), g, _conf(self.table.confidence[i, j]))
                for n, j, g in zip(plan.experts, cols, plan.weights, strict=True)
            ]
            return cols, cols[fuse(votes).winner]

        return self._collect(one)

    def cascade(
        self,
        router: QueryRouter,
        *,
        threshold: float,
        max_cost: float | None = None,
        max_experts: int = 3,
        adequacy: float = 0.5,
    ) -> Result:
        def one(i: int) -> tuple[list[int], int]:
            d, cands = self.decide(router, i)
            plan = plan_cascade(
                _options(d, cands),
                Budget(max_cost=max_cost, max_experts=max_experts),
                adequacy=adequacy,
            )
            if plan is None:
                return self._cheapest(i)
            ran: list[int] = []
            for n in plan.experts:
                j = self.table.column(n)
                ran.append(j)
                c = self.table.confidence[i, j]
                if np.isnan(c) or c >= threshold:
                    break
            return ran, ran[-1]

        return self._collect(one, sequential=True)

    # -- baselines -------------------------------------------------------------------------------
    def fixed(self, expert: str) -> Result:
        j = self.table.column(expert)
        return self._collect(lambda i: ([j], j))

    def random(self, seed: int = 0) -> Result:
        rng = random.Random(seed)
        e = len(self.table.experts)
        return self._collect(lambda i: ([k := rng.randrange(e)], k))

    def oracle(self) -> Result:
        """Per query the cheapest expert among those with the best quality."""

        def one(i: int) -> tuple[list[int], int]:
            q, c = self.table.quality[i], self.table.cost[i]
            best = np.flatnonzero(q >= q.max() - 1e-12)
            j = int(best[np.argmin(c[best])])
            return [j], j

        return self._collect(one)

    def _cheapest(self, i: int) -> tuple[list[int], int]:
        j = int(np.argmin(self.table.cost[i]))
        return [j], j

    def _answer(self, i: int, j: int) -> str:
        return self.table.answers[i][j] if self.table.answers is not None else str(j)

    def _collect(self, pick: Any, *, sequential: bool = False) -> Result:
        t = self.table
        n = len(t)
        quality, cost, latency, calls = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
        chosen: list[str] = []
        for i in range(n):
            ran, ans = pick(i)
            quality[i] = t.quality[i, ans]
            cost[i] = t.cost[i, ran].sum()
            lat = t.latency_ms[i, ran]
            latency[i] = lat.sum() if sequential else lat.max()
            calls[i] = len(ran)
            chosen.append(t.experts[ans])
        return Result(quality, cost, latency, calls, chosen)


def _options(d: RouteDecision, cands: Sequence[Candidate]) -> list[Option]:
    gates = gate_qualities(d)
    return [
        Option(c.name, gates.get(c.name, 0.0), c.est_cost, c.est_latency_ms, c.est_energy_j)
        for c in cands
    ]


def _conf(x: float) -> float | None:
    return None if np.isnan(x) else float(x)
