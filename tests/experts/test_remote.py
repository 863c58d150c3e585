"""The remote expert over httpx.MockTransport: success and every failure mapped to the tree."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from concilium.errors import ExpertFailed, ExpertTimeout, ExpertUnavailable
from concilium.experts.base import GenParams
from concilium.experts.remote import RemoteExpert
from concilium.registry.specs import RemoteSpec

SPEC = RemoteSpec(name="r", url="http://127.0.0.1:9/v1", model_name="m", api_key_env="R_KEY")
MSGS = [{"role": "user", "content": "hi"}]


def run(handler, coro_fn):  # type: ignore[no-untyped-def]
    async def go():  # type: ignore[no-untyped-def]
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as c:
            return await coro_fn(RemoteExpert(SPEC, c))

    return asyncio.run(go())


def test_chat_success_sends_openai_body_and_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("R_KEY", "k1")
    seen = {}

    def handler(req: httpx.Request) -> httpx.Response:
        seen["url"], seen["auth"] = str(req.url), req.headers.get("authorization")
        seen["body"] = json.loads(req.content)
        return httpx.Response(
            200,
            json={
                "choices": [{"message": {"content": "yo"}, "finish_reason": "length"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1},
            },
        )

    g = run(handler, lambda e: e.chat(MSGS, GenParams(max_tokens=7, stop=("\n",))))
    assert (g.text, g.prompt_tokens, g.completion_tokens, g.finish_reason) == ("yo", 3, 1, "length")
    assert seen["url"] == "http://127.0.0.1:9/v1/chat/completions" and seen["auth"] == "Bearer k1"
    assert seen["body"]["model"] == "m" and seen["body"]["max_tokens"] == 7
    assert seen["body"]["stop"] == ["\n"]


@pytest.mark.parametrize(
    ("handler", "exc", "match"),
    [
        (
            lambda r: (_ for _ in ()).throw(httpx.ReadTimeout("slow", request=r)),
            ExpertTimeout,
            "timed out",
        ),
        (
            lambda r: (_ for _ in ()).throw(httpx.ConnectError("refused", request=r)),
            ExpertUnavailable,
            "unreachable",
        ),
        (lambda r: httpx.Response(503, text="busy"), ExpertUnavailable, "503"),
        (lambda r: httpx.Response(429, text="slow down"), ExpertUnavailable, "429"),
        (lambda r: httpx.Response(401, text="bad key"), ExpertFailed, "401"),
        (lambda r: httpx.Response(200, text="<html>"), ExpertFailed, "non-JSON"),
        (lambda r: httpx.Response(200, json={"choices": []}), ExpertFailed, "malformed"),
    ],
)
def test_failures_map_to_the_exception_tree(handler, exc, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(exc, match=match):
        run(handler, lambda e: e.chat(MSGS, GenParams()))


def test_embeddings_are_ordered_by_index() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, json={"data": [{"index": 1, "embedding": [2.0]}, {"index": 0, "embedding": [1.0]}]}
        )

    assert run(handler, lambda e: e.embed(["a", "b"])) == [[1.0], [2.0]]


@pytest.mark.parametrize("call", ["chat", "embed"])
def test_pool_circuit_breaker_stops_calling_a_failing_endpoint(call: str) -> None:
    from concilium.experts.base import Target
    from concilium.experts.breaker import CircuitBreaker
    from concilium.experts.pool import ExpertPool

    hits = []

    def handler(req: httpx.Request) -> httpx.Response:
        hits.append(1)
        return httpx.Response(500, json={"error": "boom"})

    async def go() -> list[str]:
        client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        pool = ExpertPool(client=client, breaker=CircuitBreaker(threshold=2, cooldown_s=60))
        target = Target(expert="r", kind="remote", remote=SPEC)
        errors = []
        for _ in range(4):
            try:
                if call == "chat":
                    await pool.chat(target, MSGS, GenParams())
                else:
                    await pool.embed(target, ["a"])
            except ExpertFailed as e:
                errors.append(type(e).__name__ + ":" + str(e))
        await pool.aclose()
        return errors

    errors = asyncio.run(go())
    assert len(hits) == 2 and len(errors) == 4
    assert all("cooling down" in e for e in errors[2:])
