"""Choose the predictive router's pilot blend without touching the held-out set.

Leave one phrasing out over the demo pack's *fit* table (the adapters' training prompts, with
every expert's outcome on each): each phrasing in turn is removed from the outcome rows the router
learns from (kNN and logistic heads) and from every expert's pilots; its queries are then routed
by the real ``PredictiveRouter`` for each ``pilot_blend`` β in a grid — the prior of an expert
with a learned head is (1 − β)·head + β·pilot prior — and scored by the fit table's exact match.
The held-out evaluation queries (the test table) are never read.

    python benchmarks/predictive_cv.py [--pack demo_pack]

Writes ``benchmarks/results/predictive_cv.md``; the router's default β comes from this table.
No TARGET lines: this selects a setting, the targets are `concilium eval`'s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retriever_cv import phrasing  # noqa: E402

from concilium.experts.embedder import SentenceEncoder  # noqa: E402
from concilium.orchestrator.service import load_manifest  # noqa: E402
from concilium.outcomes.store import Labelled  # noqa: E402
from concilium.outcomes.table import OutcomeTable  # noqa: E402
from concilium.registry.index import pack_tokens  # noqa: E402
from concilium.registry.registry import pilot_texts  # noqa: E402
from concilium.routers.base import Candidate, Query  # noqa: E402
from concilium.routers.query.predictive import PredictiveRouter  # noqa: E402
from concilium.routers.query.retriever import RetrieverRouter  # noqa: E402

BETAS = (0.0, 0.25, 0.5, 0.75, 1.0)
FIT = ROOT / "benchmarks" / "results" / "outcomes" / "demo_fit_all.csv"


class Rows:
    """A fixed set of labelled outcome rows as the router's outcome source."""

    def __init__(self, rows: Labelled) -> None:
        self.rows = rows

    def version(self) -> int:
        return 0

    def labelled(self, dim: int) -> Labelled:
        return self.rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pack", type=Path, default=ROOT / "demo_pack")
    ap.add_argument("--fit", type=Path, default=FIT, help="the fit outcome table (CSV)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    fit = OutcomeTable.read(args.fit)
    manifest = load_manifest(args.pack)
    specs = {e["name"]: e for e in [manifest["base"], *manifest["experts"]]}
    enc = SentenceEncoder()
    pilots = {n: _pilots(enc, specs[n]) for n in fit.experts}
    q_vecs, q_tokens = enc.encode_with_tokens(fit.prompts)
    phrasings = [phrasing(p) for p in fit.prompts]
    chosen: dict[Any, list[float]] = {b: [] for b in (*BETAS, "retriever")}
    for g in sorted(set(phrasings)):
        train = [i for i, p in enumerate(phrasings) if p != g]
        cands = [_without(n, pilots[n], g) for n in fit.experts]
        router = PredictiveRouter()
        router.attach(Rows(_labelled(fit, q_vecs, train)))
        router.prepare(cands)
        retriever = RetrieverRouter()
        retriever.prepare(cands)
        for i in (i for i, p in enumerate(phrasings) if p == g):
            q = Query(fit.prompts[i], q_vecs[i], None, q_tokens[i])
            chosen["retriever"].append(_quality(fit, i, retriever.route(q, cands).expert))
            for b in BETAS:  # the heads are fitted once per fold, on the first request
                router.config = router.config.model_copy(update={"pilot_blend": b})
                chosen[b].append(_quality(fit, i, router.route(q, cands).expert))
    report(args, fit, chosen, len(set(phrasings)), time.perf_counter() - t0)
    return 0


def _pilots(enc: SentenceEncoder, spec: dict[str, Any]) -> dict[str, Any]:
    desc = spec.get("description") or spec["name"]
    texts = pilot_texts(spec) or [desc]  # as the registry embeds them
    vecs, tokens = enc.encode_with_tokens(texts)
    return {"texts": texts, "vecs": vecs, "tokens": tokens, "desc": enc.encode([desc])[0]}


def _without(name: str, p: dict[str, Any], g: str) -> Candidate:
    keep = [i for i, t in enumerate(p["texts"]) if phrasing(t) != g] or list(range(len(p["texts"])))
    flat, offsets = pack_tokens([p["tokens"][i] for i in keep])
    return Candidate(
        name,
        "lora",
        "generate",
        p["vecs"][keep],
        p["desc"],
        pilot_tokens=flat,
        pilot_token_offsets=offsets,
    )


def _labelled(fit: OutcomeTable, vecs: np.ndarray, rows: list[int]) -> Labelled:
    e = len(fit.experts)
    return Labelled(
        embeddings=np.repeat(vecs[rows], e, axis=0),
        experts=[x for _ in rows for x in fit.experts],
        quality=fit.quality[rows].reshape(-1).astype(np.float32),
    )


def _quality(fit: OutcomeTable, i: int, expert: str) -> float:
    return float(fit.quality[i, fit.column(expert)])


def report(
    args: argparse.Namespace,
    fit: OutcomeTable,
    chosen: dict[Any, list[float]],
    folds: int,
    elapsed: float,
) -> None:
    oracle = float(fit.quality.max(axis=1).mean())
    lines = [
        "# Predictive router pilot blend, leave-one-phrasing-out cross-validation",
        "",
        f"{len(fit.prompts)} fit queries ({args.fit.name}), {folds} phrasings, "
        f"{len(fit.experts)} experts; held-out queries not used. Oracle {oracle:.3f}. "
        f"Wall time {elapsed:.0f} s.",
        "",
        "| router | quality | % of oracle |",
        "|---|---|---|",
    ]
    for k, v in chosen.items():
        label = "retriever (pilots only)" if k == "retriever" else f"predictive, pilot_blend {k:g}"
        lines.append(f"| {label} | {np.mean(v):.4f} | {np.mean(v) / oracle:.1%} |")
    best = max(BETAS, key=lambda b: (np.mean(chosen[b]), -b))
    lines += ["", f"Best pilot_blend: {best:g}."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "benchmarks" / "results" / "predictive_cv.md"
    out.write_text(text)
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    raise SystemExit(main())
