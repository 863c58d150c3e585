"""Predictive router start-up: warm() learns off the request path; without it the first request
learns inline."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from concilium.outcomes.store import Labelled
from concilium.routers.base import Candidate, Query
from concilium.routers.query.predictive import PredictiveRouter

DIM = 8


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


class GatedSource:
    """Outcomes where expert 'b' is right on every query near axis 0; labelled() waits for
    `gate`, as a large store being read would."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.reads = 0
        rng = np.random.default_rng(0)
        near = unit(np.eye(DIM)[0] + 0.1 * rng.normal(size=(20, DIM)))
        far = unit(np.eye(DIM)[1] + 0.1 * rng.normal(size=(20, DIM)))
        emb = np.concatenate([near, far, near, far])
        experts = ["a"] * 40 + ["b"] * 40
        quality = np.concatenate([np.zeros(20), np.ones(20), np.ones(20), np.zeros(20)])
        self.rows = Labelled(emb, experts, quality)

    def version(self) -> int:
        return 1

    def labelled(self, dim: int) -> Labelled:
        assert self.gate.wait(10), "the test never opened the gate"
        self.reads += 1
        return self.rows


def candidates() -> list[Candidate]:
    pilots = unit(np.eye(DIM)[None, 0])  # both experts' pilots look alike: 'a' wins ties
    desc = unit(np.eye(DIM)[0])
    return [
        Candidate("a", "remote", "generate", pilots, desc, est_cost=1.0),
        Candidate("b", "remote", "generate", pilots, desc, est_cost=1.0),
    ]


def route(router: PredictiveRouter) -> str:
    query = Query("q", unit(np.eye(DIM)[0] + 0.05 * np.eye(DIM)[2]))
    return router.route(query, candidates()).experts[0]


def test_warm_learns_in_the_background_while_requests_use_the_pilots() -> None:
    src = GatedSource()
    router = PredictiveRouter()
    router.attach(src)
    thread = router.warm(DIM)
    assert thread is not None
    answered: list[str] = []
    t = threading.Thread(target=lambda: answered.append(route(router)))
    t.start()
    t.join(5)
    assert answered == ["a"] and src.reads == 0  # decided by pilots, not waiting on the rows
    src.gate.set()
    thread.join(10)
    assert route(router) == "b" and src.reads == 1  # the outcomes say b; loaded once


def test_without_warm_the_first_request_learns_inline() -> None:
    src = GatedSource()
    src.gate.set()
    router = PredictiveRouter()
    router.attach(src)
    assert route(router) == "b" and src.reads == 1
    assert PredictiveRouter().warm(DIM) is None  # nothing attached: nothing to learn


def test_a_failed_warm_up_is_logged_and_the_next_request_learns_inline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(GatedSource):
        def labelled(self, dim: int) -> Labelled:
            if self.reads == 0:
                self.reads += 1
                raise OSError("disk I/O error")
            return super().labelled(dim)

    src = Broken()
    src.gate.set()
    router = PredictiveRouter()
    router.attach(src)
    thread = router.warm(DIM)
    assert thread is not None
    thread.join(10)
    assert "warm-up failed" in caplog.text
    assert route(router) == "b"  # no thread died; the request loaded the rows itself


def test_heads_are_fitted_only_when_the_blend_uses_them() -> None:
    from concilium.routers.query.predictive import PredictiveConfig

    src = GatedSource()
    src.gate.set()
    query = Query("q", unit(np.eye(DIM)[0] + 0.05 * np.eye(DIM)[2]))
    q_hat = {}
    for blend in (0.0, 0.5, 1.0):
        router = PredictiveRouter(PredictiveConfig(pilot_blend=blend, prior_strength=1e6))
        router.attach(src)
        q_hat[blend] = router.predict(query, candidates())  # the prior dominates the kNN
        assert bool(router._heads) == (blend < 1)
    # pilots alike: a prior of 1 for both; the heads know a fails near axis 0 and b succeeds
    np.testing.assert_allclose(q_hat[1.0], [1.0, 1.0], atol=1e-3)
    assert q_hat[0.0][0] < 0.2 < 0.8 < q_hat[0.0][1]
    np.testing.assert_allclose(q_hat[0.5], (q_hat[0.0] + q_hat[1.0]) / 2, atol=1e-3)
