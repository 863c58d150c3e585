"""Shared by the HTTP tests: three remote experts, the app over them in-process with a fake
backend, and a reader of the Prometheus exposition."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from concilium.config import load_config
from concilium.orchestrator.http import create_app
from concilium.orchestrator.service import Service, build_service
from tests.conftest import FakeBackend, HashEncoder, remote_spec

ADMIN = {"Authorization": "Bearer s3cret"}
EXPERTS = [
    remote_spec(
        "reverse",
        ["reverse the word", "spell the word backwards"],
        price_in_per_1k=0.1,
        price_out_per_1k=0.2,
        params_active=1000,
        expected_latency_ms=200,
        categories=["strings"],
    ),
    remote_spec(
        "math",
        ["add the numbers", "what is the sum of numbers"],
        price_in_per_1k=1.0,
        price_out_per_1k=2.0,
        expected_latency_ms=900,
        categories=["arithmetic"],
    ),
    remote_spec("embedder", ["embed text"], task="embed"),
]


def experts_service(home: Path, backend: FakeBackend, **config: object) -> Service:
    """The in-process service over EXPERTS (config fields as `load_config` overrides)."""
    cfg = load_config(None, home=home, seed_embedder=False, **config)
    svc = build_service(cfg, encoder=HashEncoder(), backend=backend, seed=False)
    for s in EXPERTS:
        svc.registry.register(s)
    return svc


@pytest.fixture
def client(tmp_path: Path, backend: FakeBackend) -> Iterator[TestClient]:
    """The app over EXPERTS, admin key `s3cret` (a module may define its own `client`)."""
    with TestClient(create_app(experts_service(tmp_path, backend, admin_api_key="s3cret"))) as c:
        yield c


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the one sample `name{labels}` in a Prometheus exposition."""
    values = [
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name and s.labels == labels
    ]
    assert len(values) == 1, (name, labels, values)
    return float(values[0])
