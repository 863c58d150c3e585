"""Micro-batching: concurrent awaiters of one blocking batch function share a single call.

Items submitted within `window_s` of the first one, and every item already queued when the
previous batch finished (up to `max_batch`), are passed together to
`fn(items) -> outputs` in a worker thread, so the event loop keeps accepting work; each awaiter
gets its own output, or the batch's exception. Used for mixed-adapter decoding of one model and
for the router's query encoding.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass
class _Pending(Generic[In, Out]):
    item: In
    future: asyncio.Future[Out] = field(repr=False)


class MicroBatcher(Generic[In, Out]):
    def __init__(
        self, fn: Callable[[list[In]], Sequence[Out]], max_batch: int, window_s: float
    ) -> None:
        self.fn, self.max_batch, self.window_s = fn, max_batch, window_s
        self.task: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[_Pending[In, Out]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def submit(self, item: In) -> Out:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self.task is None or self.task.done():
            self._loop, self._queue = loop, asyncio.Queue()  # first call, or a new event loop
            self.task = loop.create_task(self._run(self._queue))
        assert self._queue is not None
        fut: asyncio.Future[Out] = loop.create_future()
        self._queue.put_nowait(_Pending(item, fut))
        return await fut

    async def _run(self, queue: asyncio.Queue[_Pending[In, Out]]) -> None:
        loop = asyncio.get_running_loop()
        batch: list[_Pending[In, Out]] = []
        try:
            while True:
                batch = [await queue.get()]
                deadline = loop.time() + self.window_s
                while len(batch) < self.max_batch:
                    try:  # everything already waiting joins, whatever the window says
                        batch.append(queue.get_nowait())
                        continue
                    except asyncio.QueueEmpty:
                        pass
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:  # not wait_for: on 3.11 it swallows a cancel that meets a new item
                        async with asyncio.timeout(remaining):
                            batch.append(await queue.get())
                    except TimeoutError:
                        break
                live = [p for p in batch if not p.future.done()]
                if live:
                    await self._deliver(live)
        finally:  # cancelled: no submitter waits forever for a batch that will never run
            while not queue.empty():
                batch.append(queue.get_nowait())
            for p in batch:
                p.future.cancel()

    async def _deliver(self, live: list[_Pending[In, Out]]) -> None:
        try:
            outs = await asyncio.to_thread(self.fn, [p.item for p in live])
        except Exception as e:  # every waiter sees the failure; the batcher keeps running
            for p in live:
                if not p.future.done():
                    p.future.set_exception(e)
            return
        for p, out in zip(live, outs, strict=True):
            if not p.future.done():
                p.future.set_result(out)

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()
