"""Retrieval evaluation of routed embedding experts (BEIR protocol, one corpus per domain).

Every test query is searched within its own domain's held-out corpus, as a BEIR query is within its
own dataset; what routing decides is *which expert embeds* the query and that corpus. For every
(query, expert) pair the nDCG@10 is computed once (a table); routed, single-expert and oracle
scores are read off that table, so all are compared on identical rankings.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from concilium.embedpack.manifest import HeldoutItem
from concilium.embedpack.metrics import ndcg_at_k, top_k

__all__ = ["NdcgTable", "ndcg_table", "ratio_ci", "sample_heldout"]

Embed = Callable[[str, list[str]], np.ndarray]  # (expert, texts) -> [N, D], L2-normalised
K = 10


@dataclass(frozen=True, slots=True)
class NdcgTable:
    """nDCG@10 of every test query under every expert."""

    queries: tuple[HeldoutItem, ...]
    experts: tuple[str, ...]
    scores: np.ndarray  # [Q, E]

    def mean(self, expert: str) -> float:
        return float(self.scores[:, self.experts.index(expert)].mean())

    def routed(self, chosen: Sequence[str]) -> np.ndarray:
        """[Q] nDCG@10 when query i is served by expert chosen[i]."""
        idx = [self.experts.index(c) for c in chosen]
        return self.scores[np.arange(len(idx)), idx]

    def oracle(self) -> np.ndarray:
        """[Q] the best expert's nDCG@10 per query."""
        return self.scores.max(axis=1)


def sample_heldout(
    items: Sequence[HeldoutItem],
    *,
    queries_per_domain: int | None,
    corpus_per_domain: int | None,
    seed: int,
) -> tuple[list[HeldoutItem], list[HeldoutItem]]:
    """(test queries, corpus): per domain, a seeded subset; a query's document is always kept."""
    by_domain: dict[str, list[HeldoutItem]] = defaultdict(list)
    for it in items:
        by_domain[it.domain].append(it)
    queries, corpus = [], []
    for domain in sorted(by_domain):
        rows = list(by_domain[domain])
        random.Random(f"{seed}/{domain}").shuffle(rows)
        docs = rows[: corpus_per_domain or len(rows)]
        queries += docs[: queries_per_domain or len(docs)]
        corpus += docs
    return queries, corpus


def ndcg_table(
    queries: Sequence[HeldoutItem],
    corpus: Sequence[HeldoutItem],
    experts: Sequence[str],
    embed: Embed,
) -> NdcgTable:
    """Embed every domain corpus and every query with every expert; nDCG@10 per pair."""
    scores = np.zeros((len(queries), len(experts)), dtype=np.float64)
    domains = sorted({q.domain for q in queries})
    for e, expert in enumerate(experts):
        for domain in domains:
            docs = [c for c in corpus if c.domain == domain]
            qi = [i for i, q in enumerate(queries) if q.domain == domain]
            dv = embed(expert, [c.document for c in docs])  # [N, D]
            qv = embed(expert, [queries[i].query for i in qi])  # [Q_d, D]
            for row, i in zip(top_k(qv, dv, K), qi, strict=True):
                ranked = [docs[j].id for j in row]
                scores[i, e] = ndcg_at_k(ranked, {queries[i].id: 1.0}, K)
    return NdcgTable(tuple(queries), tuple(experts), scores)


def ratio_ci(
    a: np.ndarray, b: np.ndarray, *, n: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """mean(a) / mean(b) over paired per-query scores, with a 95 % paired-bootstrap interval."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n, len(a)))  # [n, Q] resampled query indices
    ratios = a[idx].mean(axis=1) / b[idx].mean(axis=1)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return float(a.mean() / b.mean()), float(lo), float(hi)
