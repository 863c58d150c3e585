"""`concilium eval`: routers and strategies vs baselines on outcome tables with checkable answers.

Per router and strategy: quality, cost, latency, experts called, % of oracle, AIQ and APGR,
against random, cheapest, best single expert (chosen on the fit table), every single expert (and
their hull) and the oracle. Writes a markdown table and a Pareto plot, and ends with this issue's
TARGET lines. The demo pack's outcome tables are built once by running every expert (cached).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from concilium.evaluation.build import pack_experts
from concilium.evaluation.metrics import Point, aiq, apgr, best_at, hull
from concilium.evaluation.simulate import Replay, Result, TableSource
from concilium.outcomes.table import OutcomeTable
from concilium.registry.index import TextEncoder, encode_texts, pack_tokens
from concilium.registry.registry import pilot_texts
from concilium.routers.base import Candidate
from concilium.routers.query.category import CategoryRouter
from concilium.routers.query.predictive import PredictiveRouter
from concilium.routers.query.retriever import RetrieverRouter

Progress = Callable[[str], None]
WEIGHTS = (1.0, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)
THRESHOLDS = (-0.005, -0.02, -0.05, -0.1, -0.3, -1.0)
BUDGET_MULTIPLES = (1.0, 1.5, 2.0, 3.0)  # × the median single-expert estimate


@dataclass
class Curve:
    """One router/strategy: its settings and their results."""

    name: str
    kind: str  # baseline | router
    points: list[tuple[str, Result]] = field(default_factory=list)

    def xy(self) -> list[Point]:
        return [(r.mean()["cost"], r.mean()["quality"]) for _, r in self.points]


@dataclass
class EvalReport:
    curves: list[Curve]
    oracle: Result
    best_single: str
    cheapest: str
    families: list[str]
    family_rows: list[dict[str, Any]]
    targets: list[tuple[str, float, str, bool]]
    meta: dict[str, Any]


def demo_replay(
    pack_dir: Path, encoder: TextEncoder, fit: OutcomeTable, test: OutcomeTable
) -> tuple[Replay, np.ndarray]:
    """The test-table replay with the pack's candidates; also the fit table's embeddings.

    With an encoder that gives token embeddings the pilots and the test queries carry them, so
    the retriever's late interaction is replayed as the service runs it."""
    specs = {s["name"]: s for s in pack_experts(pack_dir)}
    cands = []
    for name in test.experts:
        s = specs[name]
        texts = pilot_texts(s) or [s.get("description") or name]  # as the registry embeds them
        vecs, tokens = encode_texts(encoder, texts)
        flat, offsets = pack_tokens(tokens) if tokens is not None else (None, None)
        cands.append(
            Candidate(
                name=name,
                kind=s["kind"],
                task="generate",
                pilots=vecs,
                description=encoder.encode([s.get("description") or name])[0],
                categories=tuple(s.get("categories") or ()),
                base=s.get("base"),
                params_active=s.get("params_active"),
                params_total=s.get("params_total"),
                pilot_tokens=flat,
                pilot_token_offsets=offsets,
            )
        )
    prices = {n: (specs[n]["price_in_per_1k"], specs[n]["price_out_per_1k"]) for n in test.experts}
    vecs, tokens = encode_texts(encoder, test.prompts)
    replay = Replay(test, vecs, cands, prices, tokens=tokens)
    return replay, encoder.encode(fit.prompts)


def imported_replay(
    encoder: TextEncoder, fit: OutcomeTable, test: OutcomeTable
) -> tuple[Replay, np.ndarray]:
    """A replay over imported tables: no pilots, costs estimated from the fit table's means."""
    empty = np.zeros((0, encoder.dim), np.float32)
    cands = [
        Candidate(
            name=n,
            kind="remote",
            task="generate",
            pilots=empty,
            description=np.zeros(encoder.dim, np.float32),
        )
        for n in test.experts
    ]
    mean_cost = {n: float(fit.cost[:, fit.column(n)].mean()) for n in test.experts}
    return Replay(test, encoder.encode(test.prompts), cands, None, mean_cost), encoder.encode(
        fit.prompts
    )


