"""The pilot vector index: every expert's pilot-example embeddings in one faiss inner-product index.

The index is *derived* state: it is rebuilt from the registry records (whose embeddings live in the
artifact store), so removing an expert can never leave an orphaned vector behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np


class TextEncoder(Protocol):
    """Anything that turns texts into L2-normalised float32 vectors [N, dim]."""

    @property
    def dim(self) -> int: ...

    @property
    def name(self) -> str: ...

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


@runtime_checkable
class TokenEncoder(Protocol):
    """An encoder that also gives each text's contextual token embeddings (late interaction)."""

    def encode_with_tokens(self, texts: Sequence[str]) -> tuple[np.ndarray, list[np.ndarray]]: ...


def encode_texts(
    encoder: TextEncoder, texts: Sequence[str]
) -> tuple[np.ndarray, list[np.ndarray] | None]:
    """Sentence embeddings [N, dim] float32 and, when the encoder gives them, each text's token
    embeddings [m, dim] (None otherwise), from one forward."""
    if isinstance(encoder, TokenEncoder):
        vecs, tokens = encoder.encode_with_tokens(texts)
        return np.asarray(vecs, dtype=np.float32), tokens
    return np.asarray(encoder.encode(texts), dtype=np.float32), None


def pack_tokens(tokens: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-text token embeddings → one array [sum m, dim] and offsets [N + 1] (int64)."""
    offsets = np.zeros(len(tokens) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(t) for t in tokens])
    flat = np.concatenate(tokens) if tokens else np.zeros((0, 0), dtype=np.float32)
    return flat.astype(np.float32), offsets


class PilotIndex:
    """faiss IndexFlatIP over pilot embeddings, with the owning expert of every row."""

    def __init__(self, dim: int) -> None:
        import faiss

        self.dim = dim
        self._index: Any = faiss.IndexFlatIP(dim)
        self._owner: list[str] = []  # row -> expert name

    def __len__(self) -> int:
        return int(self._index.ntotal)

    @property
    def experts(self) -> set[str]:
        return set(self._owner)

    def add(self, expert: str, vectors: np.ndarray) -> None:
        """Append an expert's pilot vectors [P, dim]."""
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(
                f"pilot vectors for {expert!r} have shape {vectors.shape}, expected (P, {self.dim})"
            )
        self._index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self._owner.extend([expert] * len(vectors))

    def similarities(self, query: np.ndarray, k: int | None = None) -> dict[str, np.ndarray]:
        """Cosine similarity of `query` [dim] to the top-k pilots (k=None: all), per expert."""
        n = len(self)
        if n == 0:
            return {}
        k = n if k is None else min(k, n)
        sims, rows = self._index.search(query.reshape(1, -1).astype(np.float32), k)
        out: dict[str, list[float]] = {}
        for s, r in zip(sims[0], rows[0], strict=True):
            if r >= 0:
                out.setdefault(self._owner[r], []).append(float(s))
        return {e: np.asarray(v, dtype=np.float32) for e, v in out.items()}
