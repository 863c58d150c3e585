"""Property-based fuzz of the HTTP API: whatever a caller sends, the answer is a 2xx or a 4xx in
OpenAI's error envelope naming the bad field; never a 500, a traceback, a hang, a broken SSE
stream, or a registry changed by a refused registration.

The app is built once per module (hypothesis runs many examples per test function); every
example leaves the registry as it found it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from concilium.config import load_config
from concilium.orchestrator.http import create_app
from concilium.orchestrator.schemas import (
    ChatCompletionRequest,
    EmbeddingRequest,
    FeedbackRequest,
)
from concilium.orchestrator.service import build_service
from concilium.registry.specs import NAME_RE, LoraSpec, ModelSpec, RemoteSpec
from tests.conftest import FakeBackend, HashEncoder, remote_spec
from tests.conftest import no_hang as shared_no_hang
from tests.orchestrator.conftest import EXPERTS

ADMIN = {"Authorization": "Bearer s3cret"}
JSON_CT = {"content-type": "application/json"}
FIXED = {s["name"] for s in EXPERTS}
SPEC_FIELDS = {f for m in (ModelSpec, LoraSpec, RemoteSpec) for f in m.model_fields}
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
Response = Any  # the TestClient's (httpx2's or httpx's, whichever starlette found)
HANG_S = 10.0  # one request running longer than this is a hang
# a background thread (the outcome writer) dying on a request's data fails the test too
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    home: Path = tmp_path_factory.mktemp("fuzz")
    cfg = load_config(None, home=home, admin_api_key="s3cret", seed_embedder=False)
    svc = build_service(cfg, encoder=HashEncoder(), backend=FakeBackend(), seed=False)
    for s in EXPERTS:
        svc.registry.register(s)
    with TestClient(create_app(svc)) as c:
        yield c


# -- strategies ---------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),  # NaN and ±Infinity included: Python's json (and so the app) accepts them
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
numbers = st.one_of(
    st.floats(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.sampled_from([0, -1, 1, 10**400, 2**63, 1e308, 1e-320, -0.0]),
)

junk = st.one_of(numbers, json_values, st.sampled_from(["", "\ud800", [], {}]))


def texts(max_size: int = 40) -> st.SearchStrategy[str]:
    """Odd text: empty, NUL, lone surrogates, 2k-100k characters, or anything."""
    huge = st.builds(lambda c, n: c * n, st.characters(), st.integers(2_000, 100_000))
    return st.one_of(
        st.text(max_size=max_size),
        st.sampled_from(["", " ", "\x00", "\ud800", "a\udfff b", "é", "line\nbreak"]),
        huge,
    )


@st.composite
def mostly_valid(
    draw: st.DrawFn,
    required: dict[str, Any],
    optional: dict[str, Any],
    odd: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A valid object (its required fields, some optional ones); then, for half of them, 1-2
    fields (maybe unknown ones) dropped or replaced by an odd value for that field (`odd`), a
    wrong type, an odd number or any JSON value. Half stay valid, so nested ones are reached."""
    body = draw(st.fixed_dictionaries(required, optional=optional))
    odd = odd or {}
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2]))):
        key = draw(st.sampled_from(sorted({*required, *optional, *odd, "bogus"})))
        how = draw(st.integers(0, 5))
        if how == 0:
            body.pop(key, None)
        elif key in odd and how >= 3:
            body[key] = draw(odd[key])
        else:
            body[key] = draw(junk)
    return body


