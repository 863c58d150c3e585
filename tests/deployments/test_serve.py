"""A real local Ray Serve app (one per module): 2 gateway replicas + ExpertServers on the demo pack.

Covers the serving issue's acceptance: the openai client (chat, streaming, embeddings, models),
registration seen by every gateway replica within 1 s, a late `model` expert getting its own
deployment, per-expert autoscaling, a replica killed under 200 concurrent requests, backpressure,
deadlines cancelling downstream work, adapter LRU eviction/reload (and its counters in /metrics),
registry writes through the RegistryService, DELETE draining before the unload (and deleting a
late model expert's application), scale to zero.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import pilot_query

pytestmark = pytest.mark.ray
ADMIN = {"Authorization": "Bearer k"}
LATE = "demo-moe-2"  # a second model expert registered while serving


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _deployment_config() -> dict[str, Any]:
    fast = {"upscale_delay_s": 0.5, "downscale_delay_s": 600, "num_cpus": 0.25}
    return {
        "gateway": {"num_cpus": 0.25, "min_replicas": 2, "max_replicas": 2},
        "expert_defaults": {**fast, "min_replicas": 1, "max_replicas": 2, "max_adapters": 3},
        "experts": {
            "demo-moe": {"target_ongoing_requests": 2},
            LATE: {
                "max_replicas": 1,
                "max_ongoing_requests": 1,
                "max_queued_requests": 1,
                "moe": {"resident_experts": 4},  # tiered: half the experts memory-mapped
            },
            "demo-moe-cold": {
                "min_replicas": 0,
                "max_replicas": 1,
                "look_back_period_s": 1,
                "downscale_delay_s": 1,
                "downscale_to_zero_delay_s": 1,
            },
        },
    }


@pytest.fixture(scope="module")
def gateway(pack_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    os.environ["RAY_SERVE_ENABLE_ACCESS_LOG"] = "0"
    import ray
    from ray import serve

    from concilium.config import load_config
    from concilium.deployments.builder import build_app

    port = _free_port()
    cfg = load_config(
        None,
        home=tmp_path_factory.mktemp("home"),
        pack=pack_dir,
        port=port,
        admin_api_key="k",
        deployment=_deployment_config(),
        train_gates=False,  # gates are covered in tests/registry; here they would only load the CPU
    )
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": port},
            logging_config=cfg.deployment.logging(),
        )
        serve.run(build_app(cfg), name="concilium", route_prefix="/", blocking=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def manifest(pack_dir: Path) -> dict[str, Any]:
    return dict(json.loads((pack_dir / "manifest.json").read_text()))


def chat(url: str, content: str, timeout: float = 120, **body: Any) -> httpx.Response:
    payload = {"messages": [{"role": "user", "content": content}], **body}
    return httpx.post(f"{url}/v1/chat/completions", json=payload, timeout=timeout)


def late_app(name: str) -> str:
    """The one Serve application started for late-registered model expert `name`."""
    from concilium.deployments.topology import expert_apps

    (app,) = expert_apps(name)
    return app


def replicas(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return sum(status.replica_states.values())


def expert_infos(app: str, deployment: str, samples: int = 12) -> dict[str, dict[str, Any]]:
    """info() of the replicas of a deployment, sampled through its handle."""
    from ray import serve

    h = serve.get_deployment_handle(deployment, app_name=app)
    out = {}
    for _ in range(samples):
        info = h.info.remote().result(timeout_s=30)
        out[info["replica"]] = info
    return out


def rows_seen(app: str, deployment: str) -> dict[str, float]:
    """Per replica heard from: requests that reached one of its decode batches."""
    return {r: i["stats"].get("batched_rows", 0) for r, i in expert_infos(app, deployment).items()}


def more_rows(app: str, deployment: str, before: dict[str, float]) -> bool:
    """Some replica seen before has batched a request since."""
    now = rows_seen(app, deployment)
    return any(n > before.get(r, float("inf")) for r, n in now.items())


def wait_for(condition: Any, what: str, timeout_s: float = 60) -> None:
    """Poll `condition()` until true; fail naming `what` after `timeout_s` (a hang, not speed)."""
    deadline = time.perf_counter() + timeout_s
    while not condition():
        assert time.perf_counter() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def test_chat_through_serve_returns_routing(gateway: str, manifest: dict[str, Any]) -> None:
    skill = next(e["name"] for e in manifest["experts"] if e["default"])
    query, answer = pilot_query(manifest, skill)
    r = chat(gateway, query, model="auto")
    assert r.status_code == 200, r.text
    assert r.json()["routing"]["expert"] == skill == r.headers["x-concilium-expert"]
    assert r.json()["choices"][0]["message"]["content"] == answer
    assert r.headers["x-concilium-decision-id"] == r.json()["routing"]["decision_id"]
    # the gateway encoded the query's tokens and the registry stored the pilots': no fallback
    assert r.json()["routing"]["reason"].startswith("pilot late interaction")


def test_openai_client_chat_stream_embeddings_models(
    gateway: str, manifest: dict[str, Any]
) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{gateway}/v1", api_key="-")
    models = {m.id for m in client.models.list()}
    assert {"auto", "minilm", "demo-moe"} <= models
    skill = next(e["name"] for e in manifest["experts"] if e["default"])
    query, answer = pilot_query(manifest, skill)
    msgs = [{"role": "user", "content": query}]
    resp = client.chat.completions.create(
        model="auto",
        messages=msgs,
        extra_body={"routing": {"max_cost": 10}},  # type: ignore[arg-type]
    )
    assert resp.choices[0].message.content == answer and resp.model == skill
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model=skill, messages=msgs, stream=True)  # type: ignore[arg-type]
        if c.choices
    ]
    assert "".join(pieces) == answer and len([p for p in pieces if p]) > 1
    emb = client.embeddings.create(model="minilm", input=["hello world", "bye"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 384


def test_registration_reaches_every_gateway_replica_within_1s(
    gateway: str, pack_dir: Path, manifest: dict[str, Any]
) -> None:
    from concilium.orchestrator.service import pack_expert

    held = [e["name"] for e in manifest["experts"] if not e["default"]][-1]
    r = httpx.post(
        f"{gateway}/v1/experts", json=pack_expert(pack_dir, held), timeout=120, headers=ADMIN
    )
    assert r.status_code == 201, r.text
    version, t0 = r.json()["version"], time.perf_counter()
    seen: dict[str, float] = {}
    while time.perf_counter() - t0 < 5 and len(seen) < 2:
        h = httpx.get(f"{gateway}/health", timeout=10).json()
        assert h["registry_source"] == "mirror"  # fed by the RegistryService: no SQLite here
        if h["registry_version"] >= version:
            seen.setdefault(h["instance"], time.perf_counter() - t0)
    assert len(seen) == 2, seen
    assert max(seen.values()) <= 1.0, seen
    # the write went through the single RegistryService replica; its errors stay 4xx
    assert replicas("concilium", "RegistryService") == 1
    again = httpx.post(
        f"{gateway}/v1/experts", json=pack_expert(pack_dir, held), timeout=120, headers=ADMIN
    )
    assert again.status_code == 409 and "already registered" in again.text, again.text
    bad = httpx.post(
        f"{gateway}/v1/experts", json={"kind": "plugin", "name": "x"}, timeout=60, headers=ADMIN
    )
    assert bad.status_code == 400 and "kind" in bad.text, bad.text
    query, answer = pilot_query(manifest, held)
    r = chat(gateway, query)
    assert r.json()["routing"]["expert"] == held
    assert r.json()["choices"][0]["message"]["content"] == answer
    print(f"serve: registration seen by both gateway replicas after {max(seen.values()):.3f} s")


def test_late_model_expert_gets_its_own_deployment(gateway: str, pack_dir: Path) -> None:

    spec = {"kind": "model", "name": LATE, "path": str(pack_dir / "base"), "examples": ["hi"]}
    r = httpx.post(f"{gateway}/v1/experts", json=spec, timeout=120, headers=ADMIN)
    assert r.status_code == 201, r.text
    r = chat(gateway, "hello", model=LATE, max_tokens=4)
    assert r.status_code == 200, r.text
    assert replicas(late_app(LATE), f"expert-{LATE}") == 1
    assert replicas("concilium", "expert-demo-moe") >= 1  # untouched
    # its YAML tiers it: same answer as the fully resident base, the tier's counters in info()
    full = chat(gateway, "hello", model="demo-moe", max_tokens=4)
    assert (
        full.json()["choices"][0]["message"]["content"]
        == r.json()["choices"][0]["message"]["content"]
    )
    (info,) = expert_infos(late_app(LATE), f"expert-{LATE}", samples=1).values()
    assert info["moe"]["moe_layers"] == 4 and info["moe"]["tier_bytes_moved"] > 0
    assert info["stats"]["tier_misses"] == info["moe"]["tier_misses"] > 0


def test_backpressure_answers_503_quickly(gateway: str) -> None:
    async def burst() -> list[tuple[int, float, str | None]]:
        async with httpx.AsyncClient(timeout=120) as c:

            async def one() -> tuple[int, float, str | None]:
                t0 = time.perf_counter()
                r = await c.post(
                    f"{gateway}/v1/chat/completions",
                    json={
                        "model": LATE,
                        "max_tokens": 48,
                        "messages": [{"role": "user", "content": "hi"}],
                    },
                )
                return r.status_code, time.perf_counter() - t0, r.headers.get("retry-after")

            return await asyncio.gather(*[one() for _ in range(24)])

    out = asyncio.run(burst())
    refused = [o for o in out if o[0] == 503]
    assert {o[0] for o in out} <= {200, 503} and len(refused) >= 12, out
    assert all(o[2] is not None for o in refused)
    assert sorted(o[1] for o in refused)[len(refused) // 2] < 2.0  # refused fast, not queued


def test_deadline_cancels_downstream(gateway: str) -> None:

    app, dep = late_app(LATE), f"expert-{LATE}"
    before = next(iter(expert_infos(app, dep, 1).values()))["stats"].get("cancelled", 0)
    r = chat(
        gateway, "hi", model=LATE, max_tokens=2000, min_tokens=2000, routing={"deadline_ms": 300}
    )
    assert r.status_code == 504 and r.json()["error"]["param"] == "routing.deadline_ms"

    def cancelled() -> float:
        return float(next(iter(expert_infos(app, dep, 1).values()))["stats"].get("cancelled", 0))

    wait_for(lambda: cancelled() >= before + 1, "the replica to see the cancel")
    assert cancelled() == before + 1


def test_adapters_beyond_the_lru_cap_are_evicted_and_reloaded(
    gateway: str, manifest: dict[str, Any]
) -> None:
    skills = [e["name"] for e in manifest["experts"] if e["default"]][:5]
    for _ in range(2):
        for s in skills:
            query, answer = pilot_query(manifest, s)
            r = chat(gateway, query, model=f"demo-moe:{s}")
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == answer
    infos = expert_infos("concilium", "expert-demo-moe")
    assert all(len(i["adapters"]) <= 3 for i in infos.values())
    assert sum(i["stats"].get("adapter_evictions", 0) for i in infos.values()) >= 2
    # the replicas' counters reach the gateway's Prometheus endpoint (either gateway replica)
    for _ in range(4):
        text = httpx.get(f"{gateway}/metrics", timeout=10).text
        loads = _metric(
            text, 'concilium_expert_events_total{event="adapter_loads",model="demo-moe"}'
        )
        evictions = _metric(
            text, 'concilium_expert_events_total{event="adapter_evictions",model="demo-moe"}'
        )
        assert loads >= 5 and evictions >= 1, (loads, evictions)


def _metric(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_concurrent_requests_for_different_adapters_share_one_forward(
    gateway: str, manifest: dict[str, Any]
) -> None:
    """Serve splits batches by multiplexed_model_id; the replica joins them again."""
    skills = [e["name"] for e in manifest["experts"] if e["default"]][:3]  # within the LRU cap
    asks = [(*pilot_query(manifest, s), s) for s in skills] * 4

    def mixed() -> int:
        infos = expert_infos("concilium", "expert-demo-moe")
        return sum(i["stats"].get("mixed_adapter_batches", 0) for i in infos.values())

    for q, _, s in asks[:3]:  # load the adapters first
        chat(gateway, q, model=f"demo-moe:{s}")
    before = mixed()
    with ThreadPoolExecutor(len(asks)) as pool:
        rs = list(pool.map(lambda a: chat(gateway, a[0], model=f"demo-moe:{a[2]}"), asks))
    assert all(r.status_code == 200 for r in rs)
    assert [r.json()["choices"][0]["message"]["content"] for r in rs] == [a[1] for a in asks]
    assert mixed() > before


def test_token_level_mixtures_run_on_the_expert_server_beside_single_adapter_rows(
    gateway: str, manifest: dict[str, Any]
) -> None:
    skills = [e["name"] for e in manifest["experts"] if e["default"]][:3]  # within the LRU cap
    q0, a0 = pilot_query(manifest, skills[0])
    one = {"token_routing": {"router": "arrow", "top_k": 1, "candidates": 1}}
    mix = {"token_routing": {"router": "arrow", "top_k": 2, "candidates": 3}}
    asks = [(q0, "demo-moe:mixture", one)] * 3 + [(q0, "auto", mix)] * 3
    asks += [(*pilot_query(manifest, s)[:1], f"demo-moe:{s}", None) for s in skills]

    def ask(a: tuple[str, str, Any]) -> httpx.Response:
        q, model, routing = a
        return chat(gateway, q, model=model, **({"routing": routing} if routing else {}))

    with ThreadPoolExecutor(len(asks)) as pool:
        rs = list(pool.map(ask, asks))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
    for r, (*_, routing) in zip(rs, asks, strict=True):
        body = r.json()
        if routing is None:
            assert "token_routing" not in body["routing"]
            continue
        tr = body["routing"]["token_routing"]
        assert tr["router"] == "arrow" and abs(sum(tr["adapter_shares"].values()) - 1) < 1e-3
        if routing is one:  # one candidate: exactly the routed adapter
            assert body["routing"]["expert"] == skills[0]
            assert body["choices"][0]["message"]["content"] == a0


def test_burst_scales_one_expert_and_a_killed_replica_loses_nothing(
    gateway: str, manifest: dict[str, Any]
) -> None:
    import ray

    skills = [e["name"] for e in manifest["experts"] if e["default"]]
    queries = [pilot_query(manifest, skills[i % len(skills)]) for i in range(200)]

    async def run() -> list[int]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(timeout=180, limits=limits) as c:

            async def one(i: int) -> int:
                q, _ = queries[i]
                body = {
                    "model": f"demo-moe:{skills[i % len(skills)]}",
                    "messages": [{"role": "user", "content": q}],
                }
                return (await c.post(f"{gateway}/v1/chat/completions", json=body)).status_code

            tasks = [asyncio.create_task(one(i)) for i in range(200)]
            deadline = time.perf_counter() + 60
            while replicas("concilium", "expert-demo-moe") < 2 and time.perf_counter() < deadline:
                await asyncio.sleep(0.25)
            scaled.append(replicas("concilium", "expert-demo-moe"))
            await asyncio.sleep(1.0)
            victim = next(
                a
                for a in ray.util.list_named_actors(all_namespaces=True)
                if "expert-demo-moe" in a["name"] and "REPLICA" in a["name"]
            )
            ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
            return list(await asyncio.gather(*tasks))

    scaled: list[int] = []
    codes = asyncio.run(run())
    assert scaled == [2]  # the burst scaled demo-moe up
    assert replicas(late_app(LATE), f"expert-{LATE}") == 1  # the other expert left alone
    assert codes.count(200) == 200, {c: codes.count(c) for c in set(codes)}


def test_delete_drains_in_flight_requests_then_unloads(
    gateway: str, manifest: dict[str, Any]
) -> None:
    skill = next(e["name"] for e in manifest["experts"] if e["default"])
    query, _ = pilot_query(manifest, skill)
    assert chat(gateway, query, model=f"demo-moe:{skill}").status_code == 200  # resident

    def slow() -> httpx.Response:
        return chat(gateway, query, model=f"demo-moe:{skill}", max_tokens=400, min_tokens=400)

    seen = rows_seen("concilium", "expert-demo-moe")
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(slow)
        wait_for(lambda: more_rows("concilium", "expert-demo-moe", seen), "the request to decode")
        r = httpx.delete(f"{gateway}/v1/experts/{skill}", headers=ADMIN, timeout=60)
        assert r.status_code == 200, r.text
        done = pending.result(timeout=180)
    assert done.status_code == 200, done.text  # drained, not cut off
    deadline = time.perf_counter() + 10
    while time.perf_counter() < deadline:
        infos = expert_infos("concilium", "expert-demo-moe")
        if all(skill not in i["adapters"] for i in infos.values()):
            break
        time.sleep(0.5)
    assert all(skill not in i["adapters"] for i in infos.values()), infos
    assert chat(gateway, query, model=f"demo-moe:{skill}").status_code == 404


def test_a_cold_expert_scales_to_zero_and_back(gateway: str, pack_dir: Path) -> None:

    name = "demo-moe-cold"  # deployment.experts sets min_replicas 0 for it
    spec = {"kind": "model", "name": name, "path": str(pack_dir / "base"), "examples": ["hey"]}
    r = httpx.post(f"{gateway}/v1/experts", json=spec, timeout=120, headers=ADMIN)
    assert r.status_code == 201, r.text
    assert chat(gateway, "hello", model=name, max_tokens=2).status_code == 200
    app, dep = late_app(name), f"expert-{name}"
    deadline = time.perf_counter() + 30
    while replicas(app, dep) > 0 and time.perf_counter() < deadline:
        time.sleep(0.5)
    assert replicas(app, dep) == 0
    r = chat(gateway, "hello", model=name, max_tokens=2)  # wakes it
    assert r.status_code == 200, r.text
    assert replicas(app, dep) >= 1


def test_deleting_a_late_model_expert_drains_then_deletes_its_application(
    gateway: str, pack_dir: Path
) -> None:
    from ray import serve

    from concilium.deployments.topology import expert_apps

    (app,) = expert_apps(LATE)  # registered and started by an earlier test

    def slow() -> tuple[httpx.Response, float]:
        r = chat(gateway, "hi", model=LATE, max_tokens=400, min_tokens=400)
        return r, time.perf_counter()

    seen = rows_seen(app, f"expert-{LATE}")
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(slow)
        wait_for(lambda: more_rows(app, f"expert-{LATE}", seen), "the request to decode")
        r = httpx.delete(f"{gateway}/v1/experts/{LATE}", headers=ADMIN, timeout=120)
        deleted_at = time.perf_counter()
        assert r.status_code == 200, r.text
        done, done_at = pending.result(timeout=180)
    assert done.status_code == 200, done.text  # drained, not cut off
    assert done_at <= deleted_at  # the DELETE answered once the application had drained
    assert app not in serve.status().applications
    assert chat(gateway, "hi", model=LATE, max_tokens=2).status_code == 404
    # registered again: every gateway replica drops its stale handle and deploys it anew
    spec = {"kind": "model", "name": LATE, "path": str(pack_dir / "base"), "examples": ["hi"]}
    r = httpx.post(f"{gateway}/v1/experts", json=spec, timeout=120, headers=ADMIN)
    assert r.status_code == 201, r.text
    codes = [chat(gateway, "hello", model=LATE, max_tokens=2).status_code for _ in range(6)]
    assert codes == [200] * 6, (codes, chat(gateway, "hello", model=LATE, max_tokens=2).text)
    assert replicas(app, f"expert-{LATE}") == 1
