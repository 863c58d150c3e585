"""Review fixes on the request path, each with the test that failed before: non-finite
log-probabilities in fusion and in the routing object, the deadline over the query's encoding and
over embeddings, and a stream closed right after its first chunk."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from concilium.config import load_config
from concilium.experts.base import GenParams, Message, StreamItem, Target
from concilium.orchestrator.fusion import Vote, fuse
from concilium.orchestrator.http import create_app
from concilium.orchestrator.schemas import ChatCompletionRequest
from concilium.orchestrator.service import Service, build_service
from tests.conftest import FakeBackend, HashEncoder, remote_spec

EXPERTS = [
    remote_spec(
        "reverse",
        ["reverse the word", "spell the word backwards"],
        price_in_per_1k=0.1,
        price_out_per_1k=0.2,
        expected_latency_ms=200,
    ),
    remote_spec(
        "reverse-pro",
        ["reverse the word carefully", "spell the word backwards exactly"],
        price_in_per_1k=1.0,
        price_out_per_1k=2.0,
        expected_latency_ms=800,
    ),
    remote_spec("embedder", ["embed text"], task="embed"),
]


class SlowEncoder(HashEncoder):
    """A hashing encoder that can be told to take `delay_s` per forward (a loaded encoder)."""

    delay_s = 0.0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        time.sleep(self.delay_s)
        return super().encode(texts)


class SlowEmbedder(FakeBackend):
    embed_delay_s = 0.0

    def __init__(self) -> None:
        super().__init__()
        self.embeds_cancelled: list[str] = []  # embed experts whose work was cancelled

    async def embed(self, target: Target, texts: Sequence[str]) -> list[list[float]]:
        try:
            await asyncio.sleep(self.embed_delay_s)
        except asyncio.CancelledError:
            self.embeds_cancelled.append(target.expert)
            raise
        return await super().embed(target, texts)


class ClosingBackend(FakeBackend):
    """Records which experts' streams were closed."""

    def __init__(self) -> None:
        super().__init__()
        self.closed: list[str] = []

    async def chat_stream(
        self, target: Target, messages: Sequence[Message], params: GenParams
    ) -> AsyncIterator[StreamItem]:
        try:
            async for item in super().chat_stream(target, messages, params):
                yield item
        finally:
            self.closed.append(target.expert)


def _service(home: Path, backend: FakeBackend, encoder: HashEncoder | None = None) -> Service:
    cfg = load_config(None, home=home, seed_embedder=False)
    svc = build_service(cfg, encoder=encoder or HashEncoder(), backend=backend, seed=False)
    for s in EXPERTS:
        svc.registry.register(s)
    return svc


@pytest.fixture
def backend() -> SlowEmbedder:
    return SlowEmbedder()


@pytest.fixture
def client(tmp_path: Path, backend: SlowEmbedder) -> Iterator[TestClient]:
    with TestClient(create_app(_service(tmp_path, backend))) as c:
        yield c


def chat(c: TestClient, content: str, **body: object):  # type: ignore[no-untyped-def]
    return c.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": content}], **body}
    )


def strict_json(text: str) -> dict[str, object]:
    """Parse as a JSON client would: NaN / Infinity are not JSON."""

    def refuse(token: str) -> None:
        raise ValueError(f"{token} is not JSON")

    return json.loads(text, parse_constant=refuse)  # type: ignore[no-any-return]


# -- non-finite log-probabilities -------------------------------------------------------------
def test_a_nan_log_probability_gives_no_confidence_in_fusion() -> None:
    fused = fuse([Vote("a", "x", 0.6, math.nan), Vote("b", "y", 0.4, -0.1)])
    assert fused.winner == 1 and math.isfinite(fused.support)
    assert all(math.isfinite(w) for w in fused.tallies.values())


@pytest.mark.parametrize("stream", [False, True])
def test_an_ensemble_member_reporting_nan_still_answers_with_valid_json(
    client: TestClient, backend: SlowEmbedder, stream: bool
) -> None:
    backend.answers = {"reverse": "tenalp", "reverse-pro": "planet"}
    backend.logprobs = {"reverse": math.nan, "reverse-pro": -0.2}
    routing = {"strategy": "ensemble", "max_experts": 2}
    r = chat(client, "reverse the word planet", routing=routing, stream=stream)
    assert r.status_code == 200, r.text
    if stream:
        data = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
        assert data[-1] == "[DONE]"
        rt = strict_json(data[-2])["routing"]
    else:
        rt = strict_json(r.text)["routing"]
    assert isinstance(rt, dict) and rt["expert"] == "reverse-pro"
    members = {m["expert"]: m for m in rt["members"]}
    assert members["reverse"]["ok"] is True and members["reverse"]["mean_logprob"] is None


@pytest.mark.parametrize("lp", [-math.inf, math.inf])
def test_a_cascade_accepting_an_infinite_log_probability_answers_with_valid_json(
    client: TestClient, backend: SlowEmbedder, lp: float
) -> None:
    backend.logprobs = {"reverse": lp}
    routing = {"strategy": "cascade", "max_experts": 2, "max_cost": 0.1}  # one stage fits
    r = chat(client, "reverse the word carefully", routing=routing)
    assert r.status_code == 200, r.text
    rt = strict_json(r.text)["routing"]
    assert isinstance(rt, dict) and rt["expert"] == "reverse"
    assert rt["accepted_confidence"] is None and rt["members"][0]["mean_logprob"] is None


# -- the deadline covers every await ------------------------------------------------------------
def test_embeddings_honour_the_deadline(client: TestClient, backend: SlowEmbedder) -> None:
    backend.embed_delay_s = 5.0
    r = client.post(
        "/v1/embeddings", json={"input": "embed this text", "routing": {"deadline_ms": 100}}
    )
    assert r.status_code == 504, r.text
    assert r.json()["error"]["param"] == "routing.deadline_ms"
    assert backend.embeds_cancelled == ["embedder"]  # the expert's work was cancelled


def test_the_deadline_counts_the_query_encoding(tmp_path: Path) -> None:
    encoder = SlowEncoder()
    with TestClient(create_app(_service(tmp_path, FakeBackend(), encoder))) as c:
        encoder.delay_s = 0.5  # after registration: only the query's encoding is slow
        r = chat(c, "reverse the word", routing={"deadline_ms": 100})
    assert r.status_code == 504, r.text
    assert r.json()["error"]["param"] == "routing.deadline_ms"


# -- a stream closed early closes the expert's stream -------------------------------------------
def test_a_stream_closed_after_its_first_chunk_closes_the_experts_stream(tmp_path: Path) -> None:
    backend = ClosingBackend()
    orch = _service(tmp_path, backend).orchestrator
    req = ChatCompletionRequest.model_validate(
        {"model": "reverse", "messages": [{"role": "user", "content": "reverse it"}]}
    )

    async def first_chunk_then_close() -> tuple[bytes, list[str]]:
        _, events = await orch.chat_stream(req)
        first = await anext(events)
        await events.aclose()  # type: ignore[attr-defined]
        return first, list(backend.closed)  # before asyncio.run closes what is left over

    first, closed = asyncio.run(first_chunk_then_close())
    assert b'"role": "assistant"' in first and closed == ["reverse"]