valid_names = st.from_regex(NAME_RE, fullmatch=True)
expert_names = st.one_of(
    st.sampled_from(["reverse", "math", "embedder", "ghost", "auto", "router-x", "a:b", ""]),
    st.sampled_from(["x\n", "UPPER", "a" * 65, "-x", "x/y", "..", "x y", "é"]),
    valid_names,
    st.text(max_size=70),
)
models = st.sampled_from(
    ["auto", "router-retriever", "router-category", "router-predictive", "router-random", "math"]
)
odd_models = st.one_of(
    st.sampled_from(
        ["router-nope", "router-", "embedder", "demo:reverse", "reverse:mixture", ":mixture", ":"]
    ),
    st.sampled_from(["gpt-4", "reverse\n", "REVERSE"]),
    texts(12),
)
token_routing = mostly_valid(
    {},
    {
        "router": st.sampled_from(["phatgoose", "arrow", "uniform", "none"]),
        "top_k": st.integers(1, 16),
        "candidates": st.none() | st.integers(1, 20),
    },
    {"router": st.sampled_from(["topk", "PHATGOOSE", ""]), "top_k": st.integers(-2, 40)},
)
routing = mostly_valid(
    {},
    {
        "max_cost": st.none() | st.floats(0, 1),
        "max_latency_ms": st.none() | st.floats(1, 2000),
        "max_energy_j": st.none() | st.floats(0.1, 10),
        "quality_weight": st.none() | st.floats(0, 1),
        "strategy": st.sampled_from(["single", "cascade", "ensemble"]),
        "max_experts": st.none() | st.integers(1, 16),
        "allowed_experts": st.none() | st.lists(st.sampled_from(sorted(FIXED)), max_size=3),
        "excluded_experts": st.lists(st.sampled_from(sorted(FIXED)), max_size=2),
        "deadline_ms": st.none() | st.floats(1, 5000),
        "token_routing": st.none() | token_routing,
    },
    {
        "max_cost": numbers,
        "max_latency_ms": numbers,
        "max_energy_j": numbers,
        "quality_weight": numbers,
        "strategy": st.sampled_from(["vote", "", "SINGLE"]),
        "max_experts": numbers,
        "allowed_experts": st.lists(expert_names, max_size=3),
        "excluded_experts": st.lists(expert_names, max_size=3),
        "deadline_ms": numbers,
    },
)
content_parts = st.lists(
    mostly_valid(
        {"type": st.just("text")},
        {"text": st.none() | st.text(max_size=20)},
        {"type": st.sampled_from(["image_url", "input_audio", ""]), "text": texts()},
    ),
    max_size=3,
)
messages = st.lists(
    mostly_valid(
        {
            "role": st.sampled_from(["system", "developer", "user", "user", "assistant", "tool"]),
            "content": st.one_of(
                st.sampled_from(["reverse the word", "add the numbers"]),
                st.text(max_size=40),
                content_parts,
            ),
        },
        {"name": st.none() | st.text(max_size=8), "tool_calls": json_values},
        {"role": st.sampled_from(["wizard", "USER", ""]), "content": st.none() | texts()},
    ),
    min_size=1,
    max_size=3,
)
chat_bodies = mostly_valid(
    {"messages": messages},
    {
        "model": models,
        "max_tokens": st.none() | st.integers(1, 8192),
        "max_completion_tokens": st.none() | st.integers(1, 8192),
        "min_tokens": st.integers(0, 8192),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1, exclude_min=True),
        "n": st.just(1),
        "stop": st.none()
        | st.text(max_size=5)
        | st.lists(st.text(min_size=1, max_size=5), max_size=4),
        "stream": st.booleans(),
        "seed": st.none() | st.integers(),
        "user": st.none() | st.text(max_size=8),
        "routing": st.none() | routing,
        "logprobs": json_values,
    },
    {
        "messages": st.lists(json_values, max_size=3),
        "model": odd_models,
        "max_tokens": numbers,
        "min_tokens": numbers,
        "temperature": numbers,
        "top_p": numbers,
        "n": numbers,
        "stop": st.lists(texts(5), max_size=6),
        "seed": st.sampled_from([2**64, -(2**63) - 1, 10**400]),
    },
)
embedding_bodies = mostly_valid(
    {
        "input": st.one_of(
            st.text(min_size=1, max_size=40), st.lists(st.text(min_size=1), max_size=4)
        )
    },
    {
        "model": st.sampled_from(["auto", "router-retriever", "embedder"]),
        "encoding_format": st.sampled_from(["float", "base64"]),
        "routing": st.none() | routing,
        "dimensions": json_values,
    },
    {
        "input": st.one_of(texts(), st.lists(texts(20), max_size=4)),
        "model": odd_models | models,
        "encoding_format": st.sampled_from(["int8", ""]),
    },
)
feedback_bodies = mostly_valid(
    {"decision_id": st.uuids().map(lambda u: u.hex), "score": st.floats(0, 1)},
    {},
    {"decision_id": texts(140), "score": numbers},
)
good_urls = st.sampled_from(["http://127.0.0.1:9/v1", "https://localhost:8443/v1"])
urls = st.one_of(
    st.sampled_from(
        [
            "http://[::1]:8000/v1",
            "file:///etc/passwd",
            "http://169.254.169.254/latest",
            "http://user:pw@host/v1",
            "http://2852039166/",
            "http://host:99999/",
            "http://host:0/",
            "http://[::ffff:169.254.169.254]/",
            "ftp://host/",
            "http://",
            "http://exa mple.com/",
            "http://host/v1\n",
            "",
        ]
    ),
    st.builds(lambda h: f"http://{h}/v1", st.text(max_size=20)),
    texts(),
)
spec_bodies = mostly_valid(
    {
        "kind": st.just("remote"),
        "name": valid_names,
        "url": good_urls,
        "model_name": st.text(max_size=10),
    },
    {
        "task": st.sampled_from(["generate", "embed"]),
        "description": st.text(max_size=40),
        "examples": st.lists(st.text(min_size=1, max_size=40), max_size=3),
        "categories": st.lists(st.text(max_size=8), max_size=3),
        "price_in_per_1k": st.floats(0, 10),
        "price_out_per_1k": st.floats(0, 10),
        "params_total": st.none() | st.integers(0, 10**9),
        "params_active": st.none() | st.integers(0, 10**9),
        "tags": st.lists(st.text(max_size=8), max_size=3),
        "expected_latency_ms": st.none() | st.floats(0.1, 5000),
        "energy_j_per_1k_tokens": st.none() | st.floats(0, 10),
        "api_key_env": st.none() | st.text(max_size=10),
        "timeout_s": st.floats(0.1, 600),
    },
    {
        "kind": st.sampled_from(["model", "lora", "alien", "REMOTE", ""]),
        "name": expert_names,
        "url": urls,
        "model_name": texts(10),
        "task": st.sampled_from(["classify", ""]),
        "description": texts(),
        "examples": st.lists(texts(), max_size=3),
        "categories": st.lists(texts(8), max_size=3),
        "price_in_per_1k": numbers,
        "price_out_per_1k": numbers,
        "params_total": numbers,
        "expected_latency_ms": numbers,
        "energy_j_per_1k_tokens": numbers,
        "timeout_s": numbers,
        "train_examples": st.lists(
            st.dictionaries(st.sampled_from(["prompt", "completion", "x"]), texts(10)), max_size=2
        ),
        "path": st.sampled_from(["/", "/etc", "../..", "x", ""]),
        "base": expert_names,
        "api_key_env": texts(10),
    },
)
raw_bodies = st.one_of(
    st.binary(max_size=60),
    st.text(max_size=40).map(str.encode),
    st.sampled_from([b"", b"{", b"[", b"null", b'{"messages": [}', b"\xff\xfe", b"NaN"]),
)
content_types = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-8",
        "text/plain",
        "application/x-www-form-urlencoded",
        "",
    ]
)


