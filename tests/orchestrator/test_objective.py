"""The objective filter: hard constraints, and errors that name the binding field."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from concilium.errors import InvalidInput, ObjectiveUnsatisfiable
from concilium.orchestrator.objective import Objective
from concilium.orchestrator.schemas import RoutingOptions
from concilium.routers.base import Candidate


def cand(name: str, cost: float, latency: float) -> Candidate:
    z = np.zeros((1, 4), dtype=np.float32)
    return Candidate(
        name=name,
        kind="remote",
        task="generate",
        pilots=z,
        description=z[0],
        est_cost=cost,
        est_latency_ms=latency,
    )


POOL = [cand("cheap", 0.001, 900.0), cand("fast", 0.05, 50.0), cand("unknown", 0.002, 0.0)]
NAMES = {c.name for c in POOL}


def names(cs: list[Candidate]) -> list[str]:
    return [c.name for c in cs]


def test_no_objective_keeps_everything() -> None:
    assert names(Objective().filter(POOL, NAMES)) == ["cheap", "fast", "unknown"]


def test_cost_and_latency_ceilings() -> None:
    assert names(Objective(max_cost=0.01).filter(POOL, NAMES)) == ["cheap", "unknown"]
    # unknown latency cannot be promised under a latency ceiling
    assert names(Objective(max_latency_ms=1000).filter(POOL, NAMES)) == ["cheap", "fast"]


@pytest.mark.parametrize(
    ("objective", "field"),
    [
        (Objective(max_cost=0.0001), "routing.max_cost"),
        (Objective(max_latency_ms=10), "routing.max_latency_ms"),
        (Objective(max_cost=0.01, max_latency_ms=100), "routing.max_latency_ms"),
        (
            Objective(allowed=frozenset({"fast"}), excluded=frozenset({"fast"})),
            "routing.excluded_experts",
        ),
    ],
)
def test_unsatisfiable_names_the_binding_field(objective: Objective, field: str) -> None:
    with pytest.raises(ObjectiveUnsatisfiable) as e:
        objective.filter(POOL, NAMES)
    assert e.value.field == field and field in str(e.value)


def test_unknown_expert_names_are_invalid_input() -> None:
    with pytest.raises(InvalidInput, match=r"routing.allowed_experts.*nope"):
        Objective(allowed=frozenset({"nope"})).filter(POOL, NAMES)


def test_from_options() -> None:
    o = Objective.from_options(
        RoutingOptions(max_cost=1, allowed_experts=["a"], excluded_experts=["b"])
    )
    assert o.max_cost == 1 and o.allowed == {"a"} and o.excluded == {"b"}


@settings(max_examples=200, deadline=None)
@given(
    costs=st.lists(st.floats(0, 1), min_size=1, max_size=8),
    lats=st.lists(st.floats(0, 2000), min_size=8, max_size=8),
    max_cost=st.none() | st.floats(0, 1),
    max_lat=st.none() | st.floats(1, 2000),
    allowed_mask=st.lists(st.booleans(), min_size=8, max_size=8),
)
def test_property_filter_never_violates(
    costs: list[float],
    lats: list[float],
    max_cost: float | None,
    max_lat: float | None,
    allowed_mask: list[bool],
) -> None:
    pool = [cand(f"e{i}", c, lats[i]) for i, c in enumerate(costs)]
    allowed = frozenset(c.name for c, ok in zip(pool, allowed_mask, strict=False) if ok)
    obj = Objective(max_cost=max_cost, max_latency_ms=max_lat, allowed=allowed)
    try:
        kept = obj.filter(pool, {c.name for c in pool})
    except ObjectiveUnsatisfiable as e:
        assert e.field in {"routing.max_cost", "routing.max_latency_ms", "routing.allowed_experts"}
        return
    assert kept
    for c in kept:
        assert c.name in allowed
        assert max_cost is None or c.est_cost <= max_cost
        assert max_lat is None or 0 < c.est_latency_ms <= max_lat
