"""Choose the retriever's aggregate without touching the held-out set: leave one phrasing out.

The texts the registry embeds as an expert's pilots (its ``examples`` and the prompts of its
``train_examples``, see ``registry.pilot_texts``) are grouped by phrasing (the instruction before
the payload). Each phrasing in turn is removed from every expert's pilots and its queries are
routed by the real ``RetrieverRouter`` against what is left, for every (aggregate, description
weight) in a grid. The held-out evaluation queries (``heldout.jsonl``) are never read.

    python benchmarks/retriever_cv.py [--pack demo_pack]

Both query-pilot similarities are in the grid: the sentence embeddings' cosine and late
interaction (ColBERT's MaxSim over the MiniLM token embeddings, from the same forward).
Prints the grid and writes it to ``benchmarks/results/retriever_cv.md``; the routers' defaults
(similarity, aggregate, τ, description weight) come from this table. No TARGET lines: this selects
a setting, the targets are `routing_quality.py`'s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from concilium.experts.embedder import SentenceEncoder  # noqa: E402
from concilium.orchestrator.service import load_manifest  # noqa: E402
from concilium.registry.index import pack_tokens  # noqa: E402
from concilium.registry.registry import pilot_texts  # noqa: E402
from concilium.routers.base import Candidate, Query  # noqa: E402
from concilium.routers.query.retriever import RetrieverConfig, RetrieverRouter  # noqa: E402

GRID: list[dict[str, object]] = [
    {"aggregate": "mean"},
    {"aggregate": "max"},
    {"aggregate": "topk", "topk": 3},
    {"aggregate": "softmax", "pilot_temperature": 0.05},
    {"aggregate": "softmax", "pilot_temperature": 0.1},
    {"aggregate": "softmax", "pilot_temperature": 0.2},
]
WEIGHTS = (0.0, 0.25, 0.5, 1.0)
SIMILARITIES = ("sentence", "late_interaction")


def phrasing(text: str) -> str:
    return text.rsplit(":", 1)[0].strip().lower()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pack", type=Path, default=ROOT / "demo_pack")
    args = ap.parse_args()
    t0 = time.perf_counter()
    experts = [
        e for e in load_manifest(args.pack)["experts"] if e.get("task", "generate") == "generate"
    ]
    enc = SentenceEncoder()
    names = [e["name"] for e in experts]
    texts = {e["name"]: pilot_texts(e) for e in experts}
    encoded = {n: enc.encode_with_tokens(t) for n, t in texts.items()}
    vecs = {n: v for n, (v, _) in encoded.items()}
    toks = {n: t for n, (_, t) in encoded.items()}
    desc = {e["name"]: enc.encode([e.get("description") or e["name"]])[0] for e in experts}
    groups = sorted({(n, phrasing(t)) for n, ts in texts.items() for t in ts})
    results: dict[tuple[str, str, float], list[int]] = {}
    for n_out, ph in groups:
        cands = []
        for n in names:
            keep = [i for i, t in enumerate(texts[n]) if phrasing(t) != ph]
            flat, offsets = pack_tokens([toks[n][i] for i in keep])
            cands.append(
                Candidate(
                    n,
                    "lora",
                    "generate",
                    vecs[n][keep],
                    desc[n],
                    pilot_tokens=flat,
                    pilot_token_offsets=offsets,
                )
            )
        q_idx = [i for i, t in enumerate(texts[n_out]) if phrasing(t) == ph]
        for sim in SIMILARITIES:
            for cfg in GRID:
                for w in WEIGHTS:
                    router = RetrieverRouter(
                        RetrieverConfig(**cfg, description_weight=w, similarity=sim)  # type: ignore[arg-type]
                    )
                    router.prepare(cands)
                    hits = results.setdefault((sim, _label(cfg), w), [0, 0])
                    for i in q_idx:
                        q = Query(texts[n_out][i], vecs[n_out][i], tokens=toks[n_out][i])
                        hits[0] += router.route(q, cands).expert == n_out
                        hits[1] += 1
    lines = [
        "# Retriever aggregate, leave-one-phrasing-out cross-validation",
        "",
        f"{len(groups)} phrasings over {len(names)} experts of `{args.pack.name}`, "
        f"{sum(len(t) for t in texts.values())} pilot texts (examples + training prompts); "
        f"held-out queries not used. Wall time {time.perf_counter() - t0:.0f} s.",
        "",
        "| similarity | aggregate | " + " | ".join(f"description {w:g}" for w in WEIGHTS) + " |",
        "|---|---|" + "---|" * len(WEIGHTS),
    ]
    acc = {k: v[0] / v[1] for k, v in results.items()}
    for sim in SIMILARITIES:
        for cfg in GRID:
            row = [f"{acc[(sim, _label(cfg), w)]:.3f}" for w in WEIGHTS]
            lines.append(f"| {sim} | {_label(cfg)} | " + " | ".join(row) + " |")
    top = max(acc.values())
    best = [
        f"{s}, {a}, description weight {w:g}" for (s, a, w), v in acc.items() if v >= top - 1e-9
    ]
    lines += ["", f"Best ({top:.3f}): " + "; ".join(best) + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "benchmarks" / "results" / "retriever_cv.md"
    out.write_text(text)
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


def _label(cfg: dict[str, object]) -> str:
    extra = {k: v for k, v in cfg.items() if k != "aggregate"}
    return str(cfg["aggregate"]) + (
        f" ({', '.join(f'{k}={v}' for k, v in extra.items())})" if extra else ""
    )


if __name__ == "__main__":
    sys.exit(main())
