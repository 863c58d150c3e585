"""Batch the router's query encoding across concurrent requests.

Under load most of a routed request's CPU time is the sentence-transformer forward over its query.
Requests that arrive within `window_ms` of each other are encoded in one forward (a
`MicroBatcher`, in a worker thread): the per-query cost falls with the batch.
"""

from __future__ import annotations

import numpy as np

from concilium.experts.batching import MicroBatcher
from concilium.registry.index import TextEncoder


class BatchingEncoder:
    """`await encode(text)` -> [dim] float32; concurrent calls share one encoder forward."""

    def __init__(self, encoder: TextEncoder, max_batch: int = 64, window_ms: float = 1.0) -> None:
        self.encoder = encoder
        self._batcher: MicroBatcher[str, np.ndarray] = MicroBatcher(
            self._encode, max_batch, window_ms / 1000
        )

    def _encode(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(v, dtype=np.float32) for v in self.encoder.encode(texts)]

    async def encode(self, text: str) -> np.ndarray:
        return await self._batcher.submit(text)
