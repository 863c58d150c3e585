"""Which Serve deployment runs which expert, and with what options.

The base models known when the app is built get an ExpertServer inside the main application; a
`model` expert registered later gets its own application (``expert-<name>``), started from the
gateway on its first request without touching any other deployment, and is deleted with the
expert (the base models of the main application run until it is redeployed).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from concilium.config import DeploymentConfig, ExpertScalingConfig, ScalingConfig
from concilium.deployments.expert_server import ExpertServer

log = logging.getLogger(__name__)


def deployment_options(s: ScalingConfig, dep: DeploymentConfig) -> dict[str, Any]:
    """Serve `.options(...)` for a scaling config (autoscaling, CPUs, queue limits) in the
    topology `dep` (its logging)."""
    return {
        "autoscaling_config": s.autoscaling(),
        "ray_actor_options": {"num_cpus": s.num_cpus},
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
        "logging_config": dep.logging(),
    }


def expert_deployment(
    name: str, model_path: str, dep: DeploymentConfig, home: str | None = None
) -> Any:
    """A bound ExpertServer for model expert `name` (scaling from the YAML, per expert); `home`
    is the registry data dir its replicas watch for deleted adapters."""
    s: ExpertScalingConfig = dep.expert(name)
    return ExpertServer.options(  # type: ignore[attr-defined]
        name=f"expert-{name}", **deployment_options(s, dep)
    ).bind(model_path, s.max_adapters, s.max_batch, s.batch_wait_ms, home, s.moe.model_dump())


def app_name_for(name: str) -> str:
    """Serve application of a model expert registered after start-up."""
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"expert-{name[:40]}-{digest}"


def deploy_expert_app(
    name: str, model_path: str, dep: DeploymentConfig, home: str | None = None
) -> DeploymentHandle:
    """Start (or find) the application of a late-registered model expert; blocks until ready."""
    app = app_name_for(name)
    # ask the controller: get_deployment_handle caches handles, also those of deleted apps
    if app not in serve.status().applications:
        log.info("starting ExpertServer application %s for %s", app, model_path)
        serve.run(expert_deployment(name, model_path, dep, home), name=app, route_prefix=None)
    return serve.get_deployment_handle(f"expert-{name}", app_name=app)


def delete_expert_app(name: str) -> bool:
    """Delete the application of a late-registered model expert, if it runs; blocks while Serve
    drains its in-flight requests (up to the deployment's graceful_shutdown_timeout_s)."""
    app = app_name_for(name)
    if app not in serve.status().applications:
        return False
    log.info("deleting ExpertServer application %s of removed expert %s", app, name)
    serve.delete(app, _blocking=True)
    return True
