"""The evaluation's markdown table, Pareto plot (PNG) and TARGET lines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from concilium.evaluation.harness import EvalReport, cost_range, summary_rows
from concilium.evaluation.metrics import hull


def markdown(report: EvalReport, title: str) -> str:
    lo, hi = cost_range(report)
    m = report.meta
    lines = [
        f"# {title}",
        "",
        f"{m['queries']} test queries, {m['fit_queries']} fit queries (what the predictive router "
        f"learns from), {m['experts']} experts. Quality = exact match; cost per query in the "
        "experts' price units; latency from the runtime's measured per-token profile. AIQ = "
        f"mean of the best reachable quality over cost [{lo:.3g}, {hi:.3g}] (cheapest to "
        "dearest single expert); APGR = share of the cheapest→best-single quality gap recovered, "
        "averaged over that cost range. Best single expert chosen on the fit table.",
        "",
        "| router / strategy | setting | quality | % of oracle | cost | latency ms | experts "
        "called | AIQ | APGR |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary_rows(report):
        lines.append(
            f"| {r['curve']} | {r['setting']} | {r['quality']:.3f} | {100 * r['pct_oracle']:.1f}% "
            f"| {r['cost']:.5f} | {r['latency_ms']:.1f} | {r['calls']:.2f} | {r['aiq']:.3f} "
            f"| {r['apgr']:.3f} |"
        )
    lines += [
        "",
        "## Ensemble vs single routing per task family",
        "",
        f"Budget per request: 3 × the median single-expert estimate ({3 * m['unit']:.4g}); "
        "both use the predictive router at quality_weight 1.",
        "",
        "| family | n | single | ensemble | experts called | single cost | ensemble cost "
        "| oracle |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report.family_rows:
        lines.append(
            f"| {r['family']} | {r['n']} | {r['single']:.3f} | {r['ensemble']:.3f} | "
            f"{r['ensemble_calls']:.2f} | {r['single_cost']:.5f} | {r['ensemble_cost']:.5f} | "
            f"{r['oracle']:.3f} |"
        )
    lines += ["", "## Targets", "", "```", *target_lines(report), "```", ""]
    return "\n".join(lines)


def target_lines(report: EvalReport) -> list[str]:
    return [
        f"TARGET {name}: {value:.4g} (goal {goal}) {'PASS' if ok else 'FAIL'}"
        for name, value, goal, ok in report.targets
    ]


def pareto_png(report: EvalReport, path: Path, title: str) -> Path:
    """Cost–quality scatter of every setting, each router's hull as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    try:
        _draw(ax, report, title)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:  # a failed save must not leak the figure into pyplot's registry
        plt.close(fig)
    return path


def _draw(ax: Any, report: EvalReport, title: str) -> None:
    for c in report.curves:
        xy = c.xy()
        if c.name == "single experts":
            ax.scatter([x for x, _ in xy], [y for _, y in xy], marker="x", color="grey")
            for (x, y), (label, _) in zip(xy, c.points, strict=True):
                ax.annotate(label, (x, y), fontsize=6, color="grey")
            continue
        h = hull(xy)
        (line,) = ax.plot(*zip(*h, strict=True), marker="", alpha=0.6)
        xs, ys = [x for x, _ in xy], [y for _, y in xy]
        ax.scatter(xs, ys, s=18, color=line.get_color(), label=c.name)
    ax.set_xlabel("mean cost per query")
    ax.set_ylabel("mean quality (exact match)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
