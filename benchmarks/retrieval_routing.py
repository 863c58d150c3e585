"""Embedding experts routed RouterRetriever's way: nDCG@10 of routed vs base vs single vs oracle.

The embedding pack (`embed_pack/`: all-MiniLM-L6-v2 plus one LoRA per docstring domain) is
installed into a throw-away registry through the same composition root as the gateway. Each
held-out query is routed by the retriever router over the experts' pilot embeddings (exactly what
`/v1/embeddings` with `model: "auto"` does), then its domain's held-out corpus is searched with the
chosen expert's embeddings, computed by the in-process expert pool. Every (query, expert) nDCG@10
is computed once, so routed, single-expert and oracle scores come from identical rankings.

    python benchmarks/retrieval_routing.py [--quick] [--pack embed_pack]

Ends with `TARGET` lines (measured, never hard-coded).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from concilium.config import load_config  # noqa: E402
from concilium.embedpack import install_embed_pack  # noqa: E402
from concilium.embedpack.evaluate import (  # noqa: E402
    NdcgTable,
    ndcg_table,
    ratio_ci,
    sample_heldout,
)
from concilium.embedpack.manifest import load_heldout, load_manifest  # noqa: E402
from concilium.orchestrator.encoding import encode_query  # noqa: E402
from concilium.orchestrator.objective import Objective  # noqa: E402
from concilium.orchestrator.service import build_service  # noqa: E402

ROUTER = "retriever"


def route_all(svc, texts: list[str], excluded: frozenset[str]) -> list[str]:  # type: ignore[no-untyped-def]
    """The expert `/v1/embeddings` with model router-retriever would pick for each text."""
    encoded = encode_query(svc.registry.encoder, texts)  # the router's query encoding, batched
    orch, objective = svc.orchestrator, Objective(excluded=excluded)
    return [
        orch.route(
            t,
            model=f"router-{ROUTER}",
            task="embed",
            max_tokens=1,
            encoded=e,
            objective=objective,
        ).decision.expert
        for t, e in zip(texts, encoded, strict=True)
    ]


def pool_embedder(svc, loop: asyncio.AbstractEventLoop):  # type: ignore[no-untyped-def]
    entries = svc.orchestrator.catalogs.get().entries

    def embed(expert: str, texts: list[str]) -> np.ndarray:
        out: list[list[float]] = []
        for s in range(0, len(texts), 256):
            chunk = texts[s : s + 256]
            out += loop.run_until_complete(svc.backend.embed(entries[expert].target, chunk))
        return np.asarray(out, dtype=np.float32)

    return embed


def report(
    table: NdcgTable,
    chosen: list[str],
    experts_only: list[str],
    manifest: dict,
    quick: bool,  # type: ignore[type-arg]
) -> list[str]:
    base = manifest["base"]["name"]
    domain_expert = {e["tags"][-1]: e["name"] for e in manifest["experts"]}
    singles = {e: table.mean(e) for e in table.experts}
    best = max((e for e in table.experts), key=lambda e: singles[e])
    routed = float(table.routed(chosen).mean())
    matched = float(table.routed([domain_expert[q.domain] for q in table.queries]).mean())
    oracle = float(table.oracle().mean())
    rows = [(f"base ({base})", singles[base])]
    rows += [(f"single: {e}", singles[e]) for e in table.experts if e != base]
    rows += [
        (f"routed ({ROUTER} router over pilots; `model: auto`)", routed),
        (
            f"routed, domain experts only (`excluded_experts: [{base}]`)",
            float(table.routed(experts_only).mean()),
        ),
        ("domain-matched expert (perfect routing)", matched),
        ("oracle (best expert per query)", oracle),
    ]
    n = len(table.queries)
    lines = [
        "# Retrieval routing: domain embedding experts, nDCG@10",
        "",
        f"{'Quick run: ' if quick else ''}{n} held-out docstring queries over "
        f"{len(domain_expert)} domains; each is searched in its own domain's held-out corpus "
        "(BEIR protocol). Experts: all-MiniLM-L6-v2 and one LoRA per domain "
        "(`embed_pack/`, see its REPORT.md). Routed = the retriever router's choice per query "
        f'(the `/v1/embeddings` `model: "auto"` path). Best single expert: {best}.',
        "",
        "| system | nDCG@10 | vs base | vs best single | vs oracle |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {v:.4f} | {v / singles[base]:.3f} | {v / singles[best]:.3f} | "
        f"{v / oracle:.3f} |"
        for name, v in rows
    ]
    lines += ["", *_intervals(table, chosen, base, best)]
    lines += ["", *_per_domain(table, chosen, domain_expert, base), ""]
    lines += _targets(routed, singles[base], singles[best], oracle)
    return lines


def _intervals(table: NdcgTable, chosen: list[str], base: str, best: str) -> list[str]:
    """Paired-bootstrap 95 % intervals of the routed ratios (same queries, resampled together)."""
    routed = table.routed(chosen)
    out = ["Routed nDCG@10 ratio, 95 % paired-bootstrap interval over queries:", ""]
    for label, other in (("base", base), (f"best single ({best})", best)):
        col = table.scores[:, table.experts.index(other)]
        r, lo, hi = ratio_ci(routed, col)
        out.append(f"- vs {label}: {r:.3f} [{lo:.3f}, {hi:.3f}]")
    return out


def _per_domain(
    table: NdcgTable, chosen: list[str], domain_expert: dict[str, str], base: str
) -> list[str]:
    experts = list(table.experts)
    head = ["domain", "queries", *[e.removeprefix(f"{base}-") for e in experts], "routed", "oracle"]
    lines = [
        "Per domain (columns: nDCG@10 of each expert; routing accuracy = share of queries routed "
        "to the domain's own expert):",
        "",
        "| " + " | ".join([*head, "routing accuracy", "routed to base"]) + " |",
        "|---|" + "---:|" * (len(head) + 1),
    ]
    routed, oracle = table.routed(chosen), table.oracle()
    for d in sorted(domain_expert):
        idx = [i for i, q in enumerate(table.queries) if q.domain == d]
        cells = [f"{table.scores[idx, e].mean():.3f}" for e in range(len(experts))]
        acc = np.mean([chosen[i] == domain_expert[d] for i in idx])
        to_base = np.mean([chosen[i] == base for i in idx])
        lines.append(
            f"| {d} | {len(idx)} | "
            + " | ".join(cells)
            + f" | {routed[idx].mean():.3f} | {oracle[idx].mean():.3f}"
            + f" | {acc:.2f} | {to_base:.2f} |"
        )
    return lines


def _targets(routed: float, base: float, best: float, oracle: float) -> list[str]:
    def line(name: str, x: float, goal: float) -> str:
        return f"TARGET {name}: {x:.3f} (goal > {goal}) {'PASS' if x > goal else 'FAIL'}"

    return [
        line("routed_ndcg_vs_base", routed / base, 1.0),
        line("routed_ndcg_vs_best_single", routed / best, 1.0),
        f"INFO routed_ndcg_vs_oracle: {routed / oracle:.3f}",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pack", type=Path, default=ROOT / "embed_pack")
    ap.add_argument("--quick", action="store_true", help="10 queries, 30 documents per domain")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out_path = args.out or ROOT / "benchmarks" / "results" / (
        "retrieval_routing_quick.md" if args.quick else "retrieval_routing.md"
    )
    t0 = time.perf_counter()
    manifest = load_manifest(args.pack)
    queries, corpus = sample_heldout(
        load_heldout(args.pack),
        queries_per_domain=10 if args.quick else None,
        corpus_per_domain=30 if args.quick else None,
        seed=args.seed,
    )
    loop = asyncio.new_event_loop()
    with tempfile.TemporaryDirectory() as home:
        cfg = load_config(None, home=Path(home), seed_embedder=False)
        svc = build_service(cfg, seed=False)
        install_embed_pack(svc.registry, args.pack)
        texts = [q.query for q in queries]
        chosen = route_all(svc, texts, frozenset())
        experts_only = route_all(svc, texts, frozenset({manifest["base"]["name"]}))
        experts = [manifest["base"]["name"], *(e["name"] for e in manifest["experts"])]
        table = ndcg_table(queries, corpus, experts, pool_embedder(svc, loop))
        loop.run_until_complete(svc.backend.aclose())
    loop.close()
    lines = report(table, chosen, experts_only, manifest, args.quick)
    took = time.perf_counter() - t0
    lines.insert(-3, f"Run time: {took:.0f} s with {torch.get_num_threads()} torch thread(s).\n")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
