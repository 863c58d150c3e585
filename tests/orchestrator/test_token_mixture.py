"""A token-level mixture answered by a fake backend over the demo pack's real adapters: what its
routing object reports."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from concilium.config import load_config
from concilium.orchestrator.http import create_app
from concilium.orchestrator.service import build_service, pack_expert
from tests.conftest import FakeBackend, HashEncoder

BASE_ACTIVE = 874_240  # the pack base's declared active parameters
OWN = {"reverse": 1000, "uppercase": 3000, "rotate": 2000}  # declared per adapter, on top
MIXTURE = {"token_routing": {"router": "arrow", "top_k": 2, "candidates": 3}}


@pytest.fixture
def client(tmp_path: Path, pack_dir: Path, backend: FakeBackend) -> Iterator[TestClient]:
    cfg = load_config(None, home=tmp_path, seed_embedder=False, train_gates=False)
    svc = build_service(cfg, encoder=HashEncoder(), backend=backend, seed=False)
    svc.registry.register(pack_expert(pack_dir, "demo-moe") | {"params_active": BASE_ACTIVE})
    for name, own in OWN.items():
        svc.registry.register(pack_expert(pack_dir, name) | {"params_active": BASE_ACTIVE + own})
    with TestClient(create_app(svc)) as c:
        yield c


def _post(c: TestClient, model: str, **body: object) -> tuple[dict[str, object], str]:
    """(routing object, x-concilium-active-params header) of a chat answer, streamed or not."""
    msgs = [{"role": "user", "content": "reverse the word planet"}]
    r = c.post("/v1/chat/completions", json={"model": model, "messages": msgs, **body})
    assert r.status_code == 200, r.text
    if not body.get("stream"):
        return r.json()["routing"], r.headers["x-concilium-active-params"]
    chunks = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
    return chunks[-1]["routing"], r.headers["x-concilium-active-params"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_mixture_reports_its_base_plus_its_top_k_largest_adapters(
    client: TestClient, backend: FakeBackend, stream: bool
) -> None:
    routing, header = _post(client, "demo-moe:mixture", routing=MIXTURE, stream=stream)
    mixed = backend.calls[-1][2].token_routing
    assert mixed is not None and {a for a, _ in mixed.adapters} == set(OWN)
    assert routing["expert"] == "reverse"  # routed to the smallest adapter
    want = BASE_ACTIVE + OWN["uppercase"] + OWN["rotate"]  # top_k=2 largest, whichever mixed
    assert routing["active_parameters"] == want and header == str(want)


def test_one_adapter_alone_still_reports_its_own_parameters(client: TestClient) -> None:
    routing, header = _post(client, "reverse")
    assert routing["active_parameters"] == BASE_ACTIVE + OWN["reverse"]
    assert header == str(BASE_ACTIVE + OWN["reverse"])


def test_a_uniform_mixture_reports_every_candidate(
    client: TestClient, backend: FakeBackend
) -> None:
    """`uniform` merges every candidate on every token whatever top_k says: all of them count."""
    uniform = {"token_routing": MIXTURE["token_routing"] | {"router": "uniform"}}
    routing, header = _post(client, "auto", routing=uniform)
    mixed = backend.calls[-1][2].token_routing
    assert mixed is not None and mixed.router == "uniform"
    assert {a for a, _ in mixed.adapters} == set(OWN)
    want = BASE_ACTIVE + sum(OWN.values())
    assert routing["active_parameters"] == want and header == str(want)
