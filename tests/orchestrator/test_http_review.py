"""What OpenAI clients send and expect: nullable fields, unsupported parameters refused by name,
the `param` of a union field's error, the bearer scheme, and metrics that survive odd usage."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from concilium.config import load_config
from concilium.errors import ConfigError
from concilium.experts.base import Generation, GenParams, Message, Target
from concilium.orchestrator.http import create_app
from tests.conftest import FakeBackend
from tests.orchestrator.conftest import experts_service, sample

MESSAGES = [{"role": "user", "content": "please reverse the word planet"}]


def chat(c: TestClient, **body: Any) -> Any:
    return c.post("/v1/chat/completions", json={"messages": MESSAGES, **body})


@pytest.mark.parametrize("field", ["temperature", "top_p", "n", "stream", "min_tokens"])
def test_an_explicit_null_means_the_default(
    client: TestClient, backend: FakeBackend, field: str
) -> None:
    """OpenAI's schema makes these nullable; clients that serialise unset fields send null."""
    r = chat(client, **{field: None})
    assert r.status_code == 200, r.text
    params = backend.calls[-1][2]
    assert (params.temperature, params.top_p, params.min_tokens) == (0.0, 1.0, 0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("logprobs", True),
        ("top_logprobs", 2),
        ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ("tool_choice", "required"),
        ("functions", [{"name": "f", "parameters": {}}]),
        ("function_call", {"name": "f"}),
        ("response_format", {"type": "json_object"}),
        ("response_format", {"type": "json_schema", "json_schema": {"name": "x"}}),
        ("logit_bias", {"50256": -100}),
        ("presence_penalty", 0.5),
        ("frequency_penalty", -1.0),
    ],
)
def test_unsupported_openai_parameters_are_400_naming_the_field(
    client: TestClient, backend: FakeBackend, field: str, value: Any
) -> None:
    r = chat(client, **{field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field
    assert backend.calls == []  # refused, not answered as if the parameter were not there


@pytest.mark.parametrize(
    "extra",
    [
        {"logprobs": False},
        {"logprobs": None, "top_logprobs": None},
        {"top_logprobs": 0},
        {"tools": []},
        {"tools": None, "tool_choice": "none"},
        {"tool_choice": "auto"},
        {"response_format": {"type": "text"}},
        {"logit_bias": {}},
        {"presence_penalty": 0, "frequency_penalty": 0.0},
        {"parallel_tool_calls": False, "user": "u1", "seed": 7},
    ],
)
def test_their_neutral_values_are_accepted(client: TestClient, extra: dict[str, Any]) -> None:
    r = chat(client, **extra)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("model", ["embedder", "auto"])
def test_embedding_dimensions_equal_to_the_experts_size_are_a_no_op(
    client: TestClient, model: str
) -> None:
    body = {"model": model, "input": ["hi", "abc"]}
    plain = client.post("/v1/embeddings", json=body)
    sized = client.post("/v1/embeddings", json=body | {"dimensions": 2})  # the fake's size
    assert sized.status_code == 200, sized.text
    assert [d["embedding"] for d in sized.json()["data"]] == [[2.0, 1.0], [3.0, 1.0]]
    assert sized.json()["data"] == plain.json()["data"]


@pytest.mark.parametrize("dimensions", [1, 3, 8, 0, -2, True, 2.0, "2"])
def test_other_embedding_dimensions_are_refused_not_ignored(
    client: TestClient, dimensions: object
) -> None:
    body = {"model": "embedder", "input": "hi", "dimensions": dimensions}
    r = client.post("/v1/embeddings", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "dimensions"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": MESSAGES, "stop": 5}, "stop"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": 5}]},
            "messages.0.content",
        ),
        ("/v1/embeddings", {"input": 5}, "input"),
        ("/v1/embeddings", {"input": [[1, 2, 3]]}, "input"),  # token arrays
    ],
)
def test_a_union_fields_error_names_the_field_not_the_member_type(
    client: TestClient, path: str, body: dict[str, Any], param: str
) -> None:
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param
    assert "list[" not in err["message"] and ".str:" not in err["message"], err["message"]


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_bearer_scheme_is_case_insensitive(client: TestClient, scheme: str) -> None:
    r = client.delete("/v1/experts/math", headers={"Authorization": f"{scheme} s3cret"})
    assert r.status_code == 200, r.text


