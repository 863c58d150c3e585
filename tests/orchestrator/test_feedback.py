"""POST /v1/feedback refuses duplicate feedback and wrongly typed scores."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from concilium.config import load_config
from concilium.errors import Conflict
from concilium.orchestrator.http import create_app
from concilium.orchestrator.service import build_service
from concilium.outcomes.store import Logged, OutcomeStore
from tests.conftest import FakeBackend, HashEncoder, remote_spec


@pytest.fixture
def client(tmp_path: Path, backend: FakeBackend) -> Iterator[TestClient]:
    cfg = load_config(None, home=tmp_path, seed_embedder=False)
    svc = build_service(cfg, encoder=HashEncoder(), backend=backend, seed=False)
    svc.registry.register(remote_spec("reverse", ["reverse the word"]))
    with TestClient(create_app(svc)) as c:
        yield c


def decision_id(c: TestClient) -> str:
    body = {"messages": [{"role": "user", "content": "reverse the word"}]}
    r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return str(r.json()["routing"]["decision_id"])


def test_duplicate_feedback_is_409_and_keeps_the_first_score(client: TestClient) -> None:
    did = decision_id(client)
    assert client.post("/v1/feedback", json={"decision_id": did, "score": 1.0}).status_code == 200
    r = client.post("/v1/feedback", json={"decision_id": did, "score": 0.0})
    assert r.status_code == 409, r.text
    assert r.json()["error"]["param"] == "decision_id"
    store = client.app.state.service.orchestrator.outcomes  # type: ignore[attr-defined]
    assert store.get(did)["quality"] == 1.0


@pytest.mark.parametrize("score", [True, False, "0.5", "1"])
def test_a_score_of_the_wrong_type_is_400_naming_score(client: TestClient, score: Any) -> None:
    did = decision_id(client)
    r = client.post("/v1/feedback", json={"decision_id": did, "score": score})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "score"
    assert client.post("/v1/feedback", json={"decision_id": did, "score": 1}).status_code == 200


def test_store_feedback_twice_raises_conflict(tmp_path: Path) -> None:
    store = OutcomeStore(tmp_path / "outcomes.sqlite")
    store.log(
        Logged("d1", "q", None, "retriever", "single", ("reverse",), "reverse", 0.0, 1.0, None)
    )
    v0 = store.version()
    assert store.feedback("d1", 0.5)
    with pytest.raises(Conflict, match="d1"):
        store.feedback("d1", 1.0)
    assert store.get("d1")["quality"] == 0.5  # type: ignore[index]
    assert store.version() == v0 + 1
    assert not store.feedback("unknown", 1.0, wait_s=0.0)


def _live(decision_id: str) -> Logged:
    return Logged(decision_id, "q", None, "retriever", "single", ("a",), "a", 0.0, 1.0, None)


def test_a_store_full_of_labelled_rows_still_takes_feedback(tmp_path: Path) -> None:
    store = OutcomeStore(tmp_path / "outcomes.sqlite", max_rows=3)
    for i in range(3):  # as many labelled rows as max_rows (feedback, or an imported table)
        store.log(_live(f"old{i}"))
        store.flush()
        assert store.feedback(f"old{i}", 1.0, wait_s=0.0)
    store.log(_live("new"))
    assert store.feedback("new", 0.5, wait_s=0.0)  # the row just logged is kept
    assert store.count(labelled=True) == 4


def test_max_rows_drops_the_oldest_unlabelled_rows(tmp_path: Path) -> None:
    store = OutcomeStore(tmp_path / "outcomes.sqlite", max_rows=3)
    for i in range(5):
        store.log(_live(f"d{i}"))
        store.flush()
    assert store.count(labelled=False) == 3
    assert store.get("d0") is None and store.get("d1") is None and store.get("d4") is not None
