"""Late interaction for the retriever: ColBERT's MaxSim between a query's and a pilot's tokens.

A pilot's similarity to the query is the mean, over the query's token embeddings [m, dim], of
each one's best cosine among the pilot's token embeddings. `TokenBank` holds every expert's pilot
tokens in one array, so a query costs one matmul and one segmented max for all pilots at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from concilium.routers.base import Candidate, Query


def late_interaction(q_tokens: np.ndarray, c: Candidate) -> np.ndarray | None:
    """MaxSim per pilot [P] of one expert (the reference `TokenBank` is checked against).
    None for an expert without pilots or pilot tokens."""
    if not len(c.pilots) or c.pilot_tokens is None or c.pilot_token_offsets is None:
        return None
    sims = c.pilot_tokens @ q_tokens.T  # [sum m_p, m]
    best = np.maximum.reduceat(sims, c.pilot_token_offsets[:-1], axis=0)  # [P, m]
    return best.mean(axis=1)


def has_tokens(query: Query, candidates: Sequence[Candidate]) -> bool:
    """Late interaction applies only when the query and every expert with pilots have tokens."""
    if query.tokens is None or not len(query.tokens):
        return False
    return all(
        c.pilot_tokens is not None
        and c.pilot_token_offsets is not None
        and len(c.pilot_token_offsets) == len(c.pilots) + 1  # offsets checked at load
        and c.pilot_tokens.shape[-1] == query.tokens.shape[-1]
        for c in candidates
        if len(c.pilots)
    )


@dataclass(frozen=True, slots=True)
class TokenBank:
    """Every expert's pilot tokens in one array [N, dim]; pilot p's rows start at `starts[p]`;
    expert e owns pilots `bounds[e]:bounds[e+1]`."""

    experts: dict[str, int]
    tokens: np.ndarray
    starts: np.ndarray
    bounds: np.ndarray
    sources: tuple[int, ...]  # id() of each expert's own pilot_tokens array (staleness check)

    @classmethod
    def of(cls, candidates: Sequence[Candidate]) -> TokenBank:
        names, arrays, starts, bounds, rows = [], [], [], [0], 0
        for c in candidates:
            if not len(c.pilots) or c.pilot_tokens is None or c.pilot_token_offsets is None:
                continue
            names.append(c.name)
            arrays.append(c.pilot_tokens)
            starts.append(c.pilot_token_offsets[:-1] + rows)
            rows += len(c.pilot_tokens)
            bounds.append(bounds[-1] + len(c.pilot_token_offsets) - 1)
        return cls(
            experts={n: i for i, n in enumerate(names)},
            tokens=np.concatenate(arrays) if arrays else np.zeros((0, 1), np.float32),
            starts=np.concatenate(starts) if starts else np.zeros(0, np.int64),
            bounds=np.asarray(bounds, dtype=np.int64),
            sources=tuple(id(a) for a in arrays),
        )

    def covers(self, candidates: Sequence[Candidate]) -> bool:
        """Whether every candidate's pilot tokens are the ones this bank was built from."""
        for c in candidates:
            if len(c.pilots) and c.pilot_tokens is not None:
                i = self.experts.get(c.name)
                if i is None or self.sources[i] != id(c.pilot_tokens):
                    return False
        return True

    def maxsim(self, q_tokens: np.ndarray) -> dict[str, np.ndarray]:
        """Per expert, the MaxSim of each of its pilots [P] with the query's tokens [m, dim]."""
        if not len(self.starts):
            return {}
        sims = self.tokens @ q_tokens.T  # [N, m]
        per_pilot = np.maximum.reduceat(sims, self.starts, axis=0).mean(axis=1)  # [P_all]
        b = self.bounds
        return {n: per_pilot[b[i] : b[i + 1]] for n, i in self.experts.items()}
