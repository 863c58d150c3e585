"""Chat answers whose text or routing object the JSON encoder refused (500),
x-concilium-* headers that were no valid header values, streamed answers missing from /metrics."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import h11
import pytest
from fastapi.testclient import TestClient

from concilium.config import load_config
from concilium.orchestrator.http import create_app
from concilium.orchestrator.service import Service, build_service
from concilium.registry.specs import parse_spec
from tests.conftest import FakeBackend, HashEncoder, remote_spec

USER = [{"role": "user", "content": "reverse the word"}]


@pytest.fixture
def service(tmp_path: Path, backend: FakeBackend) -> Service:
    cfg = load_config(None, home=tmp_path, seed_embedder=False)
    svc = build_service(cfg, encoder=HashEncoder(), backend=backend, seed=False)
    svc.registry.register(remote_spec("reverse", ["reverse the word"]))
    return svc


@pytest.fixture
def client(service: Service) -> Iterator[TestClient]:
    with TestClient(create_app(service), raise_server_exceptions=False) as c:
        yield c


def legacy(service: Service, spec: dict[str, object]) -> None:
    """A row stored before today's spec checks (it still loads, see test_http_fuzz_regressions)."""
    artifacts = service.registry.get("reverse").artifacts
    service.registry.store.add(parse_spec(spec, stored=True), artifacts)
    service.orchestrator.catalogs.invalidate()


def valid_headers(headers: dict[str, str]) -> None:
    """What a real HTTP server (h11, under uvicorn) accepts on the wire."""
    h11.Response(status_code=200, headers=[(k, v.encode("latin-1")) for k, v in headers.items()])


def test_an_answer_with_a_lone_surrogate_is_200_not_500(
    client: TestClient, backend: FakeBackend
) -> None:
    backend.answers["reverse"] = "ok \ud83d"  # a remote's JSON may carry a lone \\ud83d escape
    r = client.post("/v1/chat/completions", json={"messages": USER})
    assert r.status_code == 200, r.text
    assert json.loads(r.content)["choices"][0]["message"]["content"] == "ok \ud83d"


def test_a_legacy_expert_with_infinite_latency_answers_with_valid_json(
    client: TestClient, service: Service
) -> None:
    legacy(service, remote_spec("legacy", ["x"], expected_latency_ms=math.inf))
    r = client.post("/v1/chat/completions", json={"model": "legacy", "messages": USER})
    assert r.status_code == 200, r.text
    routing = json.loads(r.content, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert routing["routing"]["estimated_latency_ms"] is None
    valid_headers(dict(r.headers))


def test_a_legacy_name_ending_in_a_newline_makes_valid_headers(
    client: TestClient, service: Service
) -> None:
    legacy(service, remote_spec("nl\n", ["x"]))
    r = client.post("/v1/chat/completions", json={"model": "nl\n", "messages": USER})
    assert r.status_code == 200, r.text
    valid_headers(dict(r.headers))
    assert r.headers["x-concilium-expert"] == "nl%0A"
    with client.stream(
        "POST", "/v1/chat/completions", json={"model": "nl\n", "messages": USER, "stream": True}
    ) as s:
        valid_headers(dict(s.headers))


def test_a_plain_expert_name_is_its_header_unchanged(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"messages": USER})
    assert r.headers["x-concilium-expert"] == "reverse"
    assert r.headers["x-concilium-router"] == "retriever"


def test_streamed_answers_are_counted_in_the_routing_metrics(client: TestClient) -> None:
    for _ in range(2):
        with client.stream(
            "POST", "/v1/chat/completions", json={"messages": USER, "stream": True}
        ) as s:
            lines = [ln for ln in s.iter_lines() if ln]
        assert lines[-1] == "data: [DONE]"
    ens = {"strategy": "ensemble", "max_experts": 2}
    with client.stream(
        "POST", "/v1/chat/completions", json={"messages": USER, "stream": True, "routing": ens}
    ) as s:
        assert [ln for ln in s.iter_lines() if ln][-1] == "data: [DONE]"
    text = client.get("/metrics").text
    assert 'concilium_routing_decisions_total{expert="reverse",router="retriever"} 3.0' in text
    assert 'concilium_strategy_requests_total{strategy="ensemble"} 1.0' in text
    assert 'concilium_expert_calls_total{expert="reverse"} 3.0' in text


def test_ceilings_keep_estimates_finite_and_an_empty_stop_is_refused(client: TestClient) -> None:
    spec = remote_spec("dear", ["reverse the word"], price_in_per_1k=1.797e307)
    r = client.post("/v1/experts", json=spec)
    assert r.status_code == 400 and r.json()["error"]["param"] == "price_in_per_1k", r.text
    huge = remote_spec("big", ["reverse the word"], params_active=10**400)
    r = client.post("/v1/experts", json=huge)
    assert r.status_code == 400 and r.json()["error"]["param"] == "params_active", r.text
    r = client.post("/v1/chat/completions", json={"model": "auto", "messages": USER, "stop": ""})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text