# -- checks -------------------------------------------------------------------------------------


def no_hang(seconds: float = HANG_S) -> AbstractContextManager[None]:
    """Fail (instead of blocking the run) when one request takes longer than `seconds`."""
    return shared_no_hang(seconds, "one request")


def send(c: TestClient, method: str, path: str, body: Any = None, **kw: Any) -> Response:
    """One request; `body` is JSON-encoded the way Python does (NaN, Infinity, lone surrogates
    escaped), bytes are sent as they are."""
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    headers = kw.pop("headers", JSON_CT if body is not None else {})
    with no_hang():
        r = c.request(method, path, content=body, headers=headers, **kw)
    for k, v in r.headers.items():  # what an HTTP server (h11) could send at all
        assert "\r" not in v and "\n" not in v and v.isprintable(), (k, v)
    if currently_in_test_context():  # `--hypothesis-show-statistics` counts the statuses
        event(f"{method} {'/'.join(path.split('/')[:3])} -> {r.status_code}")
    return r


def check_error(r: Response, fields: set[str] | None = None) -> None:
    """Below 500 (but the documented 504 of a spent routing.deadline_ms); an error is OpenAI's
    error envelope with a message, and (for a JSON-object body that fails validation) `param`
    names a real request field."""
    deadline = r.status_code == 504 and '"param":"routing.deadline_ms"' in r.text
    assert r.status_code < 500 or deadline, f"{r.status_code}: {r.text[:2000]}"
    if r.status_code < 400:
        return
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"].strip(), err
    assert isinstance(err["type"], str) and err["type"], err
    assert err["param"] is None or (isinstance(err["param"], str) and err["param"]), err
    if fields is not None and r.status_code in (400, 422):
        assert err["param"] is not None and err["param"].split(".")[0] in fields, err


