"""The service YAML names the valid keys / kinds for a typo, and a malformed
Serve YAML or a file that is no UTF-8 is a ConfigError, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from concilium.config import load_config
from concilium.errors import ConfigError


def load(tmp_path: Path, text: str | bytes) -> None:
    p = tmp_path / "c.yaml"
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    load_config(p)


@pytest.mark.parametrize(
    ("text", "field", "lists"),
    [
        ("defualt_router: retriever\n", "defualt_router", ["default_router", "outcomes"]),
        ("outcomes:\n  enabld: true\n", "outcomes.enabld", ["enabled", "keep_queries"]),
        ("deployment:\n  gatway: {}\n", "deployment.gatway", ["gateway", "expert_defaults"]),
        (
            "routers:\n  retriever:\n    kind: retriever\n    agregate: mean\n",
            "routers.retriever.agregate",
            ["aggregate"],
        ),
        ("routers:\n  r:\n    top_k: 2\n", "routers.r.kind", ["retriever", "predictive"]),
    ],
)
def test_a_typo_names_the_valid_keys(
    tmp_path: Path, text: str, field: str, lists: list[str]
) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    assert e.value.field == field
    for key in lists:
        assert key in e.value.message, e.value.message


@pytest.mark.parametrize(
    "text",
    [
        "applications: [foo]\n",
        "applications: {a: 1}\n",
        "http_options: [1]\napplications: [{args: {}}]\n",
        "applications: [{args: [1]}]\n",
        'host: "caf\xe9"\n'.encode("latin-1"),
    ],
)
def test_a_malformed_file_is_a_config_error(tmp_path: Path, text: str | bytes) -> None:
    with pytest.raises(ConfigError):
        load(tmp_path, text)


def test_a_serve_yaml_still_loads(tmp_path: Path) -> None:
    p = tmp_path / "serve.yaml"
    p.write_text(
        "http_options: {host: 127.0.0.1, port: 8123}\n"
        "applications:\n  - name: x\n    args:\n      concilium:\n        default_max_tokens: 7\n"
    )
    cfg = load_config(p)
    assert (cfg.port, cfg.default_max_tokens) == (8123, 7)


def test_a_typo_in_an_expert_override_names_the_valid_keys() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, deployment={"experts": {"big": {"max_replica": 3}}})
    assert "deployment.experts.big.max_replica" in e.value.message
    assert "max_replicas" in e.value.message and "max_adapters" in e.value.message
    with pytest.raises(ConfigError, match=r"deployment.experts.big.moe.cache: .*policy"):
        load_config(None, deployment={"experts": {"big": {"moe": {"cache": "lru"}}}})


@pytest.mark.parametrize("initial", [0, 3])
def test_initial_replicas_outside_the_bounds_fail_at_load(initial: int) -> None:
    with pytest.raises(ConfigError, match="initial_replicas"):
        load_config(None, deployment={"gateway": {"min_replicas": 1, "initial_replicas": initial}})
    cfg = load_config(None, deployment={"gateway": {"initial_replicas": 2}})
    assert cfg.deployment.gateway.autoscaling()["initial_replicas"] == 2
