"""CoE routing: category table, generalist fallback on low confidence."""

from __future__ import annotations

import numpy as np

from concilium.routers.base import Candidate, Query
from concilium.routers.query import build_router
from tests.conftest import HashEncoder

ENC = HashEncoder()


def _cand(name: str, pilots: list[str], cats: tuple[str, ...]) -> Candidate:
    return Candidate(
        name=name,
        kind="lora",
        task="generate",
        pilots=ENC.encode(pilots),
        description=ENC.encode([name])[0],
        categories=cats,
    )


CANDS = [
    _cand("adder", ["add these numbers", "sum of two numbers"], ("arithmetic",)),
    _cand("adder-big", ["add large numbers please", "sum of big numbers"], ("arithmetic",)),
    _cand("rev", ["reverse the word", "backwards spelling"], ("strings",)),
    _cand("general", ["anything at all"], ()),
]


def test_category_then_table() -> None:
    r = build_router({"kind": "category", "table": {"arithmetic": "adder-big"}})
    d = r.route(Query("add these numbers", ENC.encode(["add these numbers"])[0]), CANDS)
    assert d.expert == "adder-big" and d.extra["category"] == "arithmetic"


def test_low_confidence_goes_to_the_generalist() -> None:
    r = build_router({"kind": "category", "generalist": "general", "threshold": 0.99})
    q = Query("zebra quantum", ENC.encode(["zebra quantum"])[0])
    d = r.route(q, CANDS)
    assert d.expert == "general" and "generalist" in d.reason


def test_generalist_outside_candidates_is_not_used() -> None:
    r = build_router({"kind": "category", "generalist": "general", "threshold": 0.99})
    q = Query("zebra quantum", np.asarray(ENC.encode(["reverse the word"])[0]))
    d = r.route(q, CANDS[:3])
    # the query embeds as one of rev's pilots: its category and then rev, not the first candidate
    assert d.expert == "rev" and d.experts == ("rev",)
    assert d.extra["category"] == "strings" and "generalist" not in d.reason
