"""A remote expert's `stream: true` answer is passed on chunk by chunk, bounded and checked."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from concilium.errors import ExpertFailed, ExpertTimeout, ExpertUnavailable
from concilium.experts import remote
from concilium.experts.base import Delta, Generation, GenParams, StreamItem, Target
from concilium.experts.breaker import CircuitBreaker
from concilium.experts.pool import ExpertPool
from concilium.experts.remote import RemoteExpert
from concilium.experts.sse import sse_data
from concilium.registry.specs import RemoteSpec
from tests.conftest import no_hang

SPEC = RemoteSpec(name="r", url="http://127.0.0.1:9/v1", model_name="m", timeout_s=0.5)
MSGS = [{"role": "user", "content": "hi"}]
SSE = {"content-type": "text/event-stream"}


def chunk(content: str | None = None, finish: str | None = None, **extra: Any) -> bytes:
    choice = {"index": 0, "delta": {} if content is None else {"content": content}}
    body = {"object": "chat.completion.chunk", "choices": [choice | {"finish_reason": finish}]}
    return b"data: " + json.dumps(body | extra).encode() + b"\n\n"


USAGE = b'data: {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3}}\n\n'
GOOD = [
    b'data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}\n\n',
    chunk("ta"),
    chunk("ne"),
    chunk("lp"),
    chunk(finish="stop"),
    USAGE,
    b"data: [DONE]\n\n",
]


class Pieces(httpx.AsyncByteStream):
    """A response body sent as the given pieces, optionally a pause before each."""

    def __init__(self, pieces: list[bytes], pause_s: float = 0.0) -> None:
        self.pieces, self.pause_s = pieces, pause_s
        self.sent, self.closed = 0, False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for p in self.pieces:
            if self.pause_s:
                await asyncio.sleep(self.pause_s)
            self.sent += 1
            yield p

    async def aclose(self) -> None:
        self.closed = True


def collect(handler: Any, spec: RemoteSpec = SPEC) -> list[StreamItem]:
    async def go() -> list[StreamItem]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as c:
            return [item async for item in RemoteExpert(spec, c).chat_stream(MSGS, GenParams())]

    with no_hang(5, "the remote stream"):
        return asyncio.run(go())


def streamed(pieces: list[bytes], **kw: Any) -> Any:
    return lambda r: httpx.Response(200, headers=SSE, stream=Pieces(pieces, **kw))


def test_deltas_arrive_in_order_then_the_generation_with_the_endpoints_usage() -> None:
    seen: dict[str, Any] = {}

    def handler(r: httpx.Request) -> httpx.Response:
        seen["body"] = json.loads(r.content)
        return streamed(GOOD)(r)

    items = collect(handler)
    assert [i.text for i in items if isinstance(i, Delta)] == ["ta", "ne", "lp"]
    gen = items[-1]
    assert isinstance(gen, Generation) and gen.text == "tanelp" and gen.finish_reason == "stop"
    assert (gen.prompt_tokens, gen.completion_tokens) == (4, 3)
    assert seen["body"]["stream"] is True
    assert seen["body"]["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("size", [1, 2, 7])
@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_any_split_of_the_bytes_and_any_line_end_parse_alike(size: int, eol: bytes) -> None:
    raw = b"".join(GOOD).replace(b"\n", eol)
    pieces = [raw[i : i + size] for i in range(0, len(raw), size)]
    items = collect(streamed(pieces))
    assert [i.text for i in items] == ["ta", "ne", "lp", "tanelp"]


def test_sse_fields_and_multi_line_data_follow_the_spec() -> None:
    raw = b": keep-alive\n\nevent: x\nid: 1\ndata: a\ndata:b\n\ndata: c"

    async def go() -> list[str]:
        async def src() -> AsyncIterator[bytes]:
            yield raw

        return [d async for d in sse_data(src(), max_line=100, max_total=1000, who="w")]

    assert asyncio.run(go()) == ["a\nb", "c"]


def test_without_usage_each_content_chunk_counts_as_a_token() -> None:
    items = collect(streamed([chunk("a"), chunk("b"), chunk(finish="length"), b"data: [DONE]\n\n"]))
    gen = items[-1]
    assert isinstance(gen, Generation)
    assert (gen.text, gen.completion_tokens, gen.finish_reason) == ("ab", 2, "length")


def test_a_finished_stream_without_done_is_complete_but_a_cut_one_is_unavailable() -> None:
    items = collect(streamed([chunk("a"), chunk(finish="stop")]))
    assert isinstance(items[-1], Generation) and items[-1].text == "a"
    with pytest.raises(ExpertUnavailable, match="before finishing"):
        collect(streamed([chunk("a"), chunk("b")]))


def test_an_error_chunk_mid_stream_is_expert_failed_after_what_came_before() -> None:
    got: list[str] = []

    async def go() -> None:
        handler = streamed([chunk("a"), b'data: {"error": {"message": "overloaded"}}\n\n'])
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as c:
            async for item in RemoteExpert(SPEC, c).chat_stream(MSGS, GenParams()):
                got.append(item.text)

    with pytest.raises(ExpertFailed, match=r"streamed an error: .*overloaded"):
        asyncio.run(go())
    assert got == ["a"]


@pytest.mark.parametrize(
    "bad",
    [
        b"data: {not json\n\n",
        b"data: [1, 2]\n\n",
        b'data: {"choices": [{"delta": {"content": 7}}]}\n\n',
        b'data: {"choices": [{"delta": {"content": "x"}, "finish_reason": 1}]}\n\n',
        b'data: {"choices": [], "usage": "lots"}\n\n',
        b'data: {"choices": ["x"]}\n\n',
    ],
)
def test_a_malformed_chunk_is_expert_failed(bad: bytes) -> None:
    with pytest.raises(ExpertFailed, match="malformed"):
        collect(streamed([chunk("a"), bad, chunk(finish="stop")]))


@pytest.mark.parametrize(
    ("status", "exc", "match"),
    [
        (503, ExpertUnavailable, "503"),
        (429, ExpertUnavailable, "429"),
        (401, ExpertFailed, "401: no key"),
    ],
)
def test_an_error_status_fails_before_any_piece(status: int, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        collect(lambda r: httpx.Response(status, text="no key"))


def test_an_endpoint_that_ignores_stream_true_is_read_as_one_piece() -> None:
    body = {"choices": [{"message": {"content": "yo"}, "finish_reason": "stop"}]}
    items = collect(lambda r: httpx.Response(200, json=body))
    assert [i.text for i in items] == ["yo", "yo"] and isinstance(items[-1], Generation)


def test_a_trickling_stream_times_out_within_the_whole_exchange_limit_and_is_closed() -> None:
    body = Pieces([b": ping\n\n"] * 10_000, pause_s=0.01)
    # collect's no_hang fails a stream that is never cut; the count bounds how much was read
    with pytest.raises(ExpertTimeout, match=r"timed out after 0\.5 s"):
        collect(lambda r: httpx.Response(200, headers=SSE, stream=body))
    assert body.closed and body.sent < 200


def test_a_line_or_a_stream_over_the_caps_is_refused_unbuffered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from concilium.experts import remote_stream

    monkeypatch.setattr(remote_stream, "MAX_LINE_BYTES", 1000)
    long_line = Pieces([b"data: " + b"x" * 100] * 100)
    with pytest.raises(ExpertFailed, match="a line over 1000 bytes"):
        collect(lambda r: httpx.Response(200, headers=SSE, stream=long_line))
    assert long_line.closed and long_line.sent < 20
    monkeypatch.setattr(remote, "MAX_BODY_BYTES", 2000)
    many = Pieces([chunk("x")] * 1000)
    with pytest.raises(ExpertFailed, match="over 2000 bytes"):
        collect(lambda r: httpx.Response(200, headers=SSE, stream=many))
    assert many.closed and many.sent < 100


def pool_stream(pool: ExpertPool, n: int | None = None) -> Any:
    """Read up to `n` items of the pool's stream for the remote target (all when None)."""

    async def go() -> list[str]:
        out: list[str] = []
        stream = pool.chat_stream(Target(expert="r", kind="remote", remote=SPEC), MSGS, GenParams())
        try:
            async for item in stream:
                out.append(item.text)
                if n is not None and len(out) >= n:
                    break
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        return out

    return go()


