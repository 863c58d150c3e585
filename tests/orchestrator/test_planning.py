"""Budgeted plans: property tests over random catalogues and budgets, and the fusion rule."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from concilium.orchestrator import planning
from concilium.orchestrator.fusion import Vote, fuse
from concilium.orchestrator.planning import Budget, Option, fits, plan_cascade, plan_ensemble

options = st.lists(
    st.builds(
        Option,
        name=st.text("abcdefgh", min_size=1, max_size=4),
        quality=st.floats(0, 1),
        cost=st.floats(0, 10),
        latency_ms=st.floats(0, 2000),
        energy_j=st.none() | st.floats(0, 50),
    ),
    min_size=1,
    max_size=7,
    unique_by=lambda o: o.name,
)
budgets = st.builds(
    Budget,
    max_cost=st.none() | st.floats(0, 20),
    max_latency_ms=st.none() | st.floats(1, 3000),
    max_energy_j=st.none() | st.floats(0, 80),
    max_experts=st.integers(1, 4),
    quality_weight=st.floats(0, 1),
)


def _respects(members: list[Option], budget: Budget, *, sequential: bool) -> None:
    assert 1 <= len(members) <= budget.max_experts
    cost = sum(m.cost for m in members)
    if budget.max_cost is not None:
        assert cost <= budget.max_cost * (1 + 1e-9)
    if budget.max_latency_ms is not None:
        lats = [m.latency_ms for m in members]
        assert all(x > 0 for x in lats)
        assert (sum(lats) if sequential else max(lats)) <= budget.max_latency_ms
    if budget.max_energy_j is not None:
        assert all(m.energy_j is not None for m in members)
        assert sum(m.energy_j or 0 for m in members) <= budget.max_energy_j


@settings(max_examples=300, deadline=None)
@given(options, budgets)
def test_ensemble_never_violates_the_budget_and_is_exact(opts: list[Option], b: Budget) -> None:
    plan = plan_ensemble(opts, b)
    by_name = {o.name: o for o in opts}
    if plan is None:
        assert not any(fits([o], b) for o in opts)
        return
    members = [by_name[n] for n in plan.experts]
    _respects(members, b, sequential=False)
    assert plan.exact and sum(plan.weights) == pytest.approx(1.0)
    cost_ref = max(max(o.cost for o in opts if fits([o], b)), 1e-12)
    best = max(
        planning._value(c, b, cost_ref)
        for r in range(1, b.max_experts + 1)
        for c in itertools.combinations(opts, r)
        if fits(c, b)
    )
    assert plan.value == pytest.approx(best, abs=1e-9)


@settings(max_examples=200, deadline=None)
@given(options, budgets)
def test_greedy_approximation_never_violates_the_budget(opts: list[Option], b: Budget) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(planning, "EXACT_LIMIT", 0)
        plan = plan_ensemble(opts, b)
    if plan is not None:
        assert not plan.exact
        by_name = {o.name: o for o in opts}
        _respects([by_name[n] for n in plan.experts], b, sequential=False)


@settings(max_examples=300, deadline=None)
@given(options, budgets, st.floats(0, 1))
def test_cascade_stages_fit_the_budget_together(
    opts: list[Option], b: Budget, adequacy: float
) -> None:
    plan = plan_cascade(opts, b, adequacy=adequacy)
    if plan is None:
        assert not any(fits([o], b) for o in opts)
        return
    by_name = {o.name: o for o in opts}
    stages = [by_name[n] for n in plan.experts]
    _respects(stages, b, sequential=True)  # escalating through every stage stays in budget
    assert [s.cost for s in stages] == sorted(s.cost for s in stages)


def test_ensemble_prefers_two_cheap_experts_over_one_dear_one_when_they_cover_more() -> None:
    opts = [Option("big", 0.8, 10.0, 100), Option("a", 0.6, 2.0, 50), Option("b", 0.6, 2.0, 50)]
    plan = plan_ensemble(opts, Budget(max_cost=5.0, max_experts=3))
    assert plan is not None and set(plan.experts) == {"a", "b"}  # 0.84 coverage vs 0.8
    plan = plan_ensemble(opts, Budget(max_cost=20.0, max_experts=3))
    assert plan is not None and set(plan.experts) == {"big", "a", "b"}


def test_ensemble_does_not_pay_for_a_negligible_member() -> None:
    opts = [Option("a", 0.99, 1.0, 10), Option("b", 0.001, 1.0, 10)]
    plan = plan_ensemble(opts, Budget(max_experts=2))
    assert plan is not None and plan.experts == ("a",)


def test_cascade_starts_cheap_and_ends_with_the_best_affordable() -> None:
    opts = [
        Option("dear", 0.9, 5.0, 100),
        Option("mid", 0.7, 2.0, 100),
        Option("cheap", 0.6, 0.5, 100),
        Option("useless", 0.1, 0.1, 100),
    ]
    plan = plan_cascade(opts, Budget(max_experts=3), adequacy=0.5)
    assert plan is not None and plan.experts == ("cheap", "mid", "dear")
    plan = plan_cascade(opts, Budget(max_cost=5.6, max_experts=3), adequacy=0.5)
    assert plan is not None and plan.experts == ("cheap", "dear")  # mid would break the budget
    plan = plan_cascade(opts, Budget(max_latency_ms=250, max_experts=3), adequacy=0.5)
    assert plan is not None and len(plan.experts) == 2  # stage latencies add up


def test_fusion_weighted_vote_and_selection() -> None:
    agree = fuse([Vote("big", "X", 0.5), Vote("a", "Y", 0.3), Vote("b", " Y ", 0.3)])
    assert agree.mode == "vote" and agree.winner in (1, 2)
    assert agree.support == pytest.approx(0.6 / 1.1)
    differ = fuse([Vote("a", "X", 0.2), Vote("b", "Y", 0.5), Vote("c", "Z", 0.3)])
    assert differ.mode == "select" and differ.winner == 1
    # confidence scales the vote: a sure low-gate member beats an unsure high-gate one
    conf = fuse([Vote("a", "X", 0.6, mean_logprob=-3.0), Vote("b", "Y", 0.4, mean_logprob=-0.01)])
    assert conf.winner == 1
    with pytest.raises(ValueError):
        fuse([])
