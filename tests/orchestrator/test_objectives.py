"""Per-request objectives end to end: strategies, the predictive router, feedback, outcomes."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from concilium.config import default_routers, load_config
from concilium.errors import InvalidInput, ObjectiveUnsatisfiable
from concilium.orchestrator.http import create_app
from concilium.orchestrator.objective import Objective
from concilium.orchestrator.service import Service, build_service
from concilium.outcomes import OutcomeStore, OutcomeTable
from tests.conftest import FakeBackend, HashEncoder, remote_spec
from tests.orchestrator.conftest import sample

EXPERTS = [
    remote_spec(
        "reverse",
        ["reverse the word", "spell the word backwards"],
        price_in_per_1k=0.1,
        price_out_per_1k=0.2,
        params_active=1000,
        expected_latency_ms=200,
    ),
    remote_spec(
        "reverse-pro",
        ["reverse the word carefully", "spell the word backwards exactly"],
        price_in_per_1k=1.0,
        price_out_per_1k=2.0,
        params_active=50_000,
        expected_latency_ms=800,
    ),
    remote_spec(
        "math",
        ["add the numbers", "what is the sum of numbers"],
        price_in_per_1k=0.5,
        price_out_per_1k=1.0,
        params_active=3000,
        expected_latency_ms=400,
    ),
]


def _service(home: Path, backend: FakeBackend, experts: list[dict[str, object]]) -> Service:
    # RouterRetriever's plain mean over the two pilots each: soft enough gates that both reverse
    # experts count as adequate for a reverse query (the cascade tests rely on that).
    routers = {**default_routers(), "retriever": {"kind": "retriever", "aggregate": "mean"}}
    cfg = load_config(None, home=home, seed_embedder=False, routers=routers)
    svc = build_service(cfg, encoder=HashEncoder(), backend=backend, seed=False)
    for s in experts:
        svc.registry.register(s)
    return svc


@pytest.fixture
def service(tmp_path: Path, backend: FakeBackend) -> Service:
    return _service(tmp_path, backend, EXPERTS)


@pytest.fixture
def client(service: Service) -> Iterator[TestClient]:
    with TestClient(create_app(service)) as c:
        yield c


def chat(c: TestClient, content: str, **body: object):  # type: ignore[no-untyped-def]
    return c.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": content}], **body}
    )


# -- ensembles ------------------------------------------------------------------------------------
def test_ensemble_runs_members_in_parallel_and_fuses(
    client: TestClient, backend: FakeBackend
) -> None:
    backend.answers = {"reverse": "tenalp", "reverse-pro": "tenalp", "math": "7"}
    r = chat(client, "reverse the word planet", routing={"strategy": "ensemble", "max_experts": 3})
    assert r.status_code == 200, r.text
    rt = r.json()["routing"]
    assert rt["strategy"] == "ensemble" and rt["plan"]["exact"] is True
    ran = {m["expert"] for m in rt["members"]}
    assert {"reverse", "reverse-pro"} <= ran and len(ran) == len(rt["experts"])
    assert r.json()["choices"][0]["message"]["content"] == "tenalp"
    assert rt["cost"] == pytest.approx(sum(m["cost"] for m in rt["members"]))
    assert rt["active_parameters"] == sum(
        {"reverse": 1000, "reverse-pro": 50_000, "math": 3000}[e] for e in ran
    )
    assert rt["fusion"] == "vote" and rt["support"] > 0.5


def test_ensemble_budget_limits_members_and_survives_a_failed_member(
    client: TestClient, backend: FakeBackend
) -> None:
    # 10 prompt + 64 max tokens: reverse ≈ 0.0138, math ≈ 0.069, reverse-pro ≈ 0.138
    r = chat(
        client,
        "reverse the word planet",
        routing={"strategy": "ensemble", "max_experts": 3, "max_cost": 0.1},
    )
    assert r.status_code == 200, r.text
    rt = r.json()["routing"]
    assert "reverse-pro" not in rt["experts"] and rt["estimated_cost"] <= 0.1
    backend.fail = {"reverse-pro"}
    r = chat(client, "reverse the word planet", routing={"strategy": "ensemble", "max_experts": 3})
    members = {m["expert"]: m for m in r.json()["routing"]["members"]}
    assert r.status_code == 200 and members["reverse-pro"]["ok"] is False
    assert r.json()["routing"]["expert"] != "reverse-pro"
    backend.fail = {"reverse", "reverse-pro", "math"}
    r = chat(client, "reverse the word planet", routing={"strategy": "ensemble", "max_experts": 3})
    assert r.status_code in (502, 503) and "every ensemble member failed" in r.text


# -- cascades -------------------------------------------------------------------------------------
def test_cascade_escalates_on_low_confidence_within_budget(
    client: TestClient, backend: FakeBackend
) -> None:
    backend.logprobs = {"reverse": -2.0, "reverse-pro": -0.01}
    body = {"strategy": "cascade", "max_experts": 2}
    r = chat(client, "reverse the word carefully", routing=body)
    rt = r.json()["routing"]
    assert r.status_code == 200, r.text
    assert [m["expert"] for m in rt["members"]] == ["reverse", "reverse-pro"]
    assert rt["expert"] == "reverse-pro" and rt["escalations"] == 1
    backend.logprobs = {"reverse": -0.01}
    rt = chat(client, "reverse the word carefully", routing=body).json()["routing"]
    assert rt["expert"] == "reverse" and rt["escalations"] == 0 and len(rt["members"]) == 1
    backend.logprobs = {"reverse": -2.0}  # unsure, but the budget admits no second stage
    rt = chat(client, "reverse the word carefully", routing=body | {"max_cost": 0.1}).json()[
        "routing"
    ]
    assert rt["expert"] == "reverse" and rt["experts"] == ["reverse"]


def test_streaming_a_multi_expert_plan_sends_the_fused_answer(
    client: TestClient, backend: FakeBackend
) -> None:
    backend.answers = {"reverse": "tenalp", "reverse-pro": "tenalp"}
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "reverse the word planet"}],
            "stream": True,
            "routing": {"strategy": "ensemble", "max_experts": 2},
        },
    ) as r:
        text = "".join(r.iter_text())
    assert r.status_code == 200 and '"content": "tenalp"' in text and "[DONE]" in text


# -- the objective: constraints hold for any catalogue and objective -------------------------------
catalogues = st.lists(
    st.tuples(
        st.floats(0, 2), st.floats(0, 4), st.floats(10, 3000), st.none() | st.floats(0.1, 50)
    ),
    min_size=1,
    max_size=5,
)
objectives = st.fixed_dictionaries(
    {
        "max_cost": st.none() | st.floats(0, 0.3),
        "max_latency_ms": st.none() | st.floats(5, 3000),
        "max_energy_j": st.none() | st.floats(0.1, 5),
        "quality_weight": st.none() | st.floats(0, 1),
        "strategy": st.sampled_from(["single", "ensemble", "cascade"]),
        "max_experts": st.integers(1, 4),
        "allowed": st.none() | st.sets(st.integers(0, 4), max_size=3),
    }
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(catalogue=catalogues, obj=objectives, router=st.sampled_from(["retriever", "predictive"]))
def test_plans_never_violate_the_objective(
    catalogue: list[tuple[float, float, float, float | None]], obj: dict, router: str
) -> None:
    experts = [
        remote_spec(
            f"e{i}",
            [f"task {i} query", f"do task {i}"],
            price_in_per_1k=p_in,
            price_out_per_1k=p_out,
            expected_latency_ms=lat,
            energy_j_per_1k_tokens=energy,
        )
        for i, (p_in, p_out, lat, energy) in enumerate(catalogue)
    ]
    allowed = (
        None
        if obj["allowed"] is None
        else frozenset(f"e{i}" for i in obj["allowed"] if i < len(catalogue))
    )
    objective = Objective(
        max_cost=obj["max_cost"],
        max_latency_ms=obj["max_latency_ms"],
        max_energy_j=obj["max_energy_j"],
        allowed=allowed,
        quality_weight=obj["quality_weight"],
        strategy=obj["strategy"],
        max_experts=1 if obj["strategy"] == "single" else obj["max_experts"],
    )
    with tempfile.TemporaryDirectory() as home:
        svc = _service(Path(home), FakeBackend(), experts)
        orch = svc.orchestrator
        try:
            routed = orch.route("do task 0 now", model=f"router-{router}", objective=objective)
        except ObjectiveUnsatisfiable as e:
            assert e.field in {
                "routing.max_cost",
                "routing.max_latency_ms",
                "routing.max_energy_j",
                "routing.allowed_experts",
            }
            return
        except InvalidInput as e:  # an empty allowed set names unknown experts: never here
            pytest.fail(str(e))
        chosen = (
            list(orch.plan(routed).experts)
            if obj["strategy"] != "single"
            else [routed.decision.expert]
        )
        cands = [routed.candidates[n] for n in chosen]
        assert len(cands) <= objective.max_experts
        if allowed is not None:
            assert set(chosen) <= allowed
        if objective.max_cost is not None:
            assert sum(c.est_cost for c in cands) <= objective.max_cost * (1 + 1e-9)
        if objective.max_latency_ms is not None:
            lats = [c.est_latency_ms for c in cands]
            total = sum(lats) if obj["strategy"] == "cascade" else max(lats)
            assert total <= objective.max_latency_ms
        if objective.max_energy_j is not None:
            assert sum(c.est_energy_j or np.inf for c in cands) <= objective.max_energy_j
        # fallbacks stay inside the filtered (allowed, affordable) candidates
        assert set(orch._order(routed)) <= set(routed.candidates)


def test_unsatisfiable_objective_is_422_naming_the_field(client: TestClient) -> None:
    for routing, field in [
        ({"max_cost": 1e-9}, "routing.max_cost"),
        ({"max_latency_ms": 1}, "routing.max_latency_ms"),
        ({"max_energy_j": 1}, "routing.max_energy_j"),
        ({"strategy": "ensemble", "max_cost": 1e-9}, "routing.max_cost"),
    ]:
        r = chat(client, "reverse the word", routing=routing)
        assert r.status_code == 422, (routing, r.text)
        assert r.json()["error"]["param"] == field


# -- the predictive router: cost trade-off, cold start, feedback -----------------------------------
def test_quality_weight_trades_quality_for_cost(client: TestClient) -> None:
    q = "reverse the word carefully exactly"
    dear = chat(client, q, model="router-predictive", routing={"quality_weight": 1.0})
    cheap = chat(client, q, model="router-predictive", routing={"quality_weight": 0.0})
    assert dear.json()["routing"]["expert"] == "reverse-pro"
    assert cheap.json()["routing"]["expert"] == "reverse"  # the cheapest candidate
    d, c = dear.json()["routing"], cheap.json()["routing"]
    # quality_weight 1: the scores are the predicted qualities, the reversal experts first
    assert d["scores"]["reverse-pro"] > d["scores"]["reverse"] > d["scores"]["math"], d
    assert d["confidence"] == pytest.approx(d["scores"]["reverse-pro"], abs=1e-5)
    # quality_weight 0: the scores are minus the cost relative to the dearest candidate
    assert sorted(c["scores"], key=c["scores"].__getitem__, reverse=True) == [
        "reverse",
        "math",
        "reverse-pro",
    ]
    assert c["scores"]["reverse-pro"] == pytest.approx(-1.0, abs=1e-5)
    ratio = c["estimated_cost"] / d["estimated_cost"]
    assert c["scores"]["reverse"] == pytest.approx(-ratio, abs=1e-5), (c, d)
    # the cheap pick's confidence is still its predicted quality
    assert c["confidence"] == pytest.approx(d["scores"]["reverse"], abs=1e-5)


def test_feedback_changes_later_routing_without_restart(
    client: TestClient, service: Service
) -> None:
    q = "reverse the word carefully exactly"
    first = chat(client, q, model="router-predictive").json()["routing"]
    assert first["expert"] == "reverse-pro"
    for _ in range(3):  # reverse-pro keeps getting it wrong on this query
        d = chat(client, q, model="router-predictive").json()["routing"]
        r = client.post("/v1/feedback", json={"decision_id": d["decision_id"], "score": 0.0})
        assert r.status_code == 200, r.text
    router = service.orchestrator.routers["predictive"]
    router.config.refresh_s = 0.0  # do not wait for the periodic version check
    after = chat(client, q, model="router-predictive").json()["routing"]
    assert after["expert"] == "reverse"
    stored = service.orchestrator.outcomes.get(first["decision_id"])  # type: ignore[union-attr]
    assert stored is not None and stored["expert"] == "reverse-pro" and stored["quality"] is None


def test_new_expert_without_outcomes_is_routed_from_its_pilots(
    client: TestClient, service: Service
) -> None:
    client.post("/v1/feedback", json={"decision_id": "nope", "score": 1.0})
    service.registry.register(remote_spec("translate", ["translate to french", "say it in french"]))
    service.orchestrator.catalogs.invalidate()
    r = chat(client, "translate to french: cat", model="router-predictive")
    assert r.json()["routing"]["expert"] == "translate"


def test_feedback_errors_are_clear(client: TestClient) -> None:
    r = client.post("/v1/feedback", json={"decision_id": "unknown", "score": 1.0})
    assert r.status_code == 404 and r.json()["error"]["param"] == "decision_id"
    r = client.post("/v1/feedback", json={"decision_id": "x", "score": 2.0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "score"
    assert client.post("/v1/feedback", json={"score": 1.0}).status_code == 400


def test_metrics_report_strategies_and_average_active_parameters(
    client: TestClient,
) -> None:
    one = chat(client, "reverse the word planet").json()["routing"]
    two = chat(
        client, "reverse the word planet", routing={"strategy": "ensemble", "max_experts": 2}
    ).json()["routing"]
    assert one["expert"] == "reverse"
    assert [m["expert"] for m in two["members"]] == ["reverse", "reverse-pro"]
    text = client.get("/metrics").text
    assert sample(text, "concilium_strategy_requests_total", strategy="ensemble") == 1.0
    assert sample(text, "concilium_strategy_requests_total", strategy="single") == 1.0
    mean = (one["active_parameters"] + two["active_parameters"]) / 2  # (1000 + 51000) / 2
    assert sample(text, "concilium_active_parameters_mean") == pytest.approx(mean)
    assert sample(text, "concilium_expert_calls_total", expert="reverse") == 2.0
    assert sample(text, "concilium_expert_calls_total", expert="reverse-pro") == 1.0


# -- outcome store and RouterBench import ----------------------------------------------------------
def _table() -> OutcomeTable:
    return OutcomeTable(
        sample_ids=["q1", "q2"],
        prompts=["reverse the word cat", "add the numbers 2 3"],
        families=["strings", "math"],
        experts=["reverse", "math"],
        quality=np.array([[1.0, 0.0], [0.0, 1.0]]),
        cost=np.array([[0.01, 0.02], [0.01, 0.02]]),
        latency_ms=np.array([[10.0, 20.0], [10.0, 20.0]]),
        confidence=np.array([[-0.1, np.nan], [-2.0, -0.05]]),
        answers=[["tac", "?"], ["?", "5"]],
    )


def test_routerbench_csv_roundtrip_and_import(tmp_path: Path) -> None:
    t = _table()
    back = OutcomeTable.read(t.write(tmp_path / "o.csv"))
    assert back.experts == t.experts and back.families == t.families
    np.testing.assert_allclose(back.quality, t.quality)
    np.testing.assert_allclose(back.confidence, t.confidence)
    assert back.answers == t.answers
    store = OutcomeStore(tmp_path / "outcomes.sqlite")
    v0 = store.version()
    emb = HashEncoder().encode(back.prompts)
    assert store.import_table(back, emb, source="demo") == 4
    assert store.import_table(back, emb, source="demo") == 4  # re-import replaces
    assert store.count(labelled=True) == 4 and store.version() > v0
    rows = store.labelled(emb.shape[1])
    assert sorted(rows.experts) == ["math", "math", "reverse", "reverse"]


def test_bad_outcome_tables_are_refused_with_a_reason(tmp_path: Path) -> None:
    p = tmp_path / "bad.csv"
    p.write_text("prompt,a\nhello,1\n")
    with pytest.raises(InvalidInput, match="no expert columns"):
        OutcomeTable.read(p)
    p.write_text("prompt,a,a|total_cost\nhello,yes,0.1\n")
    with pytest.raises(InvalidInput, match="not a number"):
        OutcomeTable.read(p)
    p.write_text("prompt,a,a|total_cost\nhello,1,-1\n")
    with pytest.raises(InvalidInput, match="negative cost"):
        OutcomeTable.read(p)
    with pytest.raises(InvalidInput, match="does not exist"):
        OutcomeTable.read(tmp_path / "missing.csv")
