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
