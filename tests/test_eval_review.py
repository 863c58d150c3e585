"""Evaluation defects found in review: config merging, calibration over unknown confidences,
results written whole, the plot's figure released on failure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from concilium.config import load_config
from concilium.errors import ConfigError
from concilium.evaluation import run_eval, split
from concilium.evaluation.calibrate import calibrate, merge_into
from concilium.evaluation.harness import evaluate, imported_replay
from concilium.evaluation.report import pareto_png
from concilium.evaluation.simulate import TableSource
from concilium.outcomes.table import OutcomeTable
from concilium.routers.query.predictive import PredictiveRouter
from tests.conftest import HashEncoder
from tests.test_evaluation import synthetic

FRAGMENT = {
    "routers": {"predictive": {"kind": "predictive", "default_quality_weight": 0.4}},
    "strategies": {"cascade_threshold": -0.3},
}


def test_merge_into_a_serve_config_whose_args_are_the_config(tmp_path: Path) -> None:
    """load_config reads a Serve YAML's args as the config when they hold no 'concilium' key:
    the fragment goes beside the user's settings, not into a new section that hides them."""
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(
        "applications:\n  - name: concilium\n    args:\n      home: /tmp/h\n"
        "      default_router: retriever\n      routers:\n        retriever: {kind: retriever}\n"
    )
    out = tmp_path / "out.yaml"
    out.write_text(yaml.safe_dump(merge_into(cfg, FRAGMENT), sort_keys=False))
    loaded = load_config(out)
    assert str(loaded.home) == "/tmp/h" and sorted(loaded.routers) == ["predictive", "retriever"]
    assert loaded.strategies.cascade_threshold == -0.3


def test_merge_into_refuses_a_config_path_that_names_no_file(tmp_path: Path) -> None:
    """A mistyped --config must not be read as an empty config (its fragment would then
    replace the real config when --out names it)."""
    with pytest.raises(ConfigError, match=r"missing\.yaml"):
        merge_into(tmp_path / "missing.yaml", FRAGMENT)
    assert merge_into(None, FRAGMENT) == FRAGMENT


def test_calibrated_escalation_share_counts_queries_without_a_confidence() -> None:
    """Queries whose first stage has no confidence never escalate: the threshold aims at the
    target share of all calibration queries and reports the share the cascade really sends on."""
    table = synthetic(40)
    table.confidence[np.asarray(table.families) == "code"] = np.nan  # a third: unknown
    enc = HashEncoder()

    def replay_for(known: OutcomeTable, calib: OutcomeTable):  # type: ignore[no-untyped-def]
        return imported_replay(enc, known, calib)

    cal = calibrate(replay_for, table, target_share=0.3, seed=1, expensive=["general"])
    known, calib = split(table, 1)
    replay, emb = replay_for(known, calib)
    router = PredictiveRouter()
    router.attach(TableSource(known, emb))
    router.prepare(replay.candidates)
    ran = replay.cascade(router, threshold=cal.cascade_threshold).calls
    assert cal.escalation_share == pytest.approx(float(np.mean(ran > 1)))
    assert abs(cal.escalation_share - 0.3) <= 0.05


def test_eval_results_are_written_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails part way keeps the previous eval.md, not half of a new one."""
    import concilium.experts.embedder as embedder

    monkeypatch.setattr(embedder, "SentenceEncoder", lambda *a, **k: HashEncoder())
    table = synthetic(5).write(tmp_path / "t.csv")
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval.md").write_text("previous results\n")

    def half_then_fail(self: Path, text: str, *a: object, **k: object) -> int:
        with self.open("w") as f:
            f.write(text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        run_eval(out, table=table)
    assert (out / "eval.md").read_text() == "previous results\n"
    assert sorted(p.name for p in out.iterdir()) == ["eval.md", "eval.png"]  # no temporary


def test_pareto_png_releases_its_figure_when_the_save_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    fit, test = split(synthetic(5), seed=0)
    replay, emb = imported_replay(HashEncoder(), fit, test)
    report = evaluate(replay, fit, emb, has_pilots=False)
    before = set(plt.get_fignums())

    def fail(*_a: object, **_k: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", fail)
    with pytest.raises(OSError, match="disk full"):
        pareto_png(report, tmp_path / "p.png", "t")
    assert set(plt.get_fignums()) == before
