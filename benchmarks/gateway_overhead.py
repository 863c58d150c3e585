"""What the concilium gateway costs over bare Ray Serve, with the same no-op expert behind both.

(a) bare: a minimal FastAPI ingress deployment that forwards each chat request to the no-op
    expert deployment and returns its answer (Ray Serve as a user would wire it by hand).
(b) concilium: the real Gateway deployment: OpenAI request validation, query encoding with
    all-MiniLM-L6-v2 (batched across concurrent requests), retriever routing over the registry,
    dispatch through the same kind of handle, routing object + x-concilium-* headers, metrics.

Both run in one local Serve instance, driven by the same closed-loop client (64 concurrent
connections to 127.0.0.1, bounded in requests), alternating rounds; best round of each reported.

    python benchmarks/gateway_overhead.py [--quick] [--requests 2000] [--concurrency 64]
"""

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_SERVE_ENABLE_ACCESS_LOG", "0")

import httpx  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from ray import serve  # noqa: E402

from concilium.experts.base import Generation, GenParams, Target  # noqa: E402

bare_api = FastAPI()


NO_ACCESS_LOG = {"enable_access_log": False}  # both apps alike (Serve 2.60 ignores the env var)


@serve.deployment(
    ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=1024, logging_config=NO_ACCESS_LOG
)
class NoOpExpert:
    """Answers at once: the expert time is zero, so only the serving path is measured."""

    async def chat(self, target: Target, messages: list[Any], params: GenParams) -> Generation:
        return Generation(text="ok", prompt_tokens=1, completion_tokens=1, finish_reason="stop")


@serve.deployment(
    ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=1024, logging_config=NO_ACCESS_LOG
)
@serve.ingress(bare_api)
class BareIngress:
    def __init__(self, expert: Any) -> None:
        self.expert = expert

    @bare_api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        target = Target(expert="noop", kind="model", model="noop", model_path="-")
        gen = await self.expert.chat.remote(target, body["messages"], GenParams())
        return {"choices": [{"message": {"role": "assistant", "content": gen.text}}]}


async def load(url: str, n: int, concurrency: int, content: str) -> tuple[float, list[float]]:
    """Closed loop: `concurrency` clients send `n` requests in all. (req/s, latencies in s)."""
    body = {"model": "auto", "messages": [{"role": "user", "content": content}]}
    lat: list[float] = []
    left = iter(range(n))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def worker() -> None:
            for _ in left:
                t0 = time.perf_counter()
                r = await client.post(url, json=body)
                if r.status_code != 200:
                    raise RuntimeError(f"{url}: {r.status_code} {r.text[:200]}")
                lat.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        return n / (time.perf_counter() - t0), lat


def deploy(port: int, home: Path) -> None:
    from concilium.config import load_config
    from concilium.deployments.gateway import Gateway
    from concilium.orchestrator.service import build_service

    cfg = load_config(None, home=home, port=port, seed_embedder=False)
    svc = build_service(cfg, seed=False)
    svc.registry.register(
        {
            "kind": "model",
            "name": "noop",
            "path": str(ROOT / "demo_pack" / "base"),
            "description": "answers every question",
            "examples": ["Reverse this word: planet", "hello", "what can you do?"],
        }
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=NO_ACCESS_LOG)
    serve.run(BareIngress.bind(NoOpExpert.bind()), name="bare", route_prefix="/bare")
    gateway = Gateway.options(  # type: ignore[attr-defined]
        ray_actor_options={"num_cpus": 0.25},
        max_ongoing_requests=1024,
        logging_config=NO_ACCESS_LOG,
    )
    app = gateway.bind(cfg.model_dump(mode="json"), {"noop": NoOpExpert.bind()})
    serve.run(app, name="concilium", route_prefix="/")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="300 requests x 2 rounds (< 1 minute)")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args()
    n, rounds = (300, 2) if args.quick else (args.requests, args.rounds)
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    base = f"http://127.0.0.1:{args.port}"
    urls = {"bare": f"{base}/bare/v1/chat/completions", "concilium": f"{base}/v1/chat/completions"}
    best: dict[str, tuple[float, float]] = {}
    try:
        with tempfile.TemporaryDirectory() as home:
            deploy(args.port, Path(home))
            for url in urls.values():  # warm-up (model load, connections, JIT paths)
                asyncio.run(load(url, 2 * args.concurrency, args.concurrency, "hello"))
            for r in range(rounds):
                for name, url in urls.items():
                    rps, lat = asyncio.run(load(url, n, args.concurrency, f"Reverse: word{r}"))
                    p50 = statistics.median(lat) * 1000
                    print(f"round {r} {name:>9}: {rps:8.1f} req/s  p50 {p50:7.2f} ms")
                    if name not in best or rps > best[name][0]:
                        best[name] = (rps, p50)
            alone = one_client(urls, 50 if args.quick else 300)
    finally:
        serve.shutdown()
        ray.shutdown()
    return report(best, alone, n, rounds, args)


def one_client(urls: dict[str, str], n: int) -> dict[str, float]:
    """p50 ms of each app with a single client (no queueing), in alternating blocks of 25."""
    lat: dict[str, list[float]] = {name: [] for name in urls}
    for block in range(max(1, n // 25)):
        for name, url in urls.items():
            _, got = asyncio.run(load(url, 25, 1, f"Reverse: alone{block}"))
            lat[name] += got
    return {name: statistics.median(v) * 1000 for name, v in lat.items()}


def report(
    best: dict[str, tuple[float, float]], alone: dict[str, float], n: int, rounds: int, args: Any
) -> int:
    (b_rps, b_p50), (c_rps, c_p50) = best["bare"], best["concilium"]
    ratio, added = c_rps / b_rps, c_p50 - b_p50
    added_alone = alone["concilium"] - alone["bare"]
    lines = [
        f"# Gateway overhead ({'quick' if args.quick else 'full'} run)",
        "",
        f"No-op expert; {args.concurrency} concurrent clients on 127.0.0.1; {n} requests per "
        f"round, best of {rounds} alternating rounds; one local Serve instance on 2 CPU cores "
        "(client, proxy and replicas share them).",
        "",
        "| app | throughput req/s | p50 latency ms |",
        "|---|---|---|",
        f"| bare Ray Serve ingress -> deployment | {b_rps:.1f} | {b_p50:.2f} |",
        f"| concilium gateway (routing) -> deployment | {c_rps:.1f} | {c_p50:.2f} |",
        f"| ratio / difference | {ratio:.2f}x | {added:+.2f} ms |",
        "",
        "One client at a time (no queueing), p50 over alternating blocks of 25 requests: bare "
        f"{alone['bare']:.2f} ms, concilium {alone['concilium']:.2f} ms ({added_alone:+.2f} ms "
        "per request: routing, query encoding, the routing object; reported, not a target).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    out = (
        ROOT
        / "benchmarks"
        / "results"
        / ("gateway_overhead_quick.md" if args.quick else "gateway_overhead.md")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    verdict = "PASS" if ratio >= 0.8 else "FAIL"
    print(f"TARGET throughput_vs_bare: {ratio:.3f} (goal >= 0.80) {verdict}")
    print(f"TARGET added_p50_ms: {added:.2f} (goal <= 5.00) {'PASS' if added <= 5 else 'FAIL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
