"""One plain example per bug that test_http_fuzz.py found, so each stays covered whatever
hypothesis happens to draw."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from concilium.config import load_config
from concilium.errors import SpecError
from concilium.orchestrator.http import create_app
from concilium.orchestrator.service import build_service
from concilium.outcomes.store import Logged, OutcomeStore
from concilium.registry.specs import parse_spec
from tests.conftest import FakeBackend, HashEncoder, remote_spec

ADMIN = {"Authorization": "Bearer s3cret"}
JSON_CT = {"content-type": "application/json"}
USER = [{"role": "user", "content": "reverse the word"}]


@pytest.fixture
def client(tmp_path: Path, backend: FakeBackend) -> Iterator[TestClient]:
    cfg = load_config(None, home=tmp_path, admin_api_key="s3cret", seed_embedder=False)
    svc = build_service(cfg, encoder=HashEncoder(), backend=backend, seed=False)
    svc.registry.register(remote_spec("reverse", ["reverse the word"]))
    svc.registry.register(remote_spec("embedder", ["embed text"], task="embed"))
    with TestClient(create_app(svc)) as c:
        yield c


def post(c: TestClient, path: str, body: Any, headers: dict[str, str] | None = None) -> Any:
    """POST `body` encoded as Python's json does: NaN / Infinity literals, lone surrogates as
    \\ud800 escapes (what a client sending such values puts on the wire)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return c.post(path, content=raw, headers=JSON_CT | (headers or {}))


def error_of(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return dict(err)


# -- bug: a body that is no JSON object reported param "" or the decode position --------------


@pytest.mark.parametrize(
    ("raw", "says"),
    [(b"{not json", "not valid JSON"), (b"", "Field required"), (b"[1]", "dictionary")],
)
def test_errors_about_the_whole_body_name_no_field(
    client: TestClient, raw: bytes, says: str
) -> None:
    err = error_of(post(client, "/v1/chat/completions", raw), 400)
    assert err["param"] is None and says in err["message"]


# -- bug: Starlette's own errors answered {"detail": ...}, not the error envelope -------------


def test_no_such_route_wrong_method_and_unreadable_body_use_the_error_envelope(
    client: TestClient,
) -> None:
    assert "Not Found" in error_of(client.get("/v1/experts/a%2Fb"), 404)["message"]
    assert error_of(client.put("/v1/experts"), 405)["message"]
    assert error_of(post(client, "/v1/chat/completions", b"\xff"), 400)["message"]


# -- bug: a lone UTF-16 surrogate in any text was a 500 (or worse) ----------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "\ud800"}]},
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "stream": True, "model": "a\udfff"},
            "model",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
            "messages.0.content",
        ),
        ("/v1/chat/completions", {"messages": USER, "stop": ["ok", "\ud800"]}, "stop"),
        (
            "/v1/chat/completions",
            {"messages": USER, "routing": {"excluded_experts": ["\ud800"]}},
            "routing.excluded_experts",
        ),
        ("/v1/embeddings", {"input": ["ok", "\ud800"]}, "input"),
        ("/v1/feedback", {"decision_id": "\ud800", "score": 1}, "decision_id"),
    ],
)
def test_lone_surrogates_are_400_naming_the_field(
    client: TestClient, path: str, body: dict[str, Any], param: str
) -> None:
    err = error_of(post(client, path, body), 400)
    # (pydantic refuses such text itself where a length limit applies; a union's param ends in
    # the member tried first: "messages.0.content.str")
    assert err["param"].startswith(param) and "unicode" in err["message"].lower(), err


def test_a_surrogate_sent_as_raw_utf8_bytes_is_refused_too(client: TestClient) -> None:
    raw = b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}'
    assert error_of(post(client, "/v1/chat/completions", raw), 400)["param"] == "messages.0.content"


