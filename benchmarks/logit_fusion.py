"""Ensemble fusion on the demo pack: answers voted (MoE²'s weighted vote) vs logits fused in one
replica (every token from the gate-weighted mixture of the members' distributions).

Both run the same plans: the retriever routes each held-out query, the ensemble planner picks up
to `max_experts` members (no cost ceiling), and the request goes through the real in-process
orchestrator (`strategy: "ensemble"`, `fusion: "vote" | "logits"`), next to the single routed
expert (`strategy: "single"`). Exact match per task family, experts per request, cost, and wall
time; the demo pack's members are all adapters of one base, so "logits" is one call per request.

    python benchmarks/logit_fusion.py [--quick] [--pack demo_pack] [--max-experts 2 3]

Ends with the `TARGET` line of issue 5's ensemble point, measured for each fusion.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from routing_quality import load_queries  # noqa: E402

from concilium.config import load_config  # noqa: E402
from concilium.orchestrator.schemas import ChatCompletionRequest  # noqa: E402
from concilium.orchestrator.service import build_service, install_pack  # noqa: E402


async def run_mode(
    orch: Any, queries: list[dict[str, str]], routing: dict[str, Any], concurrency: int
) -> dict[str, Any]:
    """Every query through orchestrator.chat with `routing`; exact match, experts, cost."""
    sem = asyncio.Semaphore(concurrency)

    async def one(q: dict[str, str]) -> tuple[bool, int, float]:
        req = ChatCompletionRequest.model_validate(
            {
                "model": "auto",
                "messages": [{"role": "user", "content": q["query"]}],
                "max_tokens": len(q["answer"]) + 4,
                "routing": routing,
            }
        )
        async with sem:
            out = await orch.chat(req)
        text = out.body["choices"][0]["message"]["content"].strip()
        r = out.body["routing"]
        return text == q["answer"], len(r["experts"]), float(r["cost"])

    t0 = time.perf_counter()
    res = await asyncio.gather(*(one(q) for q in queries))
    wall = time.perf_counter() - t0
    fam: dict[str, list[bool]] = defaultdict(list)
    for q, (ok, _, _) in zip(queries, res, strict=True):
        fam[q["skill"]].append(ok)
    return {
        "acc": sum(ok for ok, _, _ in res) / len(res),
        "experts": sum(n for _, n, _ in res) / len(res),
        "cost": sum(c for _, _, c in res) / len(res),
        "wall_s": wall,
        "family": {s: sum(v) / len(v) for s, v in fam.items()},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pack", type=Path, default=ROOT / "demo_pack")
    ap.add_argument("--quick", action="store_true", help="6 queries per skill, max_experts 3")
    ap.add_argument("--per-skill", type=int, default=None)
    ap.add_argument("--max-experts", type=int, nargs="+", default=None)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    per_skill = args.per_skill or (6 if args.quick else None)
    sizes = args.max_experts or ([3] if args.quick else [2, 3])
    queries = load_queries(args.pack, per_skill, args.seed)
    modes: list[tuple[str, dict[str, Any]]] = [("single (routed expert)", {"strategy": "single"})]
    for k in sizes:
        for fusion in ("vote", "logits"):
            modes.append(
                (
                    f"ensemble ≤{k}, {fusion}",
                    {"strategy": "ensemble", "max_experts": k, "fusion": fusion},
                )
            )
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as home:
        cfg = load_config(
            None,
            home=Path(home),
            seed_embedder=False,
            train_gates=False,  # token routing is not used here
            routers={"retriever": {"kind": "retriever"}},
        )
        svc = build_service(cfg, seed=False)
        install_pack(svc.registry, args.pack, include_held_out=True)
        results = {
            name: asyncio.run(run_mode(svc.orchestrator, queries, routing, args.concurrency))
            for name, routing in modes
        }
    report(args, queries, results, sizes, time.perf_counter() - t0)
    return 0


def report(
    args: argparse.Namespace,
    queries: list[dict[str, str]],
    results: dict[str, dict[str, Any]],
    sizes: list[int],
    elapsed: float,
) -> None:
    single = results["single (routed expert)"]
    skills = sorted(single["family"])
    lines = [
        f"# Ensemble fusion: vote vs logits ({'quick' if args.quick else 'full'} run)",
        "",
        f"{len(queries)} held-out queries of the demo pack ({len(queries) // len(skills)} per "
        "skill), retriever routing, no cost ceiling, greedy decoding, exact match; in-process "
        f"orchestrator, {args.concurrency} requests in flight. Wall time {elapsed:.0f} s.",
        "",
        "| mode | exact match | vs single | experts / request | cost / request | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['acc']:.3f} | {r['acc'] / single['acc']:.3f}x | {r['experts']:.2f} | "
            f"{r['cost']:.3g} | {r['wall_s']:.1f} |"
        )
    lines += ["", "Per task family (exact match):", ""]
    lines += ["| family | " + " | ".join(results) + " |", "|---" * (len(results) + 1) + "|"]
    for s in skills:
        cells = " | ".join(f"{r['family'][s]:.2f}" for r in results.values())
        lines.append(f"| {s} | {cells} |")
    lines.append("")
    for k in sizes:
        for fusion in ("vote", "logits"):
            r = results[f"ensemble ≤{k}, {fusion}"]
            wins = [s for s in skills if r["family"][s] > single["family"][s] + 1e-12]
            lines.append(
                f"TARGET ensemble_beats_single_families (max_experts {k}, fusion {fusion}): "
                f"{len(wins)} (goal >= 1) {'PASS' if wins else 'FAIL'}"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    name = "logit_fusion_quick.md" if args.quick else "logit_fusion.md"
    out = ROOT / "benchmarks" / "results" / name
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    raise SystemExit(main())
