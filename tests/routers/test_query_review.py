"""Query routers on awkward catalogues: re-registered experts, pilot-less first candidates and a
predictive router whose query width changes."""

from __future__ import annotations

import numpy as np

from concilium.outcomes.store import Labelled
from concilium.routers.base import Candidate, Query
from concilium.routers.query.predictive import PredictiveConfig, PredictiveRouter
from concilium.routers.query.retriever import RetrieverConfig, RetrieverRouter

D = 8


def _unit(*hot: int, dim: int = D) -> np.ndarray:
    v = np.zeros(dim, dtype=np.float32)
    v[list(hot)] = 1.0
    return v / np.linalg.norm(v)


def _cand(name: str, *hot: int, dim: int = D) -> Candidate:
    return Candidate(name, "lora", "generate", np.stack([_unit(*hot, dim=dim)]), _unit(0, dim=dim))


def _retriever() -> RetrieverRouter:
    return RetrieverRouter(RetrieverConfig(description_weight=0.0, similarity="sentence"))


def test_a_re_registered_expert_is_scored_by_its_new_pilots() -> None:
    router = _retriever()
    router.prepare([_cand("a", 1), _cand("b", 2)])
    query = Query("q", _unit(3))
    moved = [_cand("a", 3), _cand("b", 2)]  # 'a' re-registered with pilots like the query
    d = router.route(query, moved)
    assert d.expert == "a" and d.scores["a"] > 0.99
    assert d.scores == _retriever().route(query, moved).scores


def test_a_first_candidate_without_pilots_or_description_does_not_size_the_index() -> None:
    bare = Candidate("bare", "remote", "generate", np.zeros((0, D), np.float32), np.zeros(0))
    cands = [bare, _cand("b", 2)]
    router = _retriever()
    router.prepare(cands)
    d = router.route(Query("q", _unit(2)), cands)
    assert d.expert == "b" and d.scores["bare"] == -1.0


class _Rows:
    """Labelled rows of any width: near axis 0 'b' succeeds and 'a' fails, near axis 1 the
    reverse."""

    def version(self) -> int:
        return 1

    def labelled(self, dim: int) -> Labelled:
        rng = np.random.default_rng(0)
        near, far = (_unit(k, dim=dim) + 0.1 * rng.normal(size=(10, dim)) for k in (0, 1))
        emb = np.concatenate([near, far, near, far])
        emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
        quality = np.concatenate([np.zeros(10), np.ones(10), np.ones(10), np.zeros(10)])
        return Labelled(emb, ["a"] * 20 + ["b"] * 20, quality)


def test_learned_heads_follow_a_change_of_embedding_width() -> None:
    router = PredictiveRouter(PredictiveConfig(pilot_blend=0.0, refresh_s=0.0, head_refit_s=0.0))
    router.attach(_Rows())
    for dim in (D, 2 * D, D):
        cands = [_cand("a", 0, dim=dim), _cand("b", 0, dim=dim)]
        d = router.route(Query("q", _unit(0, dim=dim)), cands)
        assert d.expert == "b", dim


def test_heads_are_refitted_for_the_new_width() -> None:
    import time

    cfg = PredictiveConfig(pilot_blend=0.0, prior_strength=1e6, refresh_s=0.0, head_refit_s=0.0)
    router = PredictiveRouter(cfg)  # the prior outweighs the rows: the heads decide
    router.attach(_Rows())
    for dim in (D, 2 * D):
        cands = [_cand("a", 0, dim=dim), _cand("b", 1, dim=dim)]  # without heads the pilots: a
        query = Query("q", _unit(0, dim=dim))
        router.route(query, cands)  # a refit of the new width may start in the background
        deadline = time.monotonic() + 10
        while router._fitting and time.monotonic() < deadline:
            time.sleep(0.01)
        assert router.route(query, cands).expert == "b", dim
