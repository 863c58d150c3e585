"""Serve options built from the config (no Ray started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from concilium.config import DeploymentConfig


def test_access_logs_are_off_unless_asked_for_in_every_deployment() -> None:
    from concilium.deployments.topology import deployment_options

    quiet, loud = DeploymentConfig(), DeploymentConfig(access_log=True)
    for dep, want in ((quiet, False), (loud, True)):
        for s in (dep.gateway, dep.expert("demo-moe")):
            assert deployment_options(s, dep)["logging_config"] == {"enable_access_log": want}
    opts = deployment_options(quiet.expert("demo-moe"), quiet)
    assert opts["ray_actor_options"] == {"num_cpus": 0.5} and opts["max_queued_requests"] == 256


def test_demo_yaml_is_a_valid_serve_deploy_config_without_access_logs() -> None:
    import yaml
    from ray.serve.schema import ServeDeploySchema

    path = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    assert schema.logging_config is not None and schema.logging_config.enable_access_log is False
    (app,) = schema.applications
    assert app.import_path == "concilium.deployments.builder:app_builder"


def test_the_cluster_example_is_a_serve_config_that_reads_the_registry_through_the_service(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from concilium.config import load_config
    from concilium.errors import ConfigError

    path = Path(__file__).resolve().parents[2] / "configs" / "cluster.yaml"
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    (app,) = schema.applications
    assert app.import_path == "concilium.deployments.builder:app_builder"
    monkeypatch.delenv("CONCILIUM_ADMIN_KEY", raising=False)
    with pytest.raises(ConfigError, match="admin_api_key"):  # 0.0.0.0 needs the key
        load_config(path)
    monkeypatch.setenv("CONCILIUM_ADMIN_KEY", "k")
    cfg = load_config(path)
    assert cfg.host == "0.0.0.0" and cfg.deployment.registry_reads == "service"
    assert cfg.outcomes.path == Path("/var/lib/concilium/outcomes.sqlite")
    assert cfg.deployment.expert("demo-moe").underfilled_batch() is None
