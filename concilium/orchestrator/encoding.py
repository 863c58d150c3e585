"""Batch the router's query encoding across concurrent requests.

Under load most of a routed request's CPU time is the sentence-transformer forward over its query.
Requests that arrive within `window_ms` of each other are encoded in one forward (in a worker
thread, so the event loop keeps accepting requests): the per-query cost falls with the batch.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from concilium.registry.index import TextEncoder


@dataclass
class _Waiting:
    text: str
    future: asyncio.Future[np.ndarray]


class BatchingEncoder:
    """`await encode(text)` -> [dim] float32; concurrent calls share one encoder forward."""

    def __init__(self, encoder: TextEncoder, max_batch: int = 64, window_ms: float = 1.0) -> None:
        self.encoder, self.max_batch, self.window_s = encoder, max_batch, window_ms / 1000
        self._queue: asyncio.Queue[_Waiting] | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batches = 0  # forwards run (for metrics and tests)

    async def encode(self, text: str) -> np.ndarray:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop, self._queue = loop, asyncio.Queue()  # first call, or a new event loop
            self._task = loop.create_task(self._run(self._queue))
        assert self._queue is not None
        fut: asyncio.Future[np.ndarray] = loop.create_future()
        self._queue.put_nowait(_Waiting(text, fut))
        return await fut

    async def _run(self, queue: asyncio.Queue[_Waiting]) -> None:
        while True:
            batch = [await queue.get()]
            await asyncio.sleep(self.window_s)  # let concurrent requests join
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            live = [w for w in batch if not w.future.done()]
            if not live:
                continue
            try:
                vecs = await asyncio.to_thread(self.encoder.encode, [w.text for w in live])
            except Exception as e:  # every waiter sees the failure; the loop keeps serving
                for w in live:
                    if not w.future.done():
                        w.future.set_exception(e)
                continue
            self.batches += 1
            for w, v in zip(live, vecs, strict=True):
                if not w.future.done():
                    w.future.set_result(np.asarray(v, dtype=np.float32))
