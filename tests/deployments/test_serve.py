"""A real local Ray Serve app (one per session): gateway + expert server on the demo pack."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import pilot_query

pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def gateway(pack_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    os.environ["RAY_SERVE_ENABLE_ACCESS_LOG"] = "0"
    import ray
    from ray import serve

    from concilium.config import load_config
    from concilium.deployments.builder import build_app

    port = _free_port()
    cfg = load_config(
        None, home=tmp_path_factory.mktemp("home"), pack=pack_dir, port=port, admin_api_key="k"
    )
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(cfg), name="concilium", route_prefix="/", blocking=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_chat_through_serve_returns_routing(gateway: str, pack_dir: Path) -> None:
    manifest = json.loads((pack_dir / "manifest.json").read_text())
    skill = next(e["name"] for e in manifest["experts"] if e["default"])
    query, answer = pilot_query(manifest, skill)
    r = httpx.post(
        f"{gateway}/v1/chat/completions",
        timeout=60,
        json={"model": "auto", "messages": [{"role": "user", "content": query}]},
    )
    assert r.status_code == 200, r.text
    assert r.json()["routing"]["expert"] == skill == r.headers["x-concilium-expert"]
    assert r.json()["choices"][0]["message"]["content"] == answer
    assert r.headers["x-concilium-decision-id"] == r.json()["routing"]["decision_id"]


def test_live_registration_through_serve(gateway: str, pack_dir: Path) -> None:
    from concilium.orchestrator.service import pack_expert

    manifest = json.loads((pack_dir / "manifest.json").read_text())
    held = [e["name"] for e in manifest["experts"] if not e["default"]][-1]
    query, answer = pilot_query(manifest, held)
    spec = pack_expert(pack_dir, held)
    r = httpx.post(
        f"{gateway}/v1/experts", json=spec, timeout=120, headers={"Authorization": "Bearer k"}
    )
    assert r.status_code == 201, r.text
    t0 = time.perf_counter()
    r = httpx.post(
        f"{gateway}/v1/chat/completions",
        timeout=60,
        json={"messages": [{"role": "user", "content": query}]},
    )
    elapsed = time.perf_counter() - t0
    assert r.status_code == 200 and r.json()["routing"]["expert"] == held
    assert r.json()["choices"][0]["message"]["content"] == answer
    ids = {m["id"] for m in httpx.get(f"{gateway}/v1/models").json()["data"]}
    assert held in ids
    print(f"serve: registration->first routed answer {elapsed * 1000:.0f} ms")


def test_openai_client_against_serve(gateway: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{gateway}/v1", api_key="-")
    models = {m.id for m in client.models.list()}
    assert "auto" in models
    resp = client.chat.completions.create(
        model="auto",
        messages=[{"role": "user", "content": "Reverse this word: planet"}],
        extra_body={"routing": {"max_cost": 10}},
    )
    assert resp.choices[0].message.content is not None
    assert resp.model in models
