"""The remote expert refuses wrongly-shaped, endless and huge answers with tree errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from concilium.errors import ExpertFailed, ExpertTimeout, ExpertUnavailable
from concilium.experts import remote
from concilium.experts.base import GenParams, Target
from concilium.experts.remote import RemoteExpert
from concilium.registry.specs import RemoteSpec
from tests.conftest import no_hang

SPEC = RemoteSpec(name="r", url="http://127.0.0.1:9/v1", model_name="m", timeout_s=0.3)
MSGS = [{"role": "user", "content": "hi"}]
OK = b'{"choices": [{"message": {"content": "yo"}}]}'


def run(handler, coro_fn):  # type: ignore[no-untyped-def]
    async def go():  # type: ignore[no-untyped-def]
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as c:
            return await coro_fn(RemoteExpert(SPEC, c))

    with no_hang(5, "the remote call"):
        return asyncio.run(go())


@pytest.mark.parametrize(
    "body",
    [
        b'{"choices": [{"message": {"content": "x"}}], "usage": [1]}',
        b'{"choices": [{"message": {"content": "x"}}], "usage": "lots"}',
        b'{"choices": [{"message": {"content": {"text": "x"}}}]}',
        b'{"choices": [{"message": {"content": ["x"]}}]}',
        b'{"choices": [{"message": {"content": "x"}, "finish_reason": {"a": 1}}]}',
        b'{"choices": [{"message": {"content": "x"}}], "usage": {"prompt_tokens": 1e400}}',
    ],
)
def test_a_wrongly_shaped_completion_is_expert_failed(body: bytes) -> None:
    with pytest.raises(ExpertFailed, match="malformed completion"):
        run(lambda r: httpx.Response(200, content=body), lambda e: e.chat(MSGS, GenParams()))


@pytest.mark.parametrize(
    "body",
    [
        b'{"data": [{"index": 0, "embedding": [1.0]}]}',  # one vector for two inputs
        b'{"data": [{"index": 0, "embedding": [1.0]}, {"index": 0, "embedding": [2.0]}]}',
        b'{"data": [{"index": 0, "embedding": "12"}, {"index": 1, "embedding": "34"}]}',
        b'{"data": [{"index": 0, "embedding": [1e400]}, {"index": 1, "embedding": [1.0]}]}',
    ],
)
def test_wrongly_shaped_embeddings_are_expert_failed(body: bytes) -> None:
    with pytest.raises(ExpertFailed, match="malformed embeddings"):
        run(lambda r: httpx.Response(200, content=body), lambda e: e.embed(["a", "b"]))


class Trickle(httpx.AsyncByteStream):
    """A body that arrives a few bytes at a time (each read is quick: no read timeout fires)."""

    def __init__(self, chunk: bytes, count: int, pause_s: float) -> None:
        self.chunk, self.count, self.pause_s = chunk, count, pause_s
        self.sent, self.closed = 0, False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.count):
            await asyncio.sleep(self.pause_s)
            self.sent += 1
            yield self.chunk

    async def aclose(self) -> None:
        self.closed = True


def test_a_body_that_never_ends_times_out_within_the_timeout_and_is_closed() -> None:
    stream = Trickle(b" ", count=10_000, pause_s=0.01)
    # run's no_hang fails a body that is never cut; the count bounds how much of it was read
    with pytest.raises(ExpertTimeout, match="timed out"):
        run(lambda r: httpx.Response(200, stream=stream), lambda e: e.chat(MSGS, GenParams()))
    assert stream.closed and 0 < stream.sent < 200


def test_an_answer_that_never_comes_times_out() -> None:
    async def handler(r: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        return httpx.Response(200, content=OK)

    with pytest.raises(ExpertTimeout, match="timed out"):
        run(handler, lambda e: e.chat(MSGS, GenParams()))


def test_a_huge_body_is_refused_without_reading_it_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote, "MAX_BODY_BYTES", 1 << 20, raising=False)
    stream = Trickle(b"x" * (1 << 16), count=64, pause_s=0)  # 4 MiB in 64 KiB pieces
    with pytest.raises(ExpertFailed, match="over 1048576 bytes"):
        run(lambda r: httpx.Response(200, stream=stream), lambda e: e.chat(MSGS, GenParams()))
    assert stream.sent <= 17 and stream.closed


def test_an_ordinary_answer_still_parses() -> None:
    g = run(lambda r: httpx.Response(200, content=OK), lambda e: e.chat(MSGS, GenParams()))
    assert g.text == "yo" and g.finish_reason == "stop"


def test_a_half_open_trial_cut_short_by_a_deadline_does_not_block_the_endpoint() -> None:
    from concilium.experts.breaker import CircuitBreaker
    from concilium.experts.pool import ExpertPool

    clock = [0.0]
    mode = {"fail": True, "slow": False}

    async def handler(r: httpx.Request) -> httpx.Response:
        if mode["slow"]:
            await asyncio.sleep(30)
        return httpx.Response(500) if mode["fail"] else httpx.Response(200, content=OK)

    async def go() -> str:
        client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        breaker = CircuitBreaker(threshold=1, cooldown_s=10, clock=lambda: clock[0])
        pool = ExpertPool(client=client, breaker=breaker)
        target = Target(expert="r", kind="remote", remote=SPEC)
        with pytest.raises(ExpertUnavailable):
            await pool.chat(target, MSGS, GenParams())  # opens the circuit
        clock[0] = 11  # cooled down: the next call is the trial; the caller gives up on it
        mode["slow"] = True
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pool.chat(target, MSGS, GenParams()), 0.05)
        mode.update(fail=False, slow=False)  # the endpoint recovers
        clock[0] = 100
        try:
            return (await pool.chat(target, MSGS, GenParams())).text
        finally:
            await pool.aclose()

    with no_hang(5, "the pool"):
        assert asyncio.run(go()) == "yo"
