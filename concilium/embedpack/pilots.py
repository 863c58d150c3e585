"""Pilot selection: the training queries that best cover a domain (spherical k-means medoids).

RouterRetriever routes by the similarity of a query to each expert's few pilot examples; pilots
spread over the domain represent it better than a random handful. Only training queries are
candidates, and the choice is deterministic given the seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["medoid_pilots"]


def medoid_pilots(texts: Sequence[str], vecs: np.ndarray, k: int, *, seed: int) -> list[str]:
    """`k` texts nearest the centroids of a k-means on `vecs` [N, D] (rows L2-normalised)."""
    n = len(texts)
    if n <= k:
        return list(texts)
    rng = np.random.default_rng(seed)
    centroids = vecs[rng.choice(n, size=k, replace=False)]  # [k, D]
    for _ in range(25):
        assign = np.argmax(vecs @ centroids.T, axis=1)  # [N]
        for c in range(k):
            members = vecs[assign == c]
            if len(members):
                m = members.mean(axis=0)
                centroids[c] = m / max(float(np.linalg.norm(m)), 1e-9)
    chosen: list[int] = []
    sims = vecs @ centroids.T  # [N, k]
    for c in range(k):
        for i in np.argsort(-sims[:, c], kind="stable"):
            if int(i) not in chosen:
                chosen.append(int(i))
                break
    return [texts[i] for i in sorted(chosen)]
