"""The OpenAI-compatible app end to end over real registry + routers, with a fake expert backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from concilium.config import load_config
from concilium.orchestrator.http import create_app
from concilium.orchestrator.service import Service, build_service
from tests.conftest import FakeBackend, HashEncoder, remote_spec
from tests.orchestrator.conftest import ADMIN, EXPERTS, sample


def chat(c: TestClient, content: str, **body: object):  # type: ignore[no-untyped-def]
    return c.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": content}], **body}
    )


def test_auto_routes_and_reports_routing(client: TestClient, backend: FakeBackend) -> None:
    r = chat(client, "please reverse the word planet")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == "reverse:please reverse the word planet"
    rt = body["routing"]
    assert rt["expert"] == "reverse" and rt["router"] == "retriever"
    assert set(rt["scores"]) == {"reverse", "math"}  # embed experts are not chat candidates
    assert rt["active_parameters"] == 1000 and rt["cost"] == pytest.approx(
        (10 * 0.1 + 5 * 0.2) / 1000
    )
    h = r.headers
    assert h["x-concilium-expert"] == "reverse" and h["x-concilium-router"] == "retriever"
    assert h["x-concilium-decision-id"] == rt["decision_id"]
    assert json.loads(h["x-concilium-scores"])["reverse"] == rt["scores"]["reverse"]
    assert float(h["x-concilium-cost"]) == pytest.approx(rt["cost"])
    assert rt["estimated_cost"] > 0
    assert float(h["x-concilium-estimated-cost"]) == pytest.approx(rt["estimated_cost"])
    assert float(h["x-concilium-confidence"]) == pytest.approx(rt["confidence"], abs=6e-5)
    assert float(h["x-concilium-latency-ms"]) == pytest.approx(rt["latency_ms"], abs=0.06)
    assert int(h["x-concilium-active-params"]) == rt["active_parameters"] == 1000
    assert backend.calls[-1][0] == "reverse"


def test_model_grammar(client: TestClient) -> None:
    assert chat(client, "reverse it", model="math").json()["routing"]["expert"] == "math"
    assert chat(client, "add", model="router-random").json()["routing"]["router"] == "random"
    r = chat(client, "x", model="router-nope")
    assert r.status_code == 404 and "router-nope" in r.json()["error"]["message"]
    r = chat(client, "x", model="gpt-4")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = chat(client, "x", model="demo:reverse")
    assert r.status_code == 404 and "not an adapter" in r.json()["error"]["message"]
    r = chat(client, "x", model="embedder")
    assert r.status_code == 400 and "embed expert" in r.json()["error"]["message"]


def test_objective_filters_and_unsatisfiable_is_422(client: TestClient) -> None:
    r = chat(client, "add the numbers 2 and 3", routing={"excluded_experts": ["math"]})
    assert r.json()["routing"]["expert"] == "reverse"
    r = chat(client, "add the numbers", routing={"max_cost": 1e-9})
    assert r.status_code == 422
    assert r.json()["error"]["param"] == "routing.max_cost" and "max_cost" in r.text
    r = chat(client, "add the numbers", model="math", routing={"max_latency_ms": 300})
    assert r.status_code == 422 and r.json()["error"]["param"] == "routing.max_latency_ms"
    r = chat(client, "x", routing={"allowed_experts": ["ghost"]})
    assert r.status_code == 400 and "ghost" in r.text


def test_fallback_stays_inside_the_allowed_set(client: TestClient, backend: FakeBackend) -> None:
    backend.fail.add("reverse")
    r = chat(client, "reverse the word")
    assert r.status_code == 200 and r.json()["routing"]["expert"] == "math"
    assert r.json()["routing"]["fallbacks"] == ["math"]
    r = chat(client, "reverse the word", routing={"allowed_experts": ["reverse"]})
    assert r.status_code == 503 and "down" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 5}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 3}, "n"),
        (
            {"messages": [{"role": "user", "content": "x"}], "routing": {"max_cost": -1}},
            "routing.max_cost",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "routing": {"bogus": 1}},
            "routing.bogus",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "routing": {"strategy": "vote"}},
            "routing.strategy",
        ),
    ],
)
def test_bad_requests_are_400_naming_the_field(client: TestClient, body: dict, param: str) -> None:
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_non_json_body_is_400(client: TestClient) -> None:
    r = client.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400


def test_streaming_emits_openai_chunks(client: TestClient) -> None:
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "reverse the word"}], "stream": True},
    ) as r:
        assert r.status_code == 200 and r.headers["x-concilium-expert"] == "reverse"
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert (
        text == "reverse:reverse the word" and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    )


def test_models_lists_routers_and_experts(client: TestClient) -> None:
    ids = {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert {
        "auto",
        "router-retriever",
        "router-category",
        "router-random",
        "reverse",
        "math",
        "embedder",
    } <= ids


def test_expert_admin_needs_the_key(client: TestClient) -> None:
    spec = remote_spec("upper", ["make it upper case"])
    assert client.post("/v1/experts", json=spec).status_code == 401
    assert (
        client.post("/v1/experts", json=spec, headers={"Authorization": "Bearer no"}).status_code
        == 401
    )
    r = client.post("/v1/experts", json=spec, headers=ADMIN)
    assert r.status_code == 201 and r.json()["name"] == "upper"
    assert client.post("/v1/experts", json=spec, headers=ADMIN).status_code == 409
    assert chat(client, "make it upper case please").json()["routing"]["expert"] == "upper"
    assert client.delete("/v1/experts/upper").status_code == 401
    assert client.delete("/v1/experts/upper", headers=ADMIN).status_code == 200
    assert client.get("/v1/experts/upper").status_code == 404
    assert "upper" not in {e["name"] for e in client.get("/v1/experts").json()["data"]}
    assert chat(client, "make it upper case please").json()["routing"]["expert"] != "upper"


@pytest.mark.parametrize(
    ("spec", "param"),
    [
        ({"kind": "remote", "name": "x"}, "url"),
        ({"kind": "alien", "name": "x"}, "kind"),
        (remote_spec("x", [], url="file:///etc/passwd"), None),
    ],
)
def test_bad_registration_is_4xx_and_registry_unchanged(
    client: TestClient, spec: dict, param: str | None
) -> None:
    before = client.get("/v1/experts").json()["version"]
    r = client.post("/v1/experts", json=spec, headers=ADMIN)
    assert r.status_code == 400, r.text
    if param:
        assert r.json()["error"]["param"] == param
    assert client.get("/v1/experts").json()["version"] == before


def test_embeddings_route_among_embed_experts(client: TestClient) -> None:
    r = client.post("/v1/embeddings", json={"input": ["hello", "abc"]})
    assert r.status_code == 200
    body = r.json()
    assert body["routing"]["expert"] == "embedder" and len(body["data"]) == 2
    assert body["data"][1]["embedding"] == [3.0, 1.0]
    assert client.post("/v1/embeddings", json={"input": []}).status_code == 400


@pytest.mark.parametrize("strategy", ["ensemble", "cascade"])
def test_embeddings_refuse_a_multi_expert_strategy(client: TestClient, strategy: str) -> None:
    body = {"input": ["hello"], "routing": {"strategy": strategy}}
    r = client.post("/v1/embeddings", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "routing.strategy", r.text
    single = {"input": ["hello"], "routing": {"strategy": "single"}}
    assert client.post("/v1/embeddings", json=single).status_code == 200


def test_embeddings_in_base64_as_the_openai_client_asks(client: TestClient) -> None:
    import base64

    import numpy as np

    r = client.post("/v1/embeddings", json={"input": ["abc"], "encoding_format": "base64"})
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    assert np.frombuffer(raw, dtype="<f4").tolist() == [3.0, 1.0]


def test_health(client: TestClient) -> None:
    assert client.get("/health").json() == {
        "status": "ok",
        "instance": "local",
        "registry_version": 3,
        "registry_source": "store",
        "experts": 3,
    }


def test_metrics_count_requests_decisions_and_fallbacks(
    client: TestClient, backend: FakeBackend
) -> None:
    chat(client, "reverse the word")
    backend.fail.add("reverse")
    chat(client, "reverse the word")
    chat(client, "x", model="gpt-4")
    text = client.get("/metrics").text
    assert 'concilium_routing_decisions_total{expert="reverse",router="retriever"} 1.0' in text
    assert 'concilium_routing_decisions_total{expert="math",router="retriever"} 1.0' in text
    assert 'concilium_fallbacks_total{expert="reverse"} 1.0' in text
    assert 'concilium_requests_total{endpoint="/v1/chat/completions",status="200"} 2.0' in text
    assert 'concilium_requests_total{endpoint="/v1/chat/completions",status="404"} 1.0' in text
    assert "concilium_active_parameters_count 1.0" in text
    # the fake reports 10 prompt and 5 completion tokens; prices are per 1k tokens
    assert sample(text, "concilium_cost_total", expert="reverse") == pytest.approx(
        (10 * 0.1 + 5 * 0.2) / 1000
    )
    assert sample(text, "concilium_cost_total", expert="math") == pytest.approx(
        (10 * 1.0 + 5 * 2.0) / 1000
    )


def test_user_keys_guard_inference_but_not_health(tmp_path: Path, backend: FakeBackend) -> None:
    cfg = load_config(
        None, home=tmp_path, admin_api_key="s3cret", api_keys=["u1"], seed_embedder=False
    )
    svc = build_service(cfg, encoder=HashEncoder(), backend=backend, seed=False)
    svc.registry.register(EXPERTS[0])
    with TestClient(create_app(svc)) as c:
        body = {"messages": [{"role": "user", "content": "reverse it"}]}
        assert c.post("/v1/chat/completions", json=body).status_code == 401
        bad = {"Authorization": "Bearer nope"}
        assert c.post("/v1/chat/completions", json=body, headers=bad).status_code == 401
        for key in ("u1", "s3cret"):
            h = {"Authorization": f"Bearer {key}"}
            assert c.post("/v1/chat/completions", json=body, headers=h).status_code == 200
            assert c.get("/v1/models", headers=h).status_code == 200
        assert c.get("/v1/models").status_code == 401
        assert c.get("/health").status_code == 200


def test_an_expert_registered_by_another_process_is_usable_at_once(
    client: TestClient, tmp_path: Path, backend: FakeBackend
) -> None:
    assert chat(client, "hello", model="reverse").status_code == 200  # catalog now cached
    other = build_service(
        load_config(None, home=tmp_path, seed_embedder=False),
        encoder=HashEncoder(),
        backend=backend,
        seed=False,
    )
    other.registry.register(remote_spec("fresh", ["brand new skill"]))
    # never re-checked by age (longer than any uptime): only the re-lookup on a miss finds it
    svc: Service = client.app.state.service  # type: ignore[attr-defined]
    svc.orchestrator.catalogs.refresh_s = 1e9
    r = chat(client, "hello", model="fresh")
    assert r.status_code == 200, r.text
    assert chat(client, "hello", model="never-registered").status_code == 404
