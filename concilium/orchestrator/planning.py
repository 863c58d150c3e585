"""Plans under a budget: which experts run for a request, and how (single, ensemble, cascade).

Pure functions over `Option`s (one per candidate: gate quality, cost, latency, energy); the
orchestrator executes the `Plan`. Every plan respects the budget — a property test checks it:

* **ensemble** (MoE²): choose the subset S, |S| ≤ max_experts, that maximises

      value(S) = w · (1 − Π_{i∈S} (1 − q_i)) − (1 − w) · cost(S) / cost_ref

  subject to  Σ cost ≤ max_cost,  max latency ≤ max_latency_ms (members run in parallel),
  Σ energy ≤ max_energy_j.  1 − Π(1 − q_i) is the chance that at least one member is right under
  independent errors: the most a fusion of their answers can recover. For pools where the number
  of subsets is at most `EXACT_LIMIT` the search is exhaustive (exact). Above that it is the
  cost-benefit greedy (add the member with the best marginal value per cost while it fits) or the
  best single member, whichever is better; for w = 1 (a monotone submodular coverage objective
  under a knapsack constraint) that is within (1 − 1/e)/2 ≈ 0.32 of the optimum
  (Leskovec et al., KDD 2007) and in practice close to exact. Every member beyond the first
  costs `min_gain` of value, so a member with a negligible gate is not run just because the
  budget would allow it.
* **cascade**: adequate experts (gate quality ≥ adequacy × best) in ascending cost; each stage
  runs only if its cost, added to every stage before it, stays within the budget (and latencies,
  which add up, within max_latency_ms), so escalating never passes the budget.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

EXACT_LIMIT = 20_000  # subsets enumerated before switching to the greedy approximation


@dataclass(frozen=True, slots=True)
class Option:
    """A candidate as the planner sees it."""

    name: str
    quality: float  # gate: predicted chance of a good answer, in [0, 1]
    cost: float
    latency_ms: float = 0.0
    energy_j: float | None = None


@dataclass(frozen=True, slots=True)
class Budget:
    max_cost: float | None = None
    max_latency_ms: float | None = None
    max_energy_j: float | None = None
    max_experts: int = 3
    quality_weight: float = 1.0
    min_gain: float = 0.01  # value a member must add to be worth running (per member)


@dataclass(frozen=True, slots=True)
class Plan:
    """What will run. `experts` is the run order (cascade) or the members (ensemble)."""

    strategy: str
    experts: tuple[str, ...]
    weights: tuple[float, ...]  # gate weights of the members, normalised to sum 1
    est_cost: float  # worst case: every member / stage runs
    est_latency_ms: float  # ensemble: the slowest member; cascade: the sum of the stages
    est_energy_j: float | None
    value: float
    exact: bool = True


def coverage(qs: Sequence[float]) -> float:
    """1 − Π(1 − q): the chance that at least one of the members is right."""
    miss = 1.0
    for q in qs:
        miss *= 1.0 - min(max(q, 0.0), 1.0)
    return 1.0 - miss


def fits(members: Sequence[Option], budget: Budget, *, sequential: bool = False) -> bool:
    """Whether running all `members` stays within the budget (sums taken in their order: pass
    them in the order the plan lists them, or a sum at the ceiling can pass it by one ulp)."""
    if not members or len(members) > budget.max_experts:
        return False
    cost = sum(m.cost for m in members)
    if budget.max_cost is not None and cost > budget.max_cost * (1 + 1e-9):
        return False
    if budget.max_latency_ms is not None:
        lats = [m.latency_ms for m in members]
        latency = sum(lats) if sequential else max(lats)
        if any(x <= 0 for x in lats) or latency > budget.max_latency_ms:
            return False
    if budget.max_energy_j is not None:
        es = [m.energy_j for m in members]
        if any(e is None for e in es) or sum(e or 0.0 for e in es) > budget.max_energy_j:
            return False
    return True


def _value(members: Sequence[Option], budget: Budget, cost_ref: float) -> float:
    w = budget.quality_weight
    cost = sum(m.cost for m in members)
    cover = coverage([m.quality for m in members])
    return w * cover - (1 - w) * cost / cost_ref - budget.min_gain * (len(members) - 1)


def _plan(strategy: str, members: Sequence[Option], value: float, exact: bool) -> Plan:
    total = sum(max(m.quality, 0.0) for m in members)
    weights = tuple(
        (max(m.quality, 0.0) / total) if total > 0 else 1.0 / len(members) for m in members
    )
    energies = [m.energy_j for m in members]
    lats = [m.latency_ms for m in members]
    return Plan(
        strategy=strategy,
        experts=tuple(m.name for m in members),
        weights=weights,
        est_cost=sum(m.cost for m in members),
        est_latency_ms=sum(lats) if strategy == "cascade" else max(lats),
        est_energy_j=None if any(e is None for e in energies) else sum(e or 0.0 for e in energies),
        value=value,
        exact=exact,
    )


def plan_ensemble(options: Sequence[Option], budget: Budget) -> Plan | None:
    """The best member subset under `budget` (None if not even one option fits)."""
    opts = [o for o in options if fits([o], budget)]
    if not opts:
        return None
    cost_ref = max(max(o.cost for o in opts), 1e-12)
    k = min(budget.max_experts, len(opts))
    n_subsets = sum(math.comb(len(opts), r) for r in range(1, k + 1))
    if n_subsets <= EXACT_LIMIT:
        best: tuple[float, list[Option]] | None = None
        for r in range(1, k + 1):
            for combo in itertools.combinations(opts, r):
                members = _ranked(combo)
                if fits(members, budget):
                    v = _value(members, budget, cost_ref)
                    if best is None or v > best[0] + 1e-12:
                        best = (v, members)
        assert best is not None  # every single option fits
        return _plan("ensemble", best[1], best[0], exact=True)
    chosen = _greedy(opts, budget, cost_ref)
    single = max(opts, key=lambda o: _value([o], budget, cost_ref))
    if _value([single], budget, cost_ref) > _value(chosen, budget, cost_ref):
        chosen = [single]
    members = _ranked(chosen)
    return _plan("ensemble", members, _value(members, budget, cost_ref), exact=False)


def _ranked(members: Sequence[Option]) -> list[Option]:
    """Best gate first: the order an ensemble lists its members in (and sums their budget in)."""
    return sorted(members, key=lambda o: -o.quality)


def _greedy(opts: Sequence[Option], budget: Budget, cost_ref: float) -> list[Option]:
    chosen: list[Option] = []
    left = list(opts)
    while left and len(chosen) < budget.max_experts:
        base = _value(chosen, budget, cost_ref) if chosen else 0.0
        best: tuple[float, Option] | None = None
        for o in left:
            if not fits(_ranked([*chosen, o]), budget):
                continue
            gain = _value([*chosen, o], budget, cost_ref) - base
            ratio = gain / max(o.cost, 1e-12)
            if gain > 0 and (best is None or ratio > best[0]):
                best = (ratio, o)
        if best is None:
            break
        chosen.append(best[1])
        left.remove(best[1])
    return chosen or [max(opts, key=lambda o: o.quality)]


def plan_cascade(
    options: Sequence[Option], budget: Budget, *, adequacy: float = 0.5
) -> Plan | None:
    """Stages in ascending cost, each affordable on top of all before it (None if none fits)."""
    opts = [o for o in options if fits([o], budget)]
    if not opts:
        return None
    top = max(o.quality for o in opts)
    adequate = sorted(
        (o for o in opts if o.quality >= adequacy * top), key=lambda o: (o.cost, -o.quality)
    )
    best = max(adequate, key=lambda o: (o.quality, -o.cost))
    stages: list[Option] = []
    # the cheapest adequate expert first and the best one last (when both fit), then fill in
    for o in [adequate[0], best, *adequate[1:]]:
        if o in stages or len(stages) >= budget.max_experts:
            continue
        trial = sorted([*stages, o], key=lambda x: (x.cost, -x.quality))
        if fits(trial, budget, sequential=True):
            stages = trial
    return _plan("cascade", stages, coverage([s.quality for s in stages]), exact=True)
