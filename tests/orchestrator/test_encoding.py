"""Concurrent routed requests share one query-encoder forward."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from concilium.orchestrator.encoding import BatchingEncoder
from tests.conftest import HashEncoder


class Counting(HashEncoder):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def encode(self, texts):  # type: ignore[no-untyped-def]
        self.calls.append(len(texts))
        return super().encode(texts)


def test_concurrent_queries_are_encoded_in_one_forward_with_the_same_vectors() -> None:
    enc = Counting()
    batcher = BatchingEncoder(enc, max_batch=64, window_ms=5)
    texts = [f"query number {i}" for i in range(20)]

    async def go() -> list[np.ndarray]:
        out = await asyncio.gather(*[batcher.encode(t) for t in texts])
        assert all(tokens is None for _, tokens in out)  # this encoder gives no tokens
        return [vec for vec, _ in out]

    vecs = asyncio.run(go())
    assert enc.calls == [20]
    np.testing.assert_allclose(np.stack(vecs), HashEncoder().encode(texts))
    asyncio.run(go())  # a new event loop works too
    assert enc.calls == [20, 20]


def test_an_encoder_failure_reaches_every_waiter_and_the_batcher_recovers() -> None:
    class Flaky(Counting):
        def encode(self, texts):  # type: ignore[no-untyped-def]
            if not self.calls:
                self.calls.append(-1)
                raise RuntimeError("encoder down")
            return super().encode(texts)

    batcher = BatchingEncoder(Flaky(), window_ms=5)

    async def go() -> None:
        with pytest.raises(RuntimeError, match="encoder down"):
            await asyncio.gather(batcher.encode("a"), batcher.encode("b"))
        assert (await batcher.encode("c"))[0].shape == (64,)

    asyncio.run(go())
