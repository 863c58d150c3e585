"""Retrieval metrics: nDCG@k (trec_eval's linear gain, as BEIR reports it) and dense ranking."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["dcg", "ndcg_at_k", "top_k"]


def dcg(gains: Sequence[float]) -> float:
    """Σ gain_i / log2(i + 2) over ranks i = 0, 1, ..."""
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains))


def ndcg_at_k(ranked: Sequence[str], relevant: Mapping[str, float], k: int = 10) -> float:
    """nDCG@k of one ranking; `relevant` maps document id -> graded relevance (> 0)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ideal = dcg(sorted((g for g in relevant.values() if g > 0), reverse=True)[:k])
    if ideal == 0:
        return 0.0
    return dcg([relevant.get(d, 0.0) for d in ranked[:k]]) / ideal


def top_k(queries: np.ndarray, docs: np.ndarray, k: int) -> np.ndarray:
    """Indices [Q, k] of each query's k most similar documents (inner product, best first).

    queries [Q, D] and docs [N, D] are L2-normalised, so the inner product is the cosine. Ties
    are broken by document index, so the ranking is deterministic.
    """
    sims = queries @ docs.T  # [Q, N]
    k = min(k, docs.shape[0])
    order = np.argsort(-sims, axis=1, kind="stable")
    return order[:, :k]
