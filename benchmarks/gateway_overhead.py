"""What the concilium gateway costs over bare Ray Serve, with the same no-op expert behind both.

(a) bare: a minimal FastAPI ingress deployment that forwards each chat request to the no-op
    expert deployment and returns its answer (Ray Serve as a user would wire it by hand).
(b) concilium: the real Gateway deployment: OpenAI request validation, query encoding with
    all-MiniLM-L6-v2 (batched across concurrent requests), retriever routing over the registry,
    dispatch through the same kind of handle, routing object + x-concilium-* headers, metrics.

Both run in one local Serve instance, driven by the same closed-loop client (64 concurrent
connections to 127.0.0.1, bounded in requests), alternating rounds; best round of each reported.
A third round per cycle sends (b) requests naming the expert (no routing, no query encoding), and
every round's CPU time is split by process (Linux /proc): what routing costs, and where the rest
goes. Those two are reported, not targets.

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


async def load(
    url: str, n: int, concurrency: int, content: str, model: str = "auto"
) -> tuple[float, list[float]]:
    """Closed loop: `concurrency` clients send `n` requests in all. (req/s, latencies in s)."""
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
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


GROUPS = {  # process -> group, by a piece of its command line (Ray names its workers)
    "ProxyActor": "proxy",
    "BareIngress": "ingress",
    ":Gateway": "ingress",
    "NoOpExpert": "expert",
}


def process_cpu() -> dict[str, float]:
    """CPU seconds used so far by each group of this machine's processes (Linux /proc; {}
    elsewhere): this client, the Serve proxy, the ingress (bare) or gateway replica, the no-op
    expert replica, everything else (Ray's own daemons included)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not pid.isdigit():
            continue  # self, thread-self (this process again) and the kernel's files
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except (OSError, IndexError):
            continue  # not a process, or gone
        group = "client" if pid == str(os.getpid()) else "other"
        group = next((g for key, g in GROUPS.items() if key in cmd), group)
        out[group] = out.get(group, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def settle(max_s: float = 30.0, idle_cores: float = 0.3) -> float:
    """Wait until the machine is quiet (Ray starts worker processes and replicas load models
    for a while after `serve.run` returns): at most `max_s`. Returns the seconds waited."""
    t0 = last = time.monotonic()
    used = sum(process_cpu().values())
    while time.monotonic() - t0 < max_s:
        time.sleep(1.0)
        now, total = time.monotonic(), sum(process_cpu().values())
        if not used or (total - used) / (now - last) < idle_cores:
            break
        used, last = total, now
    return time.monotonic() - t0


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
    apps = [("bare", "auto"), ("concilium", "auto"), ("concilium", "noop")]  # noop: no routing
    best: dict[str, tuple[float, float]] = {}
    cpu: dict[str, dict[str, float]] = {}  # app -> group -> CPU seconds, over all rounds
    try:
        with tempfile.TemporaryDirectory() as home:
            deploy(args.port, Path(home))
            for url in urls.values():  # warm-up (model load, connections, JIT paths)
                asyncio.run(load(url, 2 * args.concurrency, args.concurrency, "hello"))
            print(f"machine quiet after {settle():.0f} s")
            for r in range(rounds):
                for name, model in apps:
                    before = process_cpu()
                    rps, lat = asyncio.run(
                        load(urls[name], n, args.concurrency, f"Reverse: word{r}", model)
                    )
                    spent = cpu.setdefault(f"{name} {model}", {})
                    for g, s in process_cpu().items():
                        spent[g] = spent.get(g, 0.0) + s - before.get(g, 0.0)
                    p50 = statistics.median(lat) * 1000
                    print(f"round {r} {name:>9} {model}: {rps:8.1f} req/s  p50 {p50:7.2f} ms")
                    if model == "auto" and (name not in best or rps > best[name][0]):
                        best[name] = (rps, p50)
            alone = one_client(urls, 50 if args.quick else 300)
    finally:
        serve.shutdown()
        ray.shutdown()
    return report(best, alone, cpu_table(cpu, n * rounds), n, rounds, args)


def cpu_table(cpu: dict[str, dict[str, float]], requests: int) -> list[str]:
    """Markdown rows: CPU ms per request by process group, for each app and model."""
    if not any(cpu.values()):
        return ["(no per-process CPU: /proc is not available here)"]
    groups = ["client", "proxy", "ingress", "expert", "other"]
    label = {
        "bare auto": "bare Ray Serve",
        "concilium auto": "concilium, model auto (routing)",
        "concilium noop": "concilium, model named (no routing)",
    }
    rows = ["| app | " + " | ".join(groups) + " | total |", "|---" * (len(groups) + 2) + "|"]
    for app, spent in cpu.items():
        ms = [max(spent.get(g, 0.0), 0.0) * 1000 / requests for g in groups]
        rows.append(
            f"| {label[app]} | " + " | ".join(f"{v:.1f}" for v in ms) + f" | {sum(ms):.1f} |"
        )
    return rows


def one_client(urls: dict[str, str], n: int) -> dict[str, float]:
    """p50 ms of each app with a single client (no queueing), in alternating blocks of 25."""
    lat: dict[str, list[float]] = {name: [] for name in urls}
    for block in range(max(1, n // 25)):
        for name, url in urls.items():
            _, got = asyncio.run(load(url, 25, 1, f"Reverse: alone{block}"))
            lat[name] += got
    return {name: statistics.median(v) * 1000 for name, v in lat.items()}


def report(
    best: dict[str, tuple[float, float]],
    alone: dict[str, float],
    cpu: list[str],
    n: int,
    rounds: int,
    args: Any,
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
        "CPU ms per request under the 64-client load, by process (summed over the rounds; the "
        "machine's 2 cores bound the total): client = this load generator, ingress = the bare "
        "ingress or the concilium gateway replica, other = Ray's daemons and the rest.",
        "",
        *cpu,
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
