"""Every router in the table honours the QueryRouter contract (parametrized over ROUTER_CLS)."""

from __future__ import annotations

import numpy as np
import pytest

from concilium.errors import ConfigError
from concilium.routers.base import Candidate, Query, RouteDecision
from concilium.routers.query import ROUTER_CLS, build_router
from tests.conftest import HashEncoder

ENC = HashEncoder()
SAMPLE_CONFIG = {
    "retriever": {"kind": "retriever"},
    "category": {"kind": "category"},
    "random": {"kind": "random", "seed": 0},
    "fixed": {"kind": "fixed", "expert": "math"},
    "predictive": {"kind": "predictive"},
}
PILOTS = {
    "reverse": ["reverse the word", "flip the letters backwards", "spell it backwards"],
    "math": ["add these two numbers", "what is the sum", "compute the total"],
    "upper": ["make it upper case", "capitalise every letter", "shout it in capitals"],
}
DESCRIPTIONS = {
    "reverse": "reverses a word: the letters backwards",
    "math": "adds numbers and computes their sum",
    "upper": "writes text in upper case capitals",
}


def candidates() -> list[Candidate]:
    return [
        Candidate(
            name=n,
            kind="lora",
            task="generate",
            pilots=ENC.encode(p),
            description=ENC.encode([DESCRIPTIONS[n]])[0],
            categories=(f"cat-{n}",),
        )
        for n, p in PILOTS.items()
    ]


def test_table_covers_every_sample_config() -> None:
    assert set(SAMPLE_CONFIG) == set(ROUTER_CLS)


@pytest.mark.parametrize("kind", sorted(ROUTER_CLS))
def test_router_contract(kind: str) -> None:
    router = build_router(SAMPLE_CONFIG[kind])
    assert router.kind == kind
    cands = candidates()
    router.prepare(cands)
    q = Query("please add the numbers 3 and 4", ENC.encode(["please add the numbers 3 and 4"])[0])
    d = router.route(q, cands)
    assert isinstance(d, RouteDecision)
    assert d.router == kind and d.experts and set(d.experts) <= {c.name for c in cands}
    assert set(d.scores) == {c.name for c in cands}
    assert len(d.weights) == len(d.experts) and abs(sum(d.weights) - 1) < 1e-6
    assert 0 <= d.confidence <= 1 and d.reason and len(d.decision_id) == 32
    # a subset of candidates (the objective filtered some): the choice stays within it
    sub = [c for c in cands if c.name != "reverse"]
    assert router.route(q, sub).expert in {"math", "upper"}


@pytest.mark.parametrize("kind", ["retriever", "category"])
def test_similarity_routers_pick_the_matching_expert(kind: str) -> None:
    router = build_router(SAMPLE_CONFIG[kind])
    cands = candidates()
    router.prepare(cands)
    for text, want in [
        ("flip this word backwards", "reverse"),
        ("what is the sum of 2 and 9", "math"),
    ]:
        assert router.route(Query(text, ENC.encode([text])[0]), cands).expert == want


def test_unknown_router_kind_lists_valid_kinds() -> None:
    with pytest.raises(ConfigError, match="retriever"):
        build_router({"kind": "retreiver"})


def test_retriever_aggregations_differ_where_they_should() -> None:
    cands = candidates()
    q = Query("t", np.asarray(cands[0].pilots[0]))
    for agg in ("softmax", "mean", "max", "topk"):
        d = build_router({"kind": "retriever", "aggregate": agg}).route(q, cands)
        assert d.expert == "reverse"
    cfg = {"kind": "retriever", "aggregate": "max", "description_weight": 0}
    dmax = build_router(cfg).route(q, cands)
    assert dmax.scores["reverse"] == pytest.approx(1.0, abs=1e-5)


def test_retriever_softmax_aggregate_lies_between_mean_and_max() -> None:
    cands = candidates()
    q = Query("t", np.asarray(cands[0].pilots[0]))

    def score(agg: str, **kw: float) -> float:
        cfg = {"kind": "retriever", "aggregate": agg, "description_weight": 0, **kw}
        return build_router(cfg).route(q, cands).scores["reverse"]

    lo, hi = score("mean"), score("max")
    assert lo < hi
    assert lo < score("softmax", pilot_temperature=0.1) < hi
    assert score("softmax", pilot_temperature=1e-4) == pytest.approx(hi, abs=1e-3)
    assert score("softmax", pilot_temperature=1e4) == pytest.approx(lo, abs=1e-3)


def test_retriever_description_weight_adds_the_description_similarity() -> None:
    cands = candidates()
    q = Query("t", np.asarray(cands[1].description))  # exactly math's description
    plain = build_router({"kind": "retriever", "description_weight": 0}).route(q, cands)
    mixed = build_router({"kind": "retriever", "description_weight": 0.5}).route(q, cands)
    assert mixed.scores["math"] == pytest.approx(plain.scores["math"] + 0.5, abs=1e-5)
    assert mixed.expert == "math"
