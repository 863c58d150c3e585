"""Service config: per-expert Serve scaling overrides, their validation, the demo YAML."""

from __future__ import annotations

from pathlib import Path

import pytest

from concilium.config import DeploymentConfig, load_config
from concilium.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_expert_overrides_apply_on_top_of_the_defaults() -> None:
    dep = DeploymentConfig.model_validate(
        {"expert_defaults": {"max_replicas": 3}, "experts": {"big": {"min_replicas": 0}}}
    )
    assert dep.expert("big").min_replicas == 0 and dep.expert("big").max_replicas == 3
    assert dep.expert("other").min_replicas == 1
    auto = dep.expert("big").autoscaling()
    assert auto["min_replicas"] == 0 and "initial_replicas" not in auto


@pytest.mark.parametrize(
    "experts",
    [
        {"big": {"max_replicas": 0}},
        {"big": {"no_such_field": 1}},
        {"big": {"min_replicas": 5}},
        {"big": {"moe": {"backend": "triton-typo"}}},
        {"big": {"moe": {"resident_experts": 0}}},
        {"big": {"moe": {"cache": "lru"}}},
    ],
)
def test_bad_overrides_fail_at_load_naming_the_expert(experts: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="big"):
        load_config(None, deployment={"experts": experts})


def test_demo_yaml_loads() -> None:
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert cfg.deployment.expert("demo-moe").max_replicas == 2
    assert cfg.deployment.gateway.num_cpus == 0.25


def test_moe_overrides_merge_key_by_key_and_become_runtime_options() -> None:
    dep = DeploymentConfig.model_validate(
        {
            "expert_defaults": {"moe": {"backend": "decode", "policy": "lfu"}},
            "experts": {"big": {"moe": {"resident_experts": 4}}},
        }
    )
    big = dep.expert("big").moe
    assert (big.backend, big.policy, big.resident_experts) == ("decode", "lfu", 4)
    opts = big.options()
    assert (opts.backend, opts.resident_experts, opts.policy) == ("decode", 4, "lfu")
    assert dep.expert("other").moe.resident_experts is None
    stock = DeploymentConfig.model_validate({"expert_defaults": {"moe": {"backend": "stock"}}})
    assert stock.expert("x").moe.options().backend is None


def test_moe_backend_names_are_the_kernel_table() -> None:
    from typing import get_args

    from concilium.config import MoEBackendName
    from concilium.experts.moe.layer import MOE_BACKEND_CLS

    assert set(get_args(MoEBackendName)) == {*MOE_BACKEND_CLS, "stock"}


def test_the_default_and_demo_targets_let_a_replica_fill_its_batch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Serve scales an ExpertServer out at `target_ongoing_requests` per replica: a target below
    `max_batch` splits the load before a batch can fill."""
    defaults = DeploymentConfig().expert_defaults
    assert defaults.target_ongoing_requests >= defaults.max_batch
    with caplog.at_level("WARNING", logger="concilium.config"):
        cfg = load_config(ROOT / "configs" / "demo.yaml")
    for name in ("any-model", "demo-moe"):
        s = cfg.deployment.expert(name)
        assert s.max_batch <= s.target_ongoing_requests <= s.max_ongoing_requests, name
    assert caplog.records == []


def test_a_target_below_max_batch_is_allowed_with_a_warning_naming_the_field(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="concilium.config"):
        load_config(None, deployment={"experts": {"fast": {"target_ongoing_requests": 2}}})
        load_config(None, deployment={"expert_defaults": {"max_batch": 32}})
    first, second = (r.getMessage() for r in caplog.records)
    assert first.startswith("deployment.experts.fast: target_ongoing_requests 2 < max_batch 16")
    assert second.startswith("deployment.expert_defaults: target_ongoing_requests 16 < max_batch")


def test_the_outcome_store_goes_where_outcomes_path_says(tmp_path: Path) -> None:
    from concilium.orchestrator.service import open_outcomes

    local = tmp_path / "local" / "o.sqlite"
    cfg = load_config(None, home=tmp_path / "home", outcomes={"path": str(local)})
    store = open_outcomes(cfg)
    assert store is not None and store.path == local and local.exists()
    store.close()
    default = open_outcomes(load_config(None, home=tmp_path / "home"))
    assert default is not None and default.path == tmp_path / "home" / "outcomes.sqlite"
    default.close()