def check_sse(r: Response) -> None:
    """Every `data:` line of a stream is a JSON object or [DONE]; it ends with [DONE] or an
    error event."""
    data = [ln[len("data: ") :] for ln in r.text.splitlines() if ln.startswith("data:")]
    assert data, r.text
    for d in data[:-1]:
        assert isinstance(json.loads(d), dict), d
    last = data[-1]
    assert last == "[DONE]" or "error" in json.loads(last), last


def expert_list(c: TestClient) -> dict[str, Any]:
    r = send(c, "GET", "/v1/experts")
    assert r.status_code == 200, r.text
    return r.json()


def path_of(name: str) -> str:
    """/v1/experts/<name>, every character escaped ('.' too, so '..' is not a dot segment)."""
    return "/v1/experts/" + quote(name, safe="").replace(".", "%2E")


def fields_of(model: Any, body: Any) -> set[str] | None:
    """The fields a 4xx about a JSON-object body must name (None: the body is no object)."""
    return (set(model.model_fields) | set(body)) if isinstance(body, dict) else None


# -- the properties -----------------------------------------------------------------------------


@FUZZ
@given(body=st.one_of(chat_bodies, chat_bodies, json_values))
def test_chat_completions_never_fail_badly(client: TestClient, body: Any) -> None:
    r = send(client, "POST", "/v1/chat/completions", body)
    check_error(r, fields_of(ChatCompletionRequest, body))
    if r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"):
        check_sse(r)
    elif r.status_code == 200:
        assert r.json()["object"] == "chat.completion"


@FUZZ
@given(body=chat_bodies)
def test_streamed_chat_never_fails_badly(client: TestClient, body: Any) -> None:
    body["stream"] = True
    r = send(client, "POST", "/v1/chat/completions", body)
    check_error(r, fields_of(ChatCompletionRequest, body))
    if r.status_code == 200:
        assert r.headers["content-type"].startswith("text/event-stream")
        check_sse(r)


@FUZZ
@given(
    path=st.sampled_from(["/v1/chat/completions", "/v1/embeddings", "/v1/feedback", "/v1/experts"]),
    raw=raw_bodies,
    content_type=content_types,
)
def test_non_json_bodies_are_400(
    client: TestClient, path: str, raw: bytes, content_type: str
) -> None:
    before = expert_list(client)
    headers = ({"content-type": content_type} if content_type else {}) | ADMIN
    r = send(client, "POST", path, raw, headers=headers)
    check_error(r)
    assert r.status_code >= 400
    assert expert_list(client) == before


@FUZZ
@given(body=st.one_of(embedding_bodies, embedding_bodies, json_values))
def test_embeddings_never_fail_badly(client: TestClient, body: Any) -> None:
    r = send(client, "POST", "/v1/embeddings", body)
    check_error(r, fields_of(EmbeddingRequest, body))
    if r.status_code == 200:
        assert r.json()["object"] == "list"


