"""Deadlines, streaming failures, fallback before the first streamed piece, Retry-After."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from concilium.config import load_config
from concilium.errors import ExpertUnavailable
from concilium.experts.base import Delta, Generation, GenParams, Message, StreamItem, Target
from concilium.orchestrator.http import create_app
from concilium.orchestrator.service import build_service
from tests.conftest import FakeBackend, HashEncoder, remote_spec

EXPERTS = [
    remote_spec("reverse", ["reverse the word", "spell the word backwards"]),
    remote_spec("math", ["add the numbers", "what is the sum of numbers"]),
]


@pytest.fixture
def client(tmp_path: Path, backend: FakeBackend) -> Iterator[TestClient]:
    cfg = load_config(None, home=tmp_path, seed_embedder=False)
    svc = build_service(cfg, encoder=HashEncoder(), backend=backend, seed=False)
    for s in EXPERTS:
        svc.registry.register(s)
    with TestClient(create_app(svc)) as c:
        yield c


def body(content: str, **kw: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": content}], **kw}


def sse(client: TestClient, payload: dict[str, object]) -> tuple[int, list[str]]:
    with client.stream("POST", "/v1/chat/completions", json=payload) as r:
        return r.status_code, [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]


def test_deadline_is_a_504_naming_the_field_and_cancels_the_expert(
    client: TestClient, backend: FakeBackend
) -> None:
    backend.delay_s["reverse"] = 5.0
    r = client.post(
        "/v1/chat/completions",
        json=body("reverse the word", model="reverse", routing={"deadline_ms": 100}),
    )
    assert r.status_code == 504, r.text
    err = r.json()["error"]
    assert err["param"] == "routing.deadline_ms" and "100 ms" in err["message"]
    assert backend.cancelled == ["reverse"]


def test_deadline_spent_is_not_followed_by_a_fallback(
    client: TestClient, backend: FakeBackend
) -> None:
    backend.delay_s["reverse"] = 5.0
    # 1 s, not 100 ms: the deadline counts the routing step too, which a loaded machine slows
    r = client.post(
        "/v1/chat/completions", json=body("reverse the word", routing={"deadline_ms": 1000})
    )
    assert r.status_code == 504 and [c[0] for c in backend.calls] == ["reverse"]


def test_stream_arrives_in_pieces_with_routing_on_the_last_chunk(client: TestClient) -> None:
    code, data = sse(client, body("reverse the word", stream=True))
    assert code == 200 and data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]]
    assert len(pieces) > 2 and "".join(pieces) == "reverse:reverse the word"
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "stop"
    assert last["routing"]["expert"] == "reverse" and last["usage"]["completion_tokens"] == 5


def test_stream_falls_back_before_the_first_piece(client: TestClient, backend: FakeBackend) -> None:
    backend.fail.add("reverse")
    code, data = sse(client, body("reverse the word", stream=True))
    chunks = [json.loads(d) for d in data[:-1]]
    assert code == 200 and chunks[-1]["routing"]["expert"] == "math"
    assert chunks[-1]["routing"]["fallbacks"] == ["math"]


def test_stream_broken_midway_ends_with_an_error_event(
    client: TestClient, backend: FakeBackend
) -> None:
    backend.fail_mid_stream.add("reverse")
    code, data = sse(client, body("reverse the word", stream=True, model="reverse"))
    assert code == 200 and data[-1] != "[DONE]"
    err = json.loads(data[-1])["error"]
    assert err["type"] == "ExpertUnavailable" and "mid-stream" in err["message"]


def test_stream_past_its_deadline_before_the_first_piece_is_a_504(
    client: TestClient, backend: FakeBackend
) -> None:
    backend.delay_s["reverse"] = 5.0
    payload = body("reverse the word", stream=True, model="reverse", routing={"deadline_ms": 50})
    with client.stream("POST", "/v1/chat/completions", json=payload) as r:
        r.read()
    assert r.status_code == 504, r.text
    assert r.json()["error"]["param"] == "routing.deadline_ms"
    assert backend.cancelled == ["reverse"]


class StallsAfterFirstPiece(FakeBackend):
    """Streams one piece at once, then stalls for `stall_s` (recording a cancel) before the rest."""

    stall_s = 60.0  # far past any deadline below: only the deadline ends it

    async def chat_stream(  # type: ignore[override]
        self, target: Target, messages: list[Message], params: GenParams
    ) -> AsyncIterator[StreamItem]:
        self.calls.append((target.expert, list(messages), params))
        yield Delta("rev")
        try:
            await asyncio.sleep(self.stall_s)
        except asyncio.CancelledError:
            self.cancelled.append(target.expert)
            raise
        yield Delta("erse")
        yield Generation(
            text="reverse", prompt_tokens=10, completion_tokens=5, finish_reason="stop"
        )


@pytest.fixture
def stalling(tmp_path: Path) -> Iterator[tuple[TestClient, StallsAfterFirstPiece]]:
    backend = StallsAfterFirstPiece()
    cfg = load_config(None, home=tmp_path, seed_embedder=False)
    svc = build_service(cfg, encoder=HashEncoder(), backend=backend, seed=False)
    for s in EXPERTS:
        svc.registry.register(s)
    with TestClient(create_app(svc)) as c:
        yield c, backend


def test_stream_past_its_deadline_midway_ends_with_an_error_event(
    stalling: tuple[TestClient, StallsAfterFirstPiece],
) -> None:
    client, backend = stalling
    # 3 s, not 50 ms: the deadline counts the routing step too, which a loaded machine slows
    payload = body("reverse the word", stream=True, model="reverse", routing={"deadline_ms": 3000})
    code, data = sse(client, payload)
    assert code == 200 and data[-1] != "[DONE]", data
    pieces = [json.loads(d)["choices"][0]["delta"].get("content") for d in data[:-1]]
    assert pieces == ["", "rev"]  # the role chunk, the first piece, then nothing more
    err = json.loads(data[-1])["error"]
    assert err["type"] == "ExpertTimeout" and "3000 ms" in err["message"], err
    assert backend.cancelled == ["reverse"]  # the stalled expert's work was cancelled


def test_stream_deadline_error_event_names_the_field(
    stalling: tuple[TestClient, StallsAfterFirstPiece],
) -> None:
    """Like the 504 before the first piece, the error event after it names the field."""
    client, _ = stalling
    payload = body("reverse the word", stream=True, model="reverse", routing={"deadline_ms": 3000})
    _, data = sse(client, payload)
    assert json.loads(data[-1])["error"].get("param") == "routing.deadline_ms", data[-1]


class Overloaded(FakeBackend):
    async def chat(self, target: Target, messages: list[Message], params: GenParams) -> Generation:  # type: ignore[override]
        raise ExpertUnavailable("queue full", retry_after_s=2.4)


def test_overload_is_a_503_with_retry_after(tmp_path: Path) -> None:
    cfg = load_config(None, home=tmp_path, seed_embedder=False)
    svc = build_service(cfg, encoder=HashEncoder(), backend=Overloaded(), seed=False)
    svc.registry.register(EXPERTS[0])
    with TestClient(create_app(svc)) as c:
        r = c.post("/v1/chat/completions", json=body("reverse", model="reverse"))
    assert r.status_code == 503 and r.headers["retry-after"] == "2"


def test_only_a_target_with_a_fallback_behind_it_may_give_up_early(
    client: TestClient, backend: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FALLBACK_LEFT tells the backend whether a later candidate would answer (then a model
    still starting fails over instead of holding the request)."""
    from concilium.experts.base import FALLBACK_LEFT

    seen: list[tuple[str, bool]] = []
    chat, stream = backend.chat, backend.chat_stream

    async def recording_chat(target: Target, messages: list[Message], params: GenParams):  # type: ignore[no-untyped-def]
        seen.append((target.expert, FALLBACK_LEFT.get()))
        return await chat(target, messages, params)

    def recording_stream(target: Target, messages: list[Message], params: GenParams):  # type: ignore[no-untyped-def]
        seen.append((target.expert, FALLBACK_LEFT.get()))
        return stream(target, messages, params)

    monkeypatch.setattr(backend, "chat", recording_chat)
    monkeypatch.setattr(backend, "chat_stream", recording_stream)
    backend.fail.add("reverse")
    assert client.post("/v1/chat/completions", json=body("reverse the word")).status_code == 200
    assert seen == [("reverse", True), ("math", False)]  # math is the last candidate
    seen.clear()
    assert sse(client, body("reverse the word", stream=True))[0] == 200
    assert set(seen) == {("reverse", True), ("math", False)}  # the fake streams through chat
    seen.clear()
    r = client.post("/v1/chat/completions", json=body("reverse the word", model="math"))
    assert r.status_code == 200 and seen == [("math", False)]  # named: nothing behind it


def test_fallback_left_does_not_outlive_the_attempt(tmp_path: Path, backend: FakeBackend) -> None:
    """In one context (the CLI and the benchmarks answer requests one after another in one
    task) the flag is reset once the first candidate answered: an ensemble member or another
    request after it must not give up early."""
    from concilium.experts.base import FALLBACK_LEFT
    from concilium.orchestrator.schemas import ChatCompletionRequest

    cfg = load_config(None, home=tmp_path, seed_embedder=False)
    svc = build_service(cfg, encoder=HashEncoder(), backend=backend, seed=False)
    for s in EXPERTS:
        svc.registry.register(s)
    req = ChatCompletionRequest.model_validate(body("reverse the word"))

    async def go() -> bool:
        out = await svc.orchestrator.chat(req)
        assert out.body["routing"]["expert"] == "reverse"  # answered with math behind it
        return FALLBACK_LEFT.get()

    assert asyncio.run(go()) is False
