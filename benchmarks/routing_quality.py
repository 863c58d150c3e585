"""Routing quality on the demo pack's held-out queries: routers vs oracle, random, best single.

Every adapter of the pack (held-out ones included) is registered in a throw-away registry with the
real all-MiniLM-L6-v2 encoder. Every (query, adapter) pair is generated once, greedily, in
mixed-adapter batches (an outcome table, RouterBench-style); each router's end-to-end accuracy is
then read off that table for the adapter it chose, so all routers are compared on the same outputs.

    python benchmarks/routing_quality.py [--quick] [--pack demo_pack]

Ends with one `TARGET` line per acceptance target of the foundation issue.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from concilium.config import load_config  # noqa: E402
from concilium.experts.base import GenParams  # noqa: E402
from concilium.experts.local import GenRequest, LocalCausalLM  # noqa: E402
from concilium.orchestrator.service import build_service, install_pack, load_manifest  # noqa: E402

ROUTERS = ("retriever", "category", "random")


def load_queries(pack: Path, per_skill: int | None, seed: int) -> list[dict[str, str]]:
    rows = [json.loads(line) for line in (pack / "heldout.jsonl").read_text().splitlines() if line]
    by_skill: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        by_skill[r["skill"]].append(r)
    rng = random.Random(seed)
    out = []
    for skill in sorted(by_skill):
        qs = by_skill[skill]
        out += rng.sample(qs, per_skill) if per_skill and per_skill < len(qs) else qs
    return out


def outcome_table(
    lm: LocalCausalLM, queries: list[dict[str, str]], jobs: list[tuple[int, str | None]], batch: int
) -> dict[tuple[int, str | None], bool]:
    """(query index, adapter) -> exact match, generated in mixed-adapter batches."""
    table: dict[tuple[int, str | None], bool] = {}
    for s in range(0, len(jobs), batch):
        chunk = jobs[s : s + batch]
        reqs = [
            GenRequest(
                [{"role": "user", "content": queries[i]["query"]}],
                GenParams(max_tokens=len(queries[i]["answer"]) + 4),
                a,
            )
            for i, a in chunk
        ]
        for (i, a), g in zip(chunk, lm.generate_batch(reqs), strict=True):
            table[(i, a)] = g.text.strip() == queries[i]["answer"]
    return table


def _best_single_row(single: dict[str, float], oracle: float) -> list[str]:
    if not single:
        return ["| best single expert | (full run only) | | |"]
    best = max(single, key=lambda s: single[s])
    return [
        f"| best single expert ({best}) | – | {single[best]:.3f} | {single[best] / oracle:.3f} |"
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pack", type=Path, default=ROOT / "demo_pack")
    ap.add_argument("--quick", action="store_true", help="8 queries per skill (< 1 minute)")
    ap.add_argument("--per-skill", type=int, default=None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    per_skill = args.per_skill or (8 if args.quick else None)
    out_path = args.out or ROOT / "benchmarks" / "results" / (
        "routing_quality_quick.md" if args.quick else "routing_quality.md"
    )
    t0 = time.perf_counter()

    with tempfile.TemporaryDirectory() as home:
        cfg = load_config(
            None,
            home=Path(home),
            seed_embedder=False,
            routers={
                "retriever": {"kind": "retriever"},
                "category": {"kind": "category"},
                "random": {"kind": "random", "seed": args.seed},
            },
        )
        svc = build_service(cfg, seed=False)
        install_pack(svc.registry, args.pack, include_held_out=True)
        manifest = load_manifest(args.pack)
        skills = [e["name"] for e in manifest["experts"]]
        queries = load_queries(args.pack, per_skill, args.seed)
        orch = svc.orchestrator

        t_route = time.perf_counter()
        chosen = {
            r: [orch.route(q["query"], model=f"router-{r}").decision.expert for q in queries]
            for r in ROUTERS
        }
        route_ms = (time.perf_counter() - t_route) * 1000 / (len(ROUTERS) * len(queries))

        base_rec = svc.registry.get(manifest["base"]["name"])
        lm = LocalCausalLM(Path(base_rec.spec.path), max_adapters=len(skills))
        for s in skills:
            lm.ensure_adapter(s, svc.registry.runtime_path(svc.registry.get(s)))
        base_name = manifest["base"]["name"]  # the base is a candidate too: no adapter
        chosen = {r: [None if c == base_name else c for c in cs] for r, cs in chosen.items()}
        # the full run fills the whole (query, adapter) table, so the best single expert is
        # known; --quick generates only the pairs the routers, the oracle and the base need
        if args.quick:
            need = {(i, a) for r in ROUTERS for i, a in enumerate(chosen[r])}
            need |= {(i, q["skill"]) for i, q in enumerate(queries)}
            need |= {(i, None) for i in range(len(queries))}
        else:
            need = {(i, a) for a in [None, *skills] for i in range(len(queries))}
        jobs = sorted(need, key=lambda j: (j[0], j[1] or ""))
        table = outcome_table(lm, queries, jobs, args.batch)

    n = len(queries)
    oracle = sum(table[(i, q["skill"])] for i, q in enumerate(queries)) / n
    base = sum(table[(i, None)] for i in range(n)) / n
    single = {} if args.quick else {s: sum(table[(i, s)] for i in range(n)) / n for s in skills}
    rows = []
    for r in ROUTERS:
        route_acc = sum(c == q["skill"] for c, q in zip(chosen[r], queries, strict=True)) / n
        e2e = sum(table[(i, c)] for i, c in enumerate(chosen[r])) / n
        rows.append((r, route_acc, e2e, e2e / oracle if oracle else 0.0))
    elapsed = time.perf_counter() - t0

    lines = [
        f"# Routing quality on the demo pack ({'quick' if args.quick else 'full'} run)",
        "",
        f"{n} held-out queries ({n // len(skills)} per skill, {len(skills)} skills; phrasings "
        "disjoint from the pilots), greedy decoding, exact match. Encoder: all-MiniLM-L6-v2.",
        f"Mean routing time {route_ms:.1f} ms/query (in-process, CPU). Wall time {elapsed:.0f} s.",
        "",
        "| router | routing accuracy | end-to-end accuracy | e2e / oracle |",
        "|---|---|---|---|",
        *[f"| {r} | {ra:.3f} | {e:.3f} | {x:.3f} |" for r, ra, e, x in rows],
        f"| oracle (true skill's adapter) | 1.000 | {oracle:.3f} | 1.000 |",
        *_best_single_row(single, oracle),
        f"| base model, no adapter | – | {base:.3f} | {base / oracle:.3f} |",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(report)
    r_acc, r_ratio = rows[0][1], rows[0][3]
    print(
        f"TARGET retriever_routing_accuracy: {r_acc:.3f} (goal >= 0.95) "
        f"{'PASS' if r_acc >= 0.95 else 'FAIL'}"
    )
    print(
        f"TARGET retriever_e2e_vs_oracle: {r_ratio:.3f} (goal >= 0.95) "
        f"{'PASS' if r_ratio >= 0.95 else 'FAIL'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
