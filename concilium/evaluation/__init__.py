"""Evaluation: outcome tables, routers replayed over them, cost–quality metrics, calibration."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from concilium.errors import InvalidInput
from concilium.outcomes.table import OutcomeTable

Progress = Callable[[str], None]
QUICK_PER_SKILL = 4


def run_eval(
    out_dir: Path,
    *,
    pack_dir: Path | None = None,
    table: Path | None = None,
    fit_table: Path | None = None,
    quick: bool = False,
    seed: int = 0,
    say: Progress | None = None,
) -> tuple[str, list[str]]:
    """Run the evaluation; write eval[_quick].md + .png under `out_dir`; (markdown, targets)."""
    from concilium.evaluation.build import cached_tables
    from concilium.evaluation.harness import demo_replay, evaluate, imported_replay
    from concilium.evaluation.report import markdown, pareto_png, target_lines
    from concilium.experts.embedder import SentenceEncoder

    say = say or (lambda _m: None)
    t0 = time.perf_counter()
    encoder = SentenceEncoder()
    if table is not None:
        test = OutcomeTable.read(table)
        fit = OutcomeTable.read(fit_table) if fit_table is not None else None
        if fit is None:
            fit, test = split(test, seed)
        if quick:
            test = test.subset(range(min(len(test), 200)))
        replay, fit_emb = imported_replay(encoder, fit, test)
        name, has_pilots = f"imported table {Path(table).name}", False
    else:
        if pack_dir is None:
            raise ValueError("give a demo pack directory or an outcome table")
        fit, test = cached_tables(
            pack_dir,
            out_dir / "outcomes",
            per_skill=QUICK_PER_SKILL if quick else None,
            seed=seed,
            say=say,
        )
        replay, fit_emb = demo_replay(pack_dir, encoder, fit, test)
        name, has_pilots = "demo pack held-out set", True
    say(f"tables ready ({time.perf_counter() - t0:.0f}s)")
    report = evaluate(replay, fit, fit_emb, has_pilots=has_pilots, seed=seed, say=say)
    suffix = "_quick" if quick else ""
    title = f"Routing evaluation: {name}" + (" (quick)" if quick else "")
    md = markdown(report, title)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"eval{suffix}.png"
    _write_whole(png, lambda tmp: pareto_png(report, tmp, title))
    md += f"\n![Pareto plot]({png.name})\n"
    _write_whole(out_dir / f"eval{suffix}.md", lambda tmp: tmp.write_text(md))
    return md, target_lines(report)


def _write_whole(path: Path, write: Callable[[Path], object]) -> None:
    """`write` a temporary file beside `path`, then rename it over `path`: a failure part way
    leaves the previous file, never half of a new one."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # the suffix: matplotlib's format
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def split(table: OutcomeTable, seed: int, share: float = 0.5) -> tuple[OutcomeTable, OutcomeTable]:
    """A seeded (fit, test) split of one table; InvalidInput when either half would be empty."""
    idx = list(range(len(table)))
    random.Random(seed).shuffle(idx)
    k = int(len(idx) * share)
    if not 0 < k < len(idx):
        raise InvalidInput(
            f"an outcome table of {len(idx)} row(s) cannot be split into fit and test halves "
            "(give at least 2 rows, or a separate fit table)"
        )
    return table.subset(np.sort(idx[:k])), table.subset(np.sort(idx[k:]))