def test_the_pool_streams_a_remote_expert_under_its_circuit_breaker() -> None:
    clock, mode = [0.0], {"fail": True}

    def handler(r: httpx.Request) -> httpx.Response:
        return httpx.Response(500) if mode["fail"] else streamed(GOOD)(r)

    async def go() -> None:
        client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        pool = ExpertPool(client=client, breaker=CircuitBreaker(1, 10, clock=lambda: clock[0]))
        with pytest.raises(ExpertUnavailable, match="HTTP 500"):
            await pool_stream(pool)
        with pytest.raises(ExpertUnavailable, match="cooling down"):
            await pool_stream(pool)
        clock[0] = 11
        mode["fail"] = False
        assert await pool_stream(pool, n=1) == ["ta"]  # the trial, abandoned by its client
        assert await pool_stream(pool) == ["ta", "ne", "lp", "tanelp"]  # not stuck half-open
        assert await pool_stream(pool) == ["ta", "ne", "lp", "tanelp"]  # and closed again
        await pool.aclose()

    with no_hang(10, "the pool's remote streams"):
        asyncio.run(go())


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[TestClient]:
    from concilium.config import load_config
    from concilium.orchestrator.http import create_app
    from concilium.orchestrator.service import build_service
    from tests.conftest import HashEncoder, remote_spec

    client = httpx.AsyncClient(transport=httpx.MockTransport(streamed(GOOD)))
    cfg = load_config(None, home=tmp_path, seed_embedder=False)
    svc = build_service(cfg, encoder=HashEncoder(), backend=ExpertPool(client=client), seed=False)
    svc.registry.register(remote_spec("reverse", ["reverse the word"]))
    with TestClient(create_app(svc)) as c:
        yield c