def evaluate(
    replay: Replay,
    fit: OutcomeTable,
    fit_emb: np.ndarray,
    *,
    has_pilots: bool = True,
    seed: int = 0,
    say: Progress | None = None,
) -> EvalReport:
    """Every router/strategy and baseline over the replay; targets computed from the results."""
    say = say or (lambda _m: None)
    t0 = time.perf_counter()
    test = replay.table
    experts = list(test.experts)
    fit_quality = {e: float(fit.quality[:, fit.column(e)].mean()) for e in experts}
    fit_cost = {e: float(fit.cost[:, fit.column(e)].mean()) for e in experts}
    best_single = max(experts, key=lambda e: (fit_quality[e], -fit_cost[e]))
    cheapest = min(experts, key=lambda e: fit_cost[e])
    curves: list[Curve] = []
    singles = Curve("single experts", "baseline", [(e, replay.fixed(e)) for e in experts])
    oracle = replay.oracle()
    curves += [
        Curve("oracle", "baseline", [("", oracle)]),
        Curve("random", "baseline", [("", replay.random(seed))]),
        Curve(f"cheapest ({cheapest})", "baseline", [("", replay.fixed(cheapest))]),
        Curve(f"best single ({best_single})", "baseline", [("", replay.fixed(best_single))]),
        singles,
    ]
    predictive = PredictiveRouter()
    predictive.attach(TableSource(fit, fit_emb))
    predictive.prepare(replay.candidates)
    if has_pilots:
        retriever = RetrieverRouter()
        retriever.prepare(replay.candidates)
        curves.append(Curve("retriever", "router", [("", replay.single(retriever))]))
        curves.append(Curve("category (CoE)", "router", [("", replay.single(CategoryRouter()))]))
        say(f"pilot routers done ({time.perf_counter() - t0:.0f}s)")
    pred = Curve("predictive", "router")
    for w in WEIGHTS:
        pred.points.append((f"w={w:g}", replay.single(predictive, quality_weight=w)))
    curves.append(pred)
    say(f"predictive sweep done ({time.perf_counter() - t0:.0f}s)")
    unit = float(np.median([c.est_cost for c in replay.candidates_for(0)]))
    ens = Curve("predictive + ensemble (MoE²)", "router")
    for m in BUDGET_MULTIPLES:
        res = replay.ensemble(predictive, max_cost=m * unit, max_experts=3, quality_weight=1.0)
        ens.points.append((f"budget {m:g}×", res))
    curves.append(ens)
    cas = Curve("predictive + cascade", "router")
    for th in THRESHOLDS:
        cas.points.append((f"lp≥{th:g}", replay.cascade(predictive, threshold=th)))
    curves.append(cas)
    say(f"ensembles and cascades done ({time.perf_counter() - t0:.0f}s)")
    families = sorted(set(test.families))
    family_rows = _family_rows(replay, predictive, families, unit, oracle)
    report = EvalReport(
        curves=curves,
        oracle=oracle,
        best_single=best_single,
        cheapest=cheapest,
        families=families,
        family_rows=family_rows,
        targets=[],
        meta={"queries": len(test), "fit_queries": len(fit), "experts": len(experts), "unit": unit},
    )
    report.targets = _targets(report)
    return report


def _family_rows(
    replay: Replay,
    predictive: PredictiveRouter,
    families: list[str],
    unit: float,
    oracle: Result,
) -> list[dict[str, Any]]:
    """Per task family, under a budget admitting ~3 experts: ensemble vs single routing."""
    budget = 3 * unit
    ens = replay.ensemble(predictive, max_cost=budget, max_experts=3, quality_weight=1.0)
    single = replay.single(predictive, quality_weight=1.0)
    fams = np.asarray(replay.table.families)
    rows = []
    for f in families:
        m = fams == f
        rows.append(
            {
                "family": f,
                "n": int(m.sum()),
                "single": float(single.quality[m].mean()),
                "ensemble": float(ens.quality[m].mean()),
                "ensemble_calls": float(ens.calls[m].mean()),
                "single_cost": float(single.cost[m].mean()),
                "ensemble_cost": float(ens.cost[m].mean()),
                "oracle": float(oracle.quality[m].mean()),
            }
        )
    return rows


def summary_rows(report: EvalReport) -> list[dict[str, Any]]:
    """One row per curve point, with % of oracle, and AIQ/APGR per curve."""
    lo, hi = cost_range(report)
    weak = _point(report, f"cheapest ({report.cheapest})")
    strong = _point(report, f"best single ({report.best_single})")
    oq = report.oracle.mean()["quality"]
    rows = []
    for c in report.curves:
        xy = c.xy()
        a, g = aiq(xy, lo, hi), apgr(xy, weak, strong)
        for label, r in c.points:
            mm = r.mean()
            rows.append(
                {
                    "curve": c.name,
                    "setting": label,
                    **mm,
                    "pct_oracle": mm["quality"] / oq if oq > 0 else float("nan"),
                    "aiq": a,
                    "apgr": g,
                }
            )
    return rows


def cost_range(report: EvalReport) -> tuple[float, float]:
    """AIQ's common range: from the cheapest to the dearest single expert."""
    singles = next(c for c in report.curves if c.name == "single experts").xy()
    return min(x for x, _ in singles), max(x for x, _ in singles)


def _point(report: EvalReport, name: str) -> Point:
    return next(c for c in report.curves if c.name == name).xy()[0]


def _targets(report: EvalReport) -> list[tuple[str, float, str, bool]]:
    lo, hi = cost_range(report)
    curves = {c.name: c for c in report.curves}
    pred = curves["predictive"]
    bs_cost, bs_q = _point(report, f"best single ({report.best_single})")
    affordable = [q for c, q in pred.xy() if c <= 0.5 * bs_cost + 1e-15]
    at_half = (max(affordable) / bs_q) if affordable and bs_q > 0 else 0.0
    pred_aiq = aiq(pred.xy(), lo, hi)
    baseline_aiq = max(
        aiq(c.xy(), lo, hi) for c in report.curves if c.kind == "baseline" and c.name != "oracle"
    )
    unconstrained = dict(pred.points)["w=1"].mean()["quality"]
    oq = report.oracle.mean()["quality"]
    wins = [r["family"] for r in report.family_rows if r["ensemble"] > r["single"] + 1e-12]
    return [
        (
            "predictive_quality_vs_best_single_at_half_cost",
            at_half,
            ">= 0.95",
            at_half >= 0.95,
        ),
        (
            "predictive_aiq_minus_best_baseline_aiq",
            pred_aiq - baseline_aiq,
            "> 0",
            pred_aiq > baseline_aiq,
        ),
        (
            "predictive_unconstrained_vs_oracle",
            unconstrained / oq if oq else 0.0,
            ">= 0.95",
            oq > 0 and unconstrained / oq >= 0.95,
        ),
        ("ensemble_beats_single_within_budget_families", float(len(wins)), ">= 1", len(wins) >= 1),
    ]


def best_quality_at(report: EvalReport, name: str, cost: float) -> float:
    c = next(c for c in report.curves if c.name == name)
    return best_at(c.xy(), cost)


def frontier(report: EvalReport, name: str) -> list[Point]:
    c = next(c for c in report.curves if c.name == name)
    return hull(c.xy())
