"""MicroBatcher: concurrent awaiters share one call; a busy batch collects the next one."""

from __future__ import annotations

import asyncio
import threading

import pytest

from concilium.experts.batching import MicroBatcher


def test_items_queued_while_a_batch_runs_all_join_the_next_batch() -> None:
    calls: list[list[int]] = []
    release = threading.Event()

    def fn(items: list[int]) -> list[int]:
        calls.append(list(items))
        if len(calls) == 1:
            release.wait(5)  # the first batch is busy while 40 more arrive
        return [i * 10 for i in items]

    async def main() -> list[int]:
        b: MicroBatcher[int, int] = MicroBatcher(fn, max_batch=64, window_s=0.0)
        first = asyncio.create_task(b.submit(0))
        while not calls:
            await asyncio.sleep(0.001)
        rest = [asyncio.create_task(b.submit(i)) for i in range(1, 41)]
        await asyncio.sleep(0.01)
        release.set()
        out = await asyncio.gather(first, *rest)
        b.cancel()
        return list(out)

    assert asyncio.run(main()) == [i * 10 for i in range(41)]
    assert calls == [[0], list(range(1, 41))]  # with no window at all, still one batch


def test_max_batch_caps_a_batch_and_errors_reach_every_waiter() -> None:
    calls: list[int] = []

    def fn(items: list[int]) -> list[int]:
        calls.append(len(items))
        if 13 in items:
            raise ValueError("bad item")
        return items

    async def main() -> None:
        b: MicroBatcher[int, int] = MicroBatcher(fn, max_batch=4, window_s=0.05)
        assert await asyncio.gather(*(b.submit(i) for i in range(10))) == list(range(10))
        assert max(calls) <= 4
        with pytest.raises(ValueError, match="bad item"):
            await asyncio.gather(b.submit(12), b.submit(13))
        assert await b.submit(1) == 1  # the batcher keeps running
        b.cancel()

    asyncio.run(main())