def test_the_gateway_passes_a_remote_stream_on_chunk_by_chunk(gateway: TestClient) -> None:
    payload = {"model": "reverse", "stream": True, "messages": MSGS}
    with gateway.stream("POST", "/v1/chat/completions", json=payload) as r:
        data = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert r.status_code == 200 and data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks]
    assert pieces == ["", "ta", "ne", "lp", None]
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    assert chunks[-1]["routing"]["expert"] == "reverse"


def test_a_client_that_stops_reading_closes_the_endpoints_stream() -> None:
    body = Pieces([chunk("a")] * 50, pause_s=0.01)

    async def go() -> list[str]:
        client = httpx.AsyncClient(
            transport=httpx.MockTransport(lambda r: httpx.Response(200, headers=SSE, stream=body))
        )
        pool = ExpertPool(client=client)
        try:
            return await pool_stream(pool, n=2)
        finally:
            await pool.aclose()

    with no_hang(5, "an abandoned stream"):
        assert asyncio.run(go()) == ["a", "a"]
    assert body.closed and body.sent < 10


def test_an_endpoint_that_refuses_stream_options_is_asked_again_without() -> None:
    bodies: list[dict[str, Any]] = []

    def handler(r: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(r.content))
        if "stream_options" in bodies[-1]:
            return httpx.Response(
                400, json={"detail": "extra field 'stream_options' not permitted"}
            )
        return streamed([chunk("a"), chunk(finish="stop")])(r)

    items = collect(handler)
    assert [i.text for i in items] == ["a", "a"] and len(bodies) == 2
    assert bodies[1]["stream"] is True and "stream_options" not in bodies[1]
    with pytest.raises(ExpertFailed, match="400: bad messages"):  # another 400 is not retried
        collect(lambda r: httpx.Response(400, text="bad messages"))


def test_an_endpoint_that_keeps_failing_mid_stream_opens_the_circuit() -> None:
    calls = []

    def handler(r: httpx.Request) -> httpx.Response:
        calls.append(1)
        return streamed([chunk("a"), b'data: {"error": "boom"}\n\n'])(r)

    async def go() -> list[str]:
        client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        pool = ExpertPool(client=client, breaker=CircuitBreaker(3, 60))
        errors = []
        for _ in range(5):
            try:
                await pool_stream(pool)
            except ExpertFailed as e:
                errors.append(str(e))
        await pool.aclose()
        return errors

    errors = asyncio.run(go())
    assert len(calls) == 3 and all("cooling down" in e for e in errors[3:])


def sse_of(raw: list[bytes], max_line: int = 100) -> list[str]:
    async def go() -> list[str]:
        async def src() -> AsyncIterator[bytes]:
            for r in raw:
                yield r

        return [d async for d in sse_data(src(), max_line=max_line, max_total=10**6, who="w")]

    return asyncio.run(go())


def test_a_byte_order_mark_does_not_hide_the_first_event() -> None:
    assert sse_of([b"\xef\xbb\xbfdata: a\n\ndata: b\n\n"]) == ["a", "b"]


def test_a_cr_ended_event_is_dispatched_without_waiting_for_more_bytes() -> None:
    got: list[str] = []

    async def go() -> None:
        more = asyncio.Event()

        async def src() -> AsyncIterator[bytes]:
            yield b"data: a\r\r"
            await more.wait()  # the endpoint sends nothing more for now
            yield b"\ndata: b\r\n\r\n"

        events = sse_data(src(), max_line=100, max_total=1000, who="w")
        got.append(await asyncio.wait_for(anext(events), 1.0))
        more.set()
        got.extend([d async for d in events])

    asyncio.run(go())
    assert got == ["a", "b"]


def test_a_complete_line_over_the_cap_is_refused_even_in_one_chunk() -> None:
    with pytest.raises(ExpertFailed, match="a line over 100 bytes"):
        sse_of([b"data: " + b"x" * 5000 + b"\n\n"])


def test_the_content_type_is_matched_whatever_its_case() -> None:
    headers = {"content-type": "Text/Event-Stream; charset=utf-8"}
    items = collect(lambda r: httpx.Response(200, headers=headers, stream=Pieces(GOOD)))
    assert [i.text for i in items] == ["ta", "ne", "lp", "tanelp"]
