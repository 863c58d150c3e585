"""Which Serve deployment runs which expert, and with what options.

The base models known when the app is built get an ExpertServer inside the main application; a
`model` expert registered later (or a base re-registered with other weights) gets its own
application, one per name and weights directory (``expert-<name>-<digest>-<digest>``), started
from the gateway on its first request without touching any other deployment, and is deleted with
the expert (the base models of the main application run until it is redeployed).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ApplicationStatus

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
    name: str,
    model_path: str,
    dep: DeploymentConfig,
    home: str | None = None,
    registry: Any = None,
) -> Any:
    """A bound ExpertServer for model expert `name` (scaling from the YAML, per expert). Its
    replicas watch the registry for deleted adapters: through `registry` (the RegistryService,
    bound or a handle) when `dep.registry_reads` is 'service', else the store under `home`."""
    s: ExpertScalingConfig = dep.expert(name)
    watch = registry if dep.registry_reads == "service" else None
    return ExpertServer.options(  # type: ignore[attr-defined]
        name=f"expert-{name}", **deployment_options(s, dep)
    ).bind(
        model_path, s.max_adapters, s.max_batch, s.batch_wait_ms, home, s.moe.model_dump(), watch
    )


def _app_prefix(name: str) -> str:
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"expert-{name[:40]}-{digest}-"


def app_name_for(name: str, model_path: str) -> str:
    """Serve application of a model expert registered after start-up: one per (name, weights
    directory), so an application started for weights that were since re-registered elsewhere is
    never reused for the new ones."""
    return _app_prefix(name) + hashlib.sha1(model_path.encode()).hexdigest()[:8]


def deploy_expert_app(
    name: str,
    model_path: str,
    dep: DeploymentConfig,
    home: str | None = None,
    registry: DeploymentHandle | None = None,
) -> DeploymentHandle:
    """Start (or find) the application of a late-registered model expert; blocks until ready.
    An application whose last start failed is deleted and started again (Serve keeps it listed
    as DEPLOY_FAILED and adds no replicas to it by itself). `registry`: the RegistryService its
    replicas watch (see `expert_deployment`)."""
    app = app_name_for(name, model_path)
    # ask the controller: get_deployment_handle caches handles, also those of deleted apps
    status = serve.status().applications.get(app)
    if status is not None and status.status == ApplicationStatus.DEPLOY_FAILED:
        log.warning("ExpertServer application %s failed to start before; starting it again", app)
        serve.delete(app, _blocking=True)
        status = None
    if status is None:
        log.info("starting ExpertServer application %s for %s", app, model_path)
        bound = expert_deployment(name, model_path, dep, home, registry)
        serve.run(bound, name=app, route_prefix=None)
    return expert_handle(name, model_path)


def expert_handle(name: str, model_path: str) -> DeploymentHandle:
    """The ExpertServer handle of late model `name`'s application for weights `model_path`."""
    return serve.get_deployment_handle(f"expert-{name}", app_name=app_name_for(name, model_path))


def expert_apps(name: str) -> list[str]:
    """The Serve applications of late-registered model expert `name` (normally at most one),
    including one named the way releases before per-weights names did (``expert-<name>-<digest>``,
    still running after an upgrade in place)."""
    prefix = _app_prefix(name)
    old = prefix[:-1]
    return sorted(a for a in serve.status().applications if a.startswith(prefix) or a == old)


def delete_expert_app(name: str, apps: Sequence[str] | None = None) -> bool:
    """Delete every application of a late-registered model expert (any weights directory) that
    runs, or `apps` when the caller has just listed them (`expert_apps`: no second status
    call); blocks while Serve drains their in-flight requests (up to the deployment's
    graceful_shutdown_timeout_s). True when one was deleted."""
    apps = expert_apps(name) if apps is None else apps
    for app in apps:
        log.info("deleting ExpertServer application %s of removed expert %s", app, name)
        serve.delete(app, _blocking=True)
    return bool(apps)
