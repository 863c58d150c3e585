"""Batch the router's query encoding across concurrent requests.

Under load most of a routed request's CPU time is the sentence-transformer forward over its query.
Requests that arrive within `window_ms` of each other are encoded in one forward (a
`MicroBatcher`, in a worker thread): the per-query cost falls with the batch.
"""

from __future__ import annotations

import numpy as np

from concilium.experts.batching import MicroBatcher
from concilium.registry.index import TextEncoder, encode_texts

Encoded = tuple[np.ndarray, np.ndarray | None]  # ([dim] embedding, [m, dim] tokens or None)


def encode_query(encoder: TextEncoder, texts: list[str]) -> list[Encoded]:
    """Each text's sentence embedding and, when the encoder gives them, its token embeddings
    (the retriever's late interaction), from one forward."""
    vecs, tokens = encode_texts(encoder, texts)
    if tokens is None:
        return [(v, None) for v in vecs]
    return list(zip(vecs, tokens, strict=True))


class BatchingEncoder:
    """`await encode(text)` -> ([dim] float32, tokens); concurrent calls share one forward."""

    def __init__(self, encoder: TextEncoder, max_batch: int = 64, window_ms: float = 1.0) -> None:
        self.encoder = encoder
        self._batcher: MicroBatcher[str, Encoded] = MicroBatcher(
            self._encode, max_batch, window_ms / 1000
        )

    def _encode(self, texts: list[str]) -> list[Encoded]:
        return encode_query(self.encoder, texts)

    async def encode(self, text: str) -> Encoded:
        return await self._batcher.submit(text)
