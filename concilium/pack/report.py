"""REPORT.md of a built pack: accuracy table, adapter × skill matrix, build time and sizes."""

from __future__ import annotations

from typing import Any

from concilium.pack.manifest import PackReport


def render_report(report: PackReport, seed: int, experts: list[dict[str, Any]]) -> str:
    """The markdown text of REPORT.md."""
    parts = [
        "# Demo expert pack\n",
        _summary(report, seed),
        _accuracy_table(report, experts),
        _matrix_table(report),
    ]
    return "\n".join(parts)


def _summary(report: PackReport, seed: int) -> str:
    mb = {k: f"{v / 2**20:.2f} MB" for k, v in report.sizes_bytes.items()}
    quick = " (quick build: untrained quality)" if report.quick else ""
    return (
        f"- seed: {seed}{quick}\n"
        f"- build time: {report.build_seconds:.1f} s (2 CPU threads)\n"
        f"- sizes: base {mb.get('base', '?')}, adapters {mb.get('adapters', '?')}, "
        f"whole pack {mb.get('total', '?')}\n"
        f"- held-out queries per skill: {report.heldout_per_skill} "
        "(templates and payloads unseen in training and pilots)\n"
    )


def _accuracy_table(report: PackReport, experts: list[dict[str, Any]]) -> str:
    lines = [
        "## Exact match on held-out queries\n",
        "| skill | base exact-match | adapter exact-match | default | price in/out per 1k |",
        "|---|---|---|---|---|",
    ]
    for e in experts:
        n = e["name"]
        lines.append(
            f"| {n} | {_pct(report.base_accuracy.get(n))} | {_pct(report.adapter_accuracy.get(n))}"
            f" | {'yes' if e['default'] else 'no'}"
            f" | {e['price_in_per_1k']} / {e['price_out_per_1k']} |"
        )
    base = _mean(report.base_accuracy.values())
    adapters = _mean(report.adapter_accuracy.values())
    lines.append(f"| **mean** | {_pct(base)} | {_pct(adapters)} | | |")
    return "\n".join(lines) + "\n"


def _matrix_table(report: PackReport) -> str:
    names = list(report.matrix)
    lines = [
        "## Adapter × skill exact match\n",
        f"Rows: adapter; columns: the skill of the queries ({report.matrix_queries_per_skill} "
        "held-out queries per off-diagonal cell, all held-out queries on the diagonal).\n",
        "| adapter \\ skill | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for a in names:
        cells = " | ".join(_pct(report.matrix[a].get(s)) for s in names)
        lines.append(f"| {a} | {cells} |")
    return "\n".join(lines) + "\n"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def _mean(xs: Any) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None