def test_a_surrogate_query_no_longer_stops_outcome_logging(client: TestClient) -> None:
    """The embeddings query reached the outcome writer, whose thread died holding SQLite's write
    lock: every later feedback waited 30 s and failed with 'database is locked'."""
    assert post(client, "/v1/embeddings", {"input": "\ud800"}).status_code == 400
    r = post(client, "/v1/chat/completions", {"messages": USER})
    decision_id = r.json()["routing"]["decision_id"]
    r = post(client, "/v1/feedback", {"decision_id": decision_id, "score": 1})
    assert r.status_code == 200, r.text
    store = client.app.state.service.orchestrator.outcomes  # type: ignore[attr-defined]
    assert store._writer is not None and store._writer.is_alive()  # the writer survived
    stored = store.get(decision_id)
    assert stored is not None and stored["quality"] == 1.0  # the score was written


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"description": "bad \ud800"}, "description"),
        ({"model_name": "\ud800"}, "model_name"),
        ({"tags": ["\ud800"]}, "tags"),
        ({"categories": ["ok", "\udfff"]}, "categories"),
        ({"api_key_env": "\ud800"}, "api_key_env"),
    ],
)
def test_registration_with_a_surrogate_is_400_and_stores_nothing(
    client: TestClient, extra: dict[str, Any], param: str
) -> None:
    """The row was committed, then rendering the 201 failed: a 500 for a stored expert."""
    before = client.get("/v1/experts").json()
    r = post(client, "/v1/experts", remote_spec("odd", ["x"], **extra), ADMIN)
    assert error_of(r, 400)["param"] == param
    assert client.get("/v1/experts").json() == before


# -- bug: a non-finite number in a spec was stored, then the 201 was a 500 --------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("expected_latency_ms", math.inf),
        ("price_in_per_1k", math.inf),
        ("price_out_per_1k", math.inf),
        ("energy_j_per_1k_tokens", math.inf),
        ("expected_latency_ms", math.nan),
    ],
)
def test_non_finite_spec_numbers_are_400_and_store_nothing(
    client: TestClient, field: str, value: float
) -> None:
    before = client.get("/v1/experts").json()
    r = post(client, "/v1/experts", remote_spec("inf", ["x"], **{field: value}), ADMIN)
    assert error_of(r, 400)["param"] == field
    assert client.get("/v1/experts").json() == before


def test_rows_stored_before_the_new_checks_still_load() -> None:
    old = remote_spec("legacy", ["x"], expected_latency_ms=math.inf, tags=["\ud800"])
    with pytest.raises(SpecError):
        parse_spec(old)
    assert parse_spec(old, stored=True).expected_latency_ms == math.inf


# -- bug: the outcome writer died on any error that was not sqlite3.Error, holding the lock -----


def _logged(decision_id: str, query: str) -> Logged:
    return Logged(
        decision_id=decision_id,
        query=query,
        embedding=None,
        router="retriever",
        strategy="single",
        experts=("reverse",),
        expert="reverse",
        cost=0.0,
        latency_ms=1.0,
        active_params=None,
    )


def test_outcome_writer_survives_a_batch_it_cannot_write(tmp_path: Path) -> None:
    store = OutcomeStore(tmp_path / "outcomes.sqlite")
    store.log(_logged("bad", "\ud800"))  # no UTF-8 encoding: the insert raises
    store.flush()
    store.log(_logged("good", "fine"))
    assert store.feedback("good", 1.0)  # no write lock is left held
    assert store._writer is not None and store._writer.is_alive()  # the writer survived
    good = store.get("good")
    assert store.get("bad") is None and good is not None and good["quality"] == 1.0


# -- bug: URL / directory refusals named no field ----------------------------------------------


@pytest.mark.parametrize(
    ("spec", "param"),
    [
        (remote_spec("x", ["a"], url="file:///etc/passwd"), "url"),
        (remote_spec("x", ["a"], url="http://169.254.169.254/latest"), "url"),
        ({"kind": "model", "name": "x", "path": "/nonexistent/model"}, "path"),
    ],
)
def test_refused_urls_and_directories_name_their_field(
    client: TestClient, spec: dict[str, Any], param: str
) -> None:
    before = client.get("/v1/experts").json()
    assert error_of(post(client, "/v1/experts", spec, ADMIN), 400)["param"] == param
    assert client.get("/v1/experts").json() == before


# -- bug: NAME_RE's `$` let a name end in a newline, which then went into x-concilium-expert -----


def test_a_name_ending_in_a_newline_is_400_and_stores_nothing(client: TestClient) -> None:
    before = client.get("/v1/experts").json()
    r = post(client, "/v1/experts", remote_spec("x\n", ["reverse the word"]), ADMIN)
    assert error_of(r, 400)["param"] == "name"
    assert client.get("/v1/experts").json() == before


def test_a_stored_name_ending_in_a_newline_still_loads() -> None:
    with pytest.raises(SpecError):
        parse_spec(remote_spec("x\n", ["a"]))
    assert parse_spec(remote_spec("x\n", ["a"]), stored=True).name == "x\n"
