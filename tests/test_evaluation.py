"""The evaluation harness: metrics on hand examples, routing replay and calibration on a
synthetic outcome table (hash encoder, no model), and the CLI's errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from concilium.cli import app
from concilium.evaluation import split
from concilium.evaluation.calibrate import calibrate, merge_into
from concilium.evaluation.harness import evaluate, imported_replay
from concilium.evaluation.metrics import aiq, apgr, best_at, hull
from concilium.evaluation.report import markdown, pareto_png, target_lines
from concilium.outcomes.table import OutcomeTable
from tests.conftest import HashEncoder

TOPICS = {
    "strings": ["reverse the word", "spell it backwards", "flip the letters"],
    "math": ["add the numbers", "sum these values", "compute the total"],
    "code": ["write a python function", "fix this code", "refactor the class"],
}


def synthetic(n_per: int = 30, seed: int = 0) -> OutcomeTable:
    """Three cheap specialists, one dear generalist (good everywhere), one useless cheap model."""
    rng = random.Random(seed)
    experts = ["strings", "math", "code", "general", "tiny"]
    prompts, fams = [], []
    for fam, phrases in TOPICS.items():
        for i in range(n_per):
            prompts.append(f"{rng.choice(phrases)} {fam} item {i}")
            fams.append(fam)
    q = len(prompts)
    quality, cost = np.zeros((q, 5)), np.zeros((q, 5))
    for i, f in enumerate(fams):
        quality[i, experts.index(f)] = 1.0
        quality[i, 3] = float(rng.random() < 0.9)
        cost[i] = [0.01, 0.01, 0.01, 0.1, 0.001]
    noise = np.array([[rng.random() for _ in range(5)] for _ in range(q)])
    conf = np.where(quality > 0, -0.5 * noise, -1.0 - 2.0 * noise)
    answers = [[("ok" if quality[i, j] else f"bad{j}") for j in range(5)] for i in range(q)]
    return OutcomeTable(
        sample_ids=[str(i) for i in range(q)],
        prompts=prompts,
        families=fams,
        experts=experts,
        quality=quality,
        cost=cost,
        latency_ms=np.full((q, 5), 10.0),
        confidence=conf,
        answers=answers,
    )


def test_hull_aiq_and_apgr_on_hand_examples() -> None:
    pts = [(1.0, 0.2), (2.0, 0.3), (3.0, 0.9), (4.0, 0.8)]
    assert hull(pts) == [(1.0, 0.2), (3.0, 0.9)]  # (2, .3) under the chord, (4, .8) dominated
    assert best_at(pts, 0.5) == 0.0 and best_at(pts, 2.0) == pytest.approx(0.55)
    assert best_at(pts, 10.0) == 0.9
    assert aiq([(0.0, 0.5)], 0.0, 1.0) == pytest.approx(0.5)
    assert aiq([(0.0, 0.0), (1.0, 1.0)], 0.0, 1.0) == pytest.approx(0.5, abs=1e-12)
    # exact integrals: 0 below the cheapest point, trapezoids along the hull, flat after it
    assert aiq([(0.5, 1.0)], 0.0, 1.0) == pytest.approx(0.5, abs=1e-12)
    assert aiq([(1.0, 1.0)], 0.0, 1.0) == pytest.approx(0.0, abs=1e-12)
    two = [(0.2, 0.4), (0.6, 0.8)]
    assert aiq(two, 0.0, 1.0) == pytest.approx(0.4 * 0.6 + 0.4 * 0.8, abs=1e-12)
    assert aiq(two, 0.3, 0.5) == pytest.approx(0.6, abs=1e-12)
    # a router that reaches the strong model's quality at the weak model's cost recovers it all
    assert apgr([(0.0, 1.0)], (0.0, 0.0), (1.0, 1.0)) == pytest.approx(1.0)
    assert apgr([(0.0, 0.0), (1.0, 1.0)], (0.0, 0.0), (1.0, 1.0)) == pytest.approx(0.5, abs=1e-12)
    assert apgr(two, (0.2, 0.4), (0.6, 0.8)) == pytest.approx(0.5, abs=1e-12)


def test_replay_beats_baselines_on_a_synthetic_catalogue(tmp_path: Path) -> None:
    table = synthetic()
    fit, test = split(table, seed=0)
    replay, fit_emb = imported_replay(HashEncoder(), fit, test)
    report = evaluate(replay, fit, fit_emb, has_pilots=False)
    curves = {c.name: c for c in report.curves}
    assert report.best_single == "general" and report.cheapest == "tiny"
    oracle = report.oracle.mean()
    assert oracle["quality"] == 1.0 and oracle["cost"] == pytest.approx(0.01, abs=1e-3)
    pred = dict(curves["predictive"].points)
    assert pred["w=1"].mean()["quality"] >= 0.9  # learned from the fit half
    assert pred["w=0"].mean()["cost"] == pytest.approx(0.001)  # cost only: the cheapest
    names = {t[0]: t for t in report.targets}
    assert names["predictive_quality_vs_best_single_at_half_cost"][3]  # specialists are cheap
    assert names["predictive_aiq_minus_best_baseline_aiq"][3]
    md = markdown(report, "synthetic")
    assert "| predictive | w=1 |" in md and "TARGET predictive_unconstrained_vs_oracle" in md
    assert all(line.startswith("TARGET ") for line in target_lines(report))
    png = pareto_png(report, tmp_path / "p.png", "synthetic")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_calibration_hits_the_target_share_reproducibly(tmp_path: Path) -> None:
    table = synthetic(40)
    enc = HashEncoder()

    def replay_for(known: OutcomeTable, calib: OutcomeTable):  # type: ignore[no-untyped-def]
        return imported_replay(enc, known, calib)

    a = calibrate(replay_for, table, target_share=0.3, seed=1, expensive=["general"])
    b = calibrate(replay_for, table, target_share=0.3, seed=1, expensive=["general"])
    assert a == b
    assert a.share_at_weight >= 0.3 and 0 <= a.quality_weight <= 1
    assert abs(a.escalation_share - 0.3) <= 0.1 and a.cascade_threshold <= 0
    cfg = tmp_path / "c.yaml"
    cfg.write_text("concilium:\n  home: .concilium\n  routers:\n    retriever: {kind: retriever}\n")
    doc = merge_into(cfg, a.config())
    assert doc["concilium"]["routers"]["retriever"] == {"kind": "retriever"}
    assert doc["concilium"]["routers"]["predictive"]["default_quality_weight"] == a.quality_weight
    assert doc["concilium"]["strategies"]["cascade_threshold"] == a.cascade_threshold


def test_cli_eval_and_calibrate_refuse_bad_input(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,x\nhello,1\n")
    r = runner.invoke(app, ["eval", "--table", str(bad), "--out", str(tmp_path)])
    assert r.exit_code == 2 and "no expert columns" in r.output
    r = runner.invoke(app, ["eval", "--pack", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "not a demo pack" in r.output
    good = synthetic(5).write(tmp_path / "good.csv")
    r = runner.invoke(
        app, ["calibrate", "--target-share", "0.3", "--table", str(good), "--expensive", "zzz"]
    )
    assert r.exit_code == 2 and "zzz" in r.output


def test_calibration_reports_the_real_share_when_the_target_is_out_of_reach() -> None:
    table = synthetic(40)
    enc = HashEncoder()

    def replay_for(known: OutcomeTable, calib: OutcomeTable):  # type: ignore[no-untyped-def]
        return imported_replay(enc, known, calib)

    # the specialists answer their family as well as the dear generalist, for a tenth of the
    # cost: even at quality weight 1 many queries go to them, so a 99 % share is never reached
    cal = calibrate(replay_for, table, target_share=0.99, seed=1, expensive=["general"])
    known, calib = split(table, 1)
    replay, emb = replay_for(known, calib)
    from concilium.evaluation.simulate import TableSource
    from concilium.routers.query.predictive import PredictiveRouter

    router = PredictiveRouter()
    router.attach(TableSource(known, emb))
    router.prepare(replay.candidates)
    chosen = replay.single(router, quality_weight=1.0).chosen
    share = float(np.mean([c == "general" for c in chosen]))
    assert share < 0.99
    assert cal.quality_weight == 1.0 and cal.share_at_weight == pytest.approx(share)


def test_split_refuses_to_leave_a_half_empty() -> None:
    from concilium.errors import InvalidInput

    with pytest.raises(InvalidInput, match="1 row"):
        split(synthetic(5).subset([0]), seed=0)
    fit, test = split(synthetic(5).subset([0, 1]), seed=0)
    assert len(fit) == len(test) == 1


def test_cached_tables_never_pair_a_stale_key_with_new_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build that fails after writing one table must not leave the old key claiming it."""
    import concilium.evaluation.build as build

    pack, cache = tmp_path / "pack", tmp_path / "cache"
    pack.mkdir()
    a, b = synthetic(5), synthetic(6)
    none = build.QuerySet([], [], [], [])
    monkeypatch.setattr(build, "query_sets", lambda *_a, **_k: (none, none))
    monkeypatch.setattr(build, "run_experts", lambda *_a, **_k: [a, a])
    (pack / "manifest.json").write_text('{"v": "A"}')
    build.cached_tables(pack, cache, per_skill=None)  # cache now holds A's tables and key
    (pack / "manifest.json").write_text('{"v": "B"}')
    monkeypatch.setattr(build, "run_experts", lambda *_a, **_k: [b, b])
    real_write, calls = OutcomeTable.write, []

    def failing_write(self: OutcomeTable, path: Path) -> Path:
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_write(self, path)

    monkeypatch.setattr(OutcomeTable, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        build.cached_tables(pack, cache, per_skill=None)  # B's fit table written, then failure
    monkeypatch.setattr(OutcomeTable, "write", real_write)
    (pack / "manifest.json").write_text('{"v": "A"}')
    monkeypatch.setattr(build, "run_experts", lambda *_a, **_k: [a, a])
    fit, test = build.cached_tables(pack, cache, per_skill=None)
    assert len(fit) == len(a) and len(test) == len(a)  # rebuilt, not B's fit table with A's key


def test_cached_tables_rebuild_over_a_damaged_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import concilium.evaluation.build as build

    pack, cache = tmp_path / "pack", tmp_path / "cache"
    pack.mkdir()
    (pack / "manifest.json").write_text("{}")
    none = build.QuerySet([], [], [], [])
    monkeypatch.setattr(build, "query_sets", lambda *_a, **_k: (none, none))
    monkeypatch.setattr(build, "run_experts", lambda *_a, **_k: [synthetic(5), synthetic(5)])
    build.cached_tables(pack, cache, per_skill=None)
    (cache / "demo_all.json").write_text('{"manifest": "ab')  # cut short by a crash
    fit, _ = build.cached_tables(pack, cache, per_skill=None)
    assert len(fit) == 15 and json.loads((cache / "demo_all.json").read_text())["per_skill"] is None
