"""nDCG@10 and dense top-k on hand-worked examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from concilium.embedpack.metrics import ndcg_at_k, top_k


def test_ndcg_single_relevant_document() -> None:
    assert ndcg_at_k(["a", "b", "c"], {"a": 1.0}) == 1.0
    assert ndcg_at_k(["b", "a", "c"], {"a": 1.0}) == pytest.approx(1 / math.log2(3))
    assert ndcg_at_k([str(i) for i in range(20)], {"15": 1.0}) == 0.0  # below the cut-off
    assert ndcg_at_k(["x"], {}) == 0.0


def test_ndcg_graded_hand_example() -> None:
    # ranking d3 d1 d2 with gains 1, 3, 2: DCG = 1/1 + 3/log2(3) + 2/2; ideal = 3 + 2/log2(3) + 1/2
    got = ndcg_at_k(["d3", "d1", "d2"], {"d1": 3, "d2": 2, "d3": 1})
    want = (1 + 3 / math.log2(3) + 1) / (3 + 2 / math.log2(3) + 0.5)
    assert got == pytest.approx(want)
    assert got == pytest.approx(0.8175, abs=1e-4)
    with pytest.raises(ValueError, match="k must be"):
        ndcg_at_k(["a"], {"a": 1}, k=0)


def test_top_k_best_first_ties_by_index() -> None:
    docs = np.array([[1, 0], [0, 1], [1, 0], [0.6, 0.8]], dtype=np.float32)
    q = np.array([[1, 0], [0, 1]], dtype=np.float32)
    assert top_k(q, docs, 3).tolist() == [[0, 2, 3], [1, 3, 0]]
    assert top_k(q, docs, 10).shape == (2, 4)


def test_ratio_ci_is_paired() -> None:
    from concilium.embedpack.evaluate import ratio_ci

    b = np.linspace(0.2, 1.0, 50)
    assert ratio_ci(b, b) == pytest.approx((1.0, 1.0, 1.0))
    r, lo, hi = ratio_ci(2 * b, b)
    assert r == pytest.approx(2.0) and lo == pytest.approx(2.0) and hi == pytest.approx(2.0)
    noisy = b + np.random.default_rng(0).normal(0, 0.05, 50)
    r, lo, hi = ratio_ci(noisy, b)
    assert lo < r < hi and lo < 1.0 < hi