def test_a_key_without_the_bearer_scheme_is_refused(client: TestClient) -> None:
    r = client.delete("/v1/experts/math", headers={"Authorization": "s3cret"})
    assert r.status_code == 401, r.text


def test_an_empty_admin_key_is_no_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An empty key (a templated YAML value, an empty env var) must not count as set: with it,
    any caller sending no key passed the admin check, and a public host started."""
    monkeypatch.setenv("CONCILIUM_ADMIN_KEY", "")
    with pytest.raises(ConfigError) as e:
        load_config(None, home=tmp_path, host="0.0.0.0", admin_api_key="")
    assert e.value.field == "admin_api_key"
    assert load_config(None, home=tmp_path, admin_api_key="  ").admin_key() is None


def test_a_blank_env_key_does_not_hide_the_configured_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A blank CONCILIUM_ADMIN_KEY / CONCILIUM_API_KEYS used to win over the config's keys and
    then count as none: registration and inference opened on loopback."""
    monkeypatch.setenv("CONCILIUM_ADMIN_KEY", "  ")
    monkeypatch.setenv("CONCILIUM_API_KEYS", " , ")
    cfg = load_config(None, home=tmp_path, admin_api_key="s3cret", api_keys=["u1"])
    assert cfg.admin_key() == "s3cret" and cfg.user_keys() == ["u1"]
    monkeypatch.setenv("CONCILIUM_ADMIN_KEY", "env-key")
    monkeypatch.setenv("CONCILIUM_API_KEYS", "u2, u3")
    assert cfg.admin_key() == "env-key" and cfg.user_keys() == ["u2", "u3"]


class OddUsageBackend(FakeBackend):
    """A remote that reports a negative token count in its usage."""

    async def chat(
        self, target: Target, messages: Sequence[Message], params: GenParams
    ) -> Generation:
        gen = await super().chat(target, messages, params)
        return Generation(
            text=gen.text, prompt_tokens=-1000, completion_tokens=5, finish_reason="stop"
        )


def test_negative_reported_usage_does_not_turn_an_answer_into_a_500(tmp_path: Path) -> None:
    with TestClient(create_app(experts_service(tmp_path, OddUsageBackend()))) as c:
        r = chat(c, model="reverse")
        assert r.status_code == 200, r.text
        metrics = c.get("/metrics").text
    # the reported usage prices the answer at (-1000 * 0.1 + 5 * 0.2) / 1000 < 0: a counter
    # never goes backwards, so the answer adds nothing
    assert sample(metrics, "concilium_cost_total", expert="reverse") == 0.0


def big_client(tmp_path: Path, backend: FakeBackend) -> TestClient:
    return TestClient(create_app(experts_service(tmp_path, backend, max_request_mb=0.001)))


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings", "/v1/experts"])
def test_a_body_over_the_limit_is_413_in_the_error_envelope(
    tmp_path: Path, backend: FakeBackend, path: str
) -> None:
    """Without a cap one request could hold any amount of memory on a 2-core box."""
    body = {"messages": [{"role": "user", "content": "x" * 2000}], "input": "x" * 2000}
    with big_client(tmp_path, backend) as c:
        r = c.post(path, json=body)
        assert r.status_code == 413, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"

        def chunks() -> Iterator[bytes]:  # no content-length: the limit counts what arrives
            yield b'{"messages": [{"role": "user", "content": "'
            yield b"x" * 2000
            yield b'"}]}'

        r = c.post(path, content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert chat(c).status_code == 200
    assert backend.calls[-1][1][-1]["content"] == MESSAGES[0]["content"]


def test_a_body_just_under_the_limit_is_accepted(tmp_path: Path, backend: FakeBackend) -> None:
    """The declared length and the bytes that arrive are one body, not two (counted once)."""
    limit = int(0.001 * 1024**2)
    msg = [{"role": "user", "content": "please reverse the word planet "}]
    body = json.dumps({"messages": msg}).encode()
    pad = limit - len(body) - 64  # a body of about 0.94 of the limit, with content-length
    msg[0]["content"] += "x" * pad
    body = json.dumps({"messages": msg}).encode()
    assert 0.9 * limit < len(body) <= limit
    with big_client(tmp_path, backend) as c:
        r = c.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
        assert r.status_code == 200, r.text