def decision_id(c: TestClient) -> str:
    """The decision id of a fresh, logged chat answer."""
    body = {"messages": [{"role": "user", "content": "reverse the word"}]}
    r = send(c, "POST", "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    return str(r.json()["routing"]["decision_id"])


@settings(FUZZ, max_examples=60)  # a well-formed unknown id is re-checked for 0.5 s (by design)
@given(body=st.one_of(feedback_bodies, json_values), score=st.floats(0, 1))
def test_feedback_never_fails_badly(client: TestClient, body: Any, score: float) -> None:
    r = send(client, "POST", "/v1/feedback", body)
    check_error(r, fields_of(FeedbackRequest, body))
    assert r.status_code >= 400  # no random id is a logged decision
    r = send(client, "POST", "/v1/feedback", {"decision_id": decision_id(client), "score": score})
    assert r.status_code == 200, r.text  # and the outcome store still works


@FUZZ
@given(spec=st.one_of(spec_bodies, spec_bodies, spec_bodies, json_values))
def test_registration_is_all_or_nothing(client: TestClient, spec: Any) -> None:
    before = expert_list(client)
    r = send(client, "POST", "/v1/experts", spec, headers=JSON_CT | ADMIN)
    check_error(r, (SPEC_FIELDS | set(spec)) if isinstance(spec, dict) else None)
    after = expert_list(client)
    if r.status_code != 201:
        assert after == before
        return
    name = r.json()["name"]
    try:
        assert re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", name), name  # the documented grammar
        assert after["version"] == before["version"] + 1
        assert {e["name"] for e in after["data"]} == {e["name"] for e in before["data"]} | {name}
        r = send(client, "GET", path_of(name))
        assert r.status_code == 200, r.text
        if r.json()["spec"]["task"] == "generate":  # and the new expert answers, headers and all
            body = {"model": name, "messages": [{"role": "user", "content": "hi"}]}
            r = send(client, "POST", "/v1/chat/completions", body)
        else:
            r = send(client, "POST", "/v1/embeddings", {"model": name, "input": "hi"})
        assert r.status_code == 200, r.text
    finally:  # leave the registry as it was, even when an assertion failed
        r = send(client, "DELETE", path_of(name), headers=ADMIN)
        assert r.status_code == 200, r.text


@FUZZ
@given(name=expert_names)
def test_registered_names_follow_the_grammar(client: TestClient, name: str) -> None:
    before = expert_list(client)
    spec = remote_spec(name, ["reverse the word"])
    r = send(client, "POST", "/v1/experts", spec, headers=JSON_CT | ADMIN)
    check_error(r, set(spec))
    if r.status_code != 201:
        assert r.json()["error"]["param"] == "name"
        assert expert_list(client) == before
        return
    try:
        assert re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", name), name
    finally:
        assert send(client, "DELETE", path_of(name), headers=ADMIN).status_code == 200


@FUZZ
@given(name=expert_names, admin=st.booleans())
def test_delete_and_get_odd_names(client: TestClient, name: str, admin: bool) -> None:
    assume(name and name not in FIXED)
    before = expert_list(client)
    # a '/' (sent as %2F) splits the path: no route matches, or a slash redirect does
    routed = "/" not in name
    r = send(client, "GET", path_of(name), follow_redirects=False)
    check_error(r)
    assert r.status_code == 404 if routed else r.status_code in (307, 404)
    r = send(
        client, "DELETE", path_of(name), headers=ADMIN if admin else {}, follow_redirects=False
    )
    check_error(r)
    assert r.status_code == (404 if admin else 401) if routed else r.status_code in (307, 404)
    assert expert_list(client) == before


def test_still_serving_after_the_fuzz(client: TestClient) -> None:
    """Nothing the fuzz sent broke the app, its registry or its outcome store."""
    assert {e["name"] for e in expert_list(client)["data"]} == FIXED
    r = send(client, "POST", "/v1/feedback", {"decision_id": decision_id(client), "score": 1.0})
    assert r.status_code == 200, r.text
    r = send(client, "POST", "/v1/embeddings", {"input": ["hello"]})
    assert r.status_code == 200, r.text
