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


def _usable(c: Candidate, dim: int) -> bool:
    """Whether an expert with pilots has token embeddings of the query's width (offsets are
    checked against the pilots when the registry loads them)."""
    return (
        c.pilot_tokens is not None
        and c.pilot_token_offsets is not None
        and len(c.pilot_token_offsets) == len(c.pilots) + 1
        and c.pilot_tokens.shape[-1] == dim
    )


def bank_for(
    query: Query, candidates: Sequence[Candidate], bank: TokenBank | None
) -> TokenBank | None:
    """The bank to score `query` against, in one pass over the candidates: `bank` when it holds
    exactly their pilot tokens, a new one when it does not (none yet, an expert re-registered or
    new), None when late interaction does not apply (the query or an expert with pilots has no
    token embeddings of the same width)."""
    if query.tokens is None or not len(query.tokens):
        return None
    dim = query.tokens.shape[-1]
    for c in candidates:
        if not len(c.pilots):
            continue
        if not _usable(c, dim):
            return None
        if bank is not None and not bank.holds(c):
            bank = None  # stale: rebuilt below
    return bank if bank is not None else TokenBank.of(candidates)


@dataclass(frozen=True, slots=True)
class TokenBank:
    """Every expert's pilot tokens in one array [N, dim]; pilot p's rows start at `starts[p]`;
    expert e owns pilots `bounds[e]:bounds[e+1]`."""

    experts: dict[str, int]
    tokens: np.ndarray
    starts: np.ndarray
    bounds: np.ndarray
    sources: tuple[np.ndarray, ...]  # each expert's own pilot_tokens array (staleness check)

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
            sources=tuple(arrays),
        )

    def holds(self, c: Candidate) -> bool:
        """Whether this bank was built from `c`'s pilot tokens (the same array object: a
        re-registered expert brings new arrays; held here, so an address is never reused)."""
        i = self.experts.get(c.name)
        return i is not None and self.sources[i] is c.pilot_tokens

    def maxsim(self, q_tokens: np.ndarray) -> dict[str, np.ndarray]:
        """Per expert, the MaxSim of each of its pilots [P] with the query's tokens [m, dim]."""
        if not len(self.starts):
            return {}
        sims = self.tokens @ q_tokens.T  # [N, m]
        per_pilot = np.maximum.reduceat(sims, self.starts, axis=0).mean(axis=1)  # [P_all]
        b = self.bounds
        return {n: per_pilot[b[i] : b[i + 1]] for n, i in self.experts.items()}
