"""In-process end to end on the demo pack, real encoder: route, answer, live registration."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from concilium.config import load_config
from concilium.orchestrator.http import create_app
from concilium.orchestrator.service import build_service, pack_expert
from tests.conftest import pilot_query

ADMIN = {"Authorization": "Bearer k"}


@pytest.fixture(scope="module")
def setup(pack_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:  # type: ignore[type-arg]
    home = tmp_path_factory.mktemp("home")
    # no PHATGOOSE gates: this module mixes with Arrow, and 10 background trainings would only
    # load the CPU for the rest of the suite (tests/registry covers gates at registration)
    cfg = load_config(None, home=home, pack=pack_dir, admin_api_key="k", train_gates=False)
    svc = build_service(cfg)
    manifest = json.loads((pack_dir / "manifest.json").read_text())
    rows = [json.loads(x) for x in (pack_dir / "heldout.jsonl").read_text().splitlines() if x]
    with TestClient(create_app(svc)) as client:
        yield client, manifest, rows, svc


def _ask(client: TestClient, q: str, **kw: object) -> dict:  # type: ignore[type-arg]
    r = client.post(
        "/v1/chat/completions",
        json={"model": "auto", "messages": [{"role": "user", "content": q}], **kw},
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_seeded_registry_has_the_default_experts_only(setup: tuple) -> None:  # type: ignore[type-arg]
    client, manifest, _, _ = setup
    names = {e["name"] for e in client.get("/v1/experts").json()["data"]}
    default = {e["name"] for e in manifest["experts"] if e["default"]}
    held = {e["name"] for e in manifest["experts"] if not e["default"]}
    assert default <= names and not (held & names) and len(held) >= 2
    assert manifest["base"]["name"] in names and "minilm" in names


def test_auto_answers_each_default_skill(setup: tuple) -> None:  # type: ignore[type-arg]
    client, manifest, _, _ = setup
    for e in [e for e in manifest["experts"] if e["default"]][:4]:
        query, answer = pilot_query(manifest, e["name"])
        body = _ask(client, query)
        assert body["routing"]["expert"] == e["name"]
        assert body["choices"][0]["message"]["content"] == answer
        assert body["routing"]["active_parameters"] > 0
        assert body["routing"]["reason"].startswith("pilot late interaction")


def test_live_registration_routes_the_next_query(setup: tuple) -> None:  # type: ignore[type-arg]
    client, manifest, _, svc = setup
    held = next(e for e in manifest["experts"] if not e["default"])
    query, answer = pilot_query(manifest, held["name"])
    before = _ask(client, query)
    assert before["routing"]["expert"] != held["name"]
    spec = pack_expert(Path(svc.config.pack), held["name"])  # type: ignore[arg-type]
    r = client.post("/v1/experts", json=spec, headers=ADMIN)
    assert r.status_code == 201, r.text
    t0 = time.perf_counter()
    after = _ask(client, query)
    elapsed = time.perf_counter() - t0
    assert after["routing"]["expert"] == held["name"]
    assert after["choices"][0]["message"]["content"] == answer
    print(f"registration->first routed answer: {elapsed * 1000:.0f} ms")


def test_embeddings_with_the_packaged_encoder(setup: tuple) -> None:  # type: ignore[type-arg]
    client = setup[0]
    r = client.post("/v1/embeddings", json={"model": "minilm", "input": ["a cat", "a dog"]})
    assert r.status_code == 200
    vecs = [d["embedding"] for d in r.json()["data"]]
    assert len(vecs) == 2 and len(vecs[0]) == 384


def test_token_level_mixture_through_the_gateway(setup: tuple) -> None:  # type: ignore[type-arg]
    client, manifest, _, _ = setup
    query, answer = pilot_query(manifest, "reverse")
    base = manifest["base"]["name"]
    # one candidate: the mixture is exactly the routed adapter
    body = _ask(
        client,
        query,
        model=f"{base}:mixture",
        routing={"token_routing": {"router": "arrow", "top_k": 1, "candidates": 1}},
    )
    tr = body["routing"]["token_routing"]
    assert (
        body["routing"]["expert"] == "reverse"
        and body["choices"][0]["message"]["content"] == answer
    )
    assert tr["router"] == "arrow"
    # several candidates under the global prior: shares over the candidates sum to one
    body = _ask(
        client, query, routing={"token_routing": {"router": "arrow", "top_k": 2, "candidates": 4}}
    )
    shares = body["routing"]["token_routing"]["adapter_shares"]
    assert len(shares) <= 4 and abs(sum(shares.values()) - 1.0) < 1e-3
    r = client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": query}],
            "routing": {"token_routing": {"router": "arrow"}, "strategy": "ensemble"},
        },
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "routing.token_routing"


def test_ensemble_fused_at_the_logit_level(setup: tuple) -> None:  # type: ignore[type-arg]
    client, manifest, rows, svc = setup
    from concilium.experts.base import GenParams, LogitFusionParams

    query = next(r["query"] for r in rows if r["skill"] == "reverse")
    body = _ask(
        client,
        query,
        max_tokens=16,
        routing={"strategy": "ensemble", "fusion": "logits", "max_experts": 3},
    )
    routing = body["routing"]
    experts = routing["experts"]
    assert len(experts) >= 2, routing  # a plan of one would fuse nothing
    assert routing["logit_fused"] == [experts]  # every member is on the demo base: one call
    members = routing["members"]
    assert [m["expert"] for m in members] == experts and all(m["ok"] for m in members)
    assert len({m["mean_logprob"] for m in members}) == 1  # one generation, shared
    assert routing["cost"] == pytest.approx(sum(m["cost"] for m in members))
    # the answer is the decode loop's mixture of exactly those adapters with the plan's weights
    lm = svc.backend.model(Path(svc.config.pack) / manifest["base"]["path"])
    path = {e["name"]: str(Path(svc.config.pack) / e["path"]) for e in manifest["experts"]}
    mix = LogitFusionParams(
        tuple(None if n == manifest["base"]["name"] else (n, path[n]) for n in experts),
        tuple(routing["weights"]),
    )
    msgs = [{"role": "user", "content": query}]
    want = lm.generate(msgs, GenParams(max_tokens=16, fusion=mix)).text
    assert body["choices"][0]["message"]["content"] == want
    # fusion is an ensemble's: any other strategy refuses it, naming the field
    r = client.post(
        "/v1/chat/completions",
        json={"messages": msgs, "routing": {"fusion": "logits"}},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "routing.fusion"
