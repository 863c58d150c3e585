"""Build the Serve application from a ServiceConfig; `concilium serve` and `serve run` use it.

``serve run concilium.deployments.builder:app_builder config=configs/demo.yaml`` or, in a Serve
YAML, ``import_path: concilium.deployments.builder:app_builder`` with ``args: {config: ...}``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from concilium.config import ServiceConfig, load_config
from concilium.deployments.gateway import Gateway
from concilium.deployments.registry_service import RegistryService
from concilium.deployments.topology import deployment_options, expert_deployment
from concilium.registry.specs import ModelSpec


def build_app(cfg: ServiceConfig) -> Application:
    """Seed the registry, then one ExpertServer per local generative model, the RegistryService
    (the only writer of the registry, and the gate trainer) and the Gateway."""
    from concilium.orchestrator.service import build_service

    # replicas may not share the driver's working directory: pin every path now
    cfg = cfg.model_copy(
        update={
            "home": cfg.home.absolute(),
            "pack": cfg.pack.absolute() if cfg.pack else None,
            "embed_pack": cfg.embed_pack.absolute() if cfg.embed_pack else None,
            "outcomes": cfg.outcomes.model_copy(
                update={"path": cfg.outcomes.path.absolute() if cfg.outcomes.path else None}
            ),
        }
    )
    # seed the registry (packs + embedder) in the driver; the RegistryService trains the gates
    svc = build_service(cfg.model_copy(update={"train_gates": False}))
    dep = cfg.deployment
    models = {
        rec.spec.name: rec.spec.path
        for rec in svc.registry.list()
        if isinstance(rec.spec, ModelSpec) and rec.spec.task == "generate"
    }
    config = cfg.model_dump(mode="json")
    registry = RegistryService.options(logging_config=dep.logging()).bind(config)  # type: ignore[attr-defined]
    home = str(cfg.home)
    experts = {n: expert_deployment(n, p, dep, home, registry) for n, p in models.items()}
    gateway = Gateway.options(**deployment_options(dep.gateway, dep))  # type: ignore[attr-defined]
    return gateway.bind(config, experts, registry, models)


def app_builder(args: dict[str, Any]) -> Application:
    """Serve's `import_path` entry: args may carry `config` (a YAML path) and field overrides."""
    args = dict(args)
    path = args.pop("config", None)
    overrides = dict(args.pop("concilium", None) or {}) | args
    return build_app(load_config(Path(path) if path else None, **overrides))


def run_serve(
    cfg: ServiceConfig, *, announce: Callable[[ServiceConfig], None] | None = None
) -> None:
    """Start local Ray + Serve, run the app on cfg.host:cfg.port, block until Ctrl-C."""
    import ray

    ray.init(
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
        ignore_reinit_error=True,
    )
    try:
        serve.start(
            http_options={"host": cfg.host, "port": cfg.port},
            logging_config=cfg.deployment.logging(),
        )
        serve.run(build_app(cfg), name="concilium", route_prefix="/", blocking=False)
        if announce is not None:
            announce(cfg)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C even where SIGINT came in ignored
            signal.signal(sig, lambda *_: stop.set())
        with contextlib.suppress(KeyboardInterrupt):
            while not stop.wait(0.5):
                pass
    finally:
        serve.shutdown()
        ray.shutdown()
