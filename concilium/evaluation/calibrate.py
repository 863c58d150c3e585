"""`concilium calibrate`: thresholds that send a target share of traffic to expensive experts.

RouteLLM's recipe: choose the threshold on a calibration set so that the share of queries routed
to the strong (expensive) side matches what the operator wants to pay for. Here:

* the predictive router's `default_quality_weight` w: the smallest w on a 0.01 grid at which the
  share of calibration queries routed to an expensive expert reaches the target;
* the cascade's `cascade_threshold`: the quantile of first-stage confidences (mean token
  log-probability) below which the target share of queries escalates.

"Expensive" = experts whose mean cost per query is above the median expert's (or a given list).
The outcome table is split with the seed: one half is what the predictive router knows, the other
is the calibration traffic — reproducible given the seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from concilium.errors import ConfigError
from concilium.evaluation import split
from concilium.evaluation.simulate import Replay, TableSource, _options
from concilium.orchestrator.planning import Budget, plan_cascade
from concilium.routers.query.predictive import PredictiveRouter

GRID = np.round(np.linspace(0, 1, 101), 2)


@dataclass(frozen=True, slots=True)
class Calibration:
    target_share: float
    expensive: list[str]
    quality_weight: float
    share_at_weight: float
    cascade_threshold: float
    escalation_share: float
    seed: int
    queries: int

    def config(self) -> dict[str, Any]:
        """The config fragment to merge into a service config."""
        return {
            "routers": {
                "predictive": {
                    "kind": "predictive",
                    "default_quality_weight": float(self.quality_weight),
                }
            },
            "strategies": {"cascade_threshold": float(self.cascade_threshold)},
        }


def calibrate(
    replay_for: Any,
    table: Any,
    *,
    target_share: float,
    seed: int = 0,
    expensive: list[str] | None = None,
    adequacy: float = 0.5,
) -> Calibration:
    """Fit both thresholds. `replay_for(fit, calib)` → (Replay over calib, fit embeddings)."""
    if not 0 <= target_share <= 1:
        raise ValueError("target share must be in [0, 1]")
    known, calib = split(table, seed)
    replay, known_emb = replay_for(known, calib)
    mean_cost = {e: float(known.cost[:, known.column(e)].mean()) for e in known.experts}
    if expensive is None:
        median = float(np.median(list(mean_cost.values())))
        expensive = sorted(e for e, c in mean_cost.items() if c > median)
    router = PredictiveRouter()
    router.attach(TableSource(known, known_emb))
    router.prepare(replay.candidates)
    dear = set(expensive)
    weight, share = 1.0, 0.0
    for w in GRID:  # out of reach: w = 1 and the share it reaches
        s = float(np.mean([c in dear for c in replay.single(router, quality_weight=w).chosen]))
        weight, share = float(w), s
        if s >= target_share:
            break
    first = _first_stage_confidences(replay, router, adequacy)  # [Q], NaN: never escalates
    conf = first[~np.isnan(first)]
    # the target is a share of every calibration query, not only of those with a confidence
    q = min(1.0, target_share * len(first) / len(conf)) if len(conf) else 0.0
    threshold = min(float(np.quantile(conf, q)) if len(conf) else 0.0, 0.0)
    escalated = float(np.sum(conf < threshold)) / len(first)  # the split leaves len ≥ 1
    return Calibration(
        target_share=target_share,
        expensive=list(expensive),
        quality_weight=weight,
        share_at_weight=share,
        cascade_threshold=threshold,
        escalation_share=escalated,
        seed=seed,
        queries=len(calib),
    )


def _first_stage_confidences(
    replay: Replay, router: PredictiveRouter, adequacy: float
) -> np.ndarray:
    out = np.full(len(replay.table), np.nan)
    for i in range(len(replay.table)):
        d, cands = replay.decide(router, i)
        plan = plan_cascade(_options(d, cands), Budget(max_experts=3), adequacy=adequacy)
        if plan is not None:
            out[i] = replay.table.confidence[i, replay.table.column(plan.experts[0])]
    return out


def merge_into(config_path: Path | None, fragment: dict[str, Any]) -> dict[str, Any]:
    """The config at `config_path` (plain or Serve YAML) with `fragment` merged in.

    ConfigError when the file is missing, not YAML or not laid out as a config."""
    import yaml

    doc: Any = {}
    if config_path is not None:  # a path that names no file is an error, not an empty config
        try:
            doc = yaml.safe_load(config_path.read_text()) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {config_path}: {e}") from None
    target = _section(doc, f"config {config_path}")
    if "applications" in doc:
        apps = doc["applications"]
        if not isinstance(apps, list) or not apps:
            raise ConfigError(f"config {config_path}: 'applications' must be a non-empty list")
        args = _child(_section(apps[0], "applications[0]"), "args")
        target = _child(args, "concilium") if "concilium" in args else args  # as load_config
    elif "concilium" in doc:
        target = _child(doc, "concilium")
    _deep_merge(target, fragment)
    return dict(doc)


def _section(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a mapping, got {type(value).__name__}")
    return value


def _child(parent: dict[str, Any], key: str) -> dict[str, Any]:
    """parent[key] as a mapping, created when absent or empty."""
    if parent.get(key) is None:
        parent[key] = {}
    return _section(parent[key], f"the config's {key!r}")


def _deep_merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = v
