"""RegistryService: the one Serve replica that writes the registry.

Gateways forward `POST /v1/experts` and `DELETE /v1/experts/{name}` here (through `RayRegistrar`);
this replica validates the spec, copies the files into the artifact store, embeds the pilots,
profiles a new local model, inserts the row and bumps the registry version; deleting a model
expert that runs in its own application (registered while serving) also deletes that application,
once Serve has drained its in-flight requests. It alone owns the
background PHATGOOSE gate jobs: it resumes the gates a previous run left pending when it starts,
and trains the gate of every lora registered through it. Readers (gateways, CLI) keep reading the
shared SQLite store directly, so a write is visible everywhere as soon as the version moves.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from pathlib import Path
from typing import Any

from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from concilium.config import ServiceConfig
from concilium.deployments.gateway import model_path_of, unwrap_ray_error
from concilium.deployments.topology import (
    delete_expert_app,
    deploy_expert_app,
    expert_apps,
    expert_handle,
)
from concilium.errors import ExpertUnavailable, RegistryUnavailable
from concilium.registry.store import AnySpec, ExpertRecord

log = logging.getLogger(__name__)
# longer than a gateway's catalogue refresh (ServiceConfig.refresh_s, 0.2 s by default)
DELETE_GRACE_S = 1.0
START_BACKOFF_S = 10.0  # after a failed start of a late model, before the next try


def profile_once(spec: AnySpec, runtime_dir: Path | None) -> dict[str, float]:
    """A new local model's latency, measured on a copy loaded for that alone and dropped after
    (this replica serves no model: keeping it would hold every model ever registered)."""
    from concilium.experts.local import LocalCausalLM

    if runtime_dir is None:
        return {}
    lm = LocalCausalLM(runtime_dir, max_adapters=1)
    try:
        return dict(lm.measure_latency())
    finally:
        del lm
        gc.collect()


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=16)
class RegistryService:
    """Owns registry writes and gate training; one replica per application."""

    def __init__(self, config: dict[str, Any]) -> None:
        from concilium.orchestrator.service import open_registry

        cfg = ServiceConfig.model_validate(config)
        self.registry = open_registry(cfg, profiler=profile_once)
        self._deployment, self._home = cfg.deployment, str(cfg.home)
        self._app_locks: dict[str, asyncio.Lock] = {}  # per model: its start and its delete
        self._failed_at: dict[tuple[str, str], float] = {}  # (model, weights) -> last failure
        pending = self.registry.train_pending_gates()
        if pending:
            log.info("resuming PHATGOOSE gates of %s", pending)

    async def register(self, data: Any) -> ExpertRecord:
        return await asyncio.to_thread(self.registry.register, data)

    async def ensure_app(self, name: str, path: str) -> None:
        """Start (or find) the application of late model `name` with weights `path`, once for
        every gateway replica, and only while it is registered with those weights (a start and
        a DELETE of one model never interleave)."""
        async with self._app_lock(name):
            if await asyncio.to_thread(model_path_of, self.registry, name) != path:
                raise ExpertUnavailable(
                    f"model {name!r} is no longer registered with weights {path}"
                )
            failed = self._failed_at.get((name, path))
            wait = 0.0 if failed is None else failed + START_BACKOFF_S - time.monotonic()
            if wait > 0:  # a start that just failed is not retried by every request behind it
                raise ExpertUnavailable(
                    f"model {name!r}: its ExpertServer failed to start {START_BACKOFF_S - wait:.0f}"
                    " s ago; retrying after a back-off",
                    retry_after_s=wait,
                )
            try:
                await asyncio.to_thread(deploy_expert_app, name, path, self._deployment, self._home)
            except Exception:
                self._failed_at[(name, path)] = time.monotonic()
                raise
            self._failed_at.pop((name, path), None)

    def _app_lock(self, name: str) -> asyncio.Lock:
        return self._app_locks.setdefault(name, asyncio.Lock())

    async def remove(self, name: str) -> int:
        async with self._app_lock(name):
            return await self._remove(name)

    async def _remove(self, name: str) -> int:
        version = await asyncio.to_thread(self.registry.remove, name)
        # one status call: no application of `name` can start meanwhile (ensure_app holds the
        # same lock, and finds the expert removed)
        apps = await asyncio.to_thread(expert_apps, name)
        if apps:
            # gateways route to the expert until they see the new version (their catalogue
            # refresh): a request sent to an application being deleted waits for replicas
            # that never come, so let those requests reach it before it starts draining
            await asyncio.sleep(DELETE_GRACE_S)
            await asyncio.to_thread(delete_expert_app, name, apps)
        return version

    def version(self) -> int:
        return self.registry.version()

    def pending_gates(self) -> list[str]:
        """Experts whose gate training is queued or running (operators, tests)."""
        return self.registry.jobs.pending()

    def check_health(self) -> None:
        self.registry.version()  # the store is readable


class RayRegistrar:
    """The gateway's `Registrar` on Serve: every write goes to the RegistryService replica."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def register(self, data: Any) -> ExpertRecord:
        rec: ExpertRecord = await self._call("register", data)
        return rec

    async def remove(self, name: str) -> int:
        version: int = await self._call("remove", name)
        return version

    async def deploy(self, name: str, path: str) -> DeploymentHandle:
        """The handle of late model `name`'s application, started by the RegistryService."""
        await self._call("ensure_app", name, path)
        return expert_handle(name, path)

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self.handle, method).remote(*args)
        except RayTaskError as e:
            raise unwrap_ray_error(e) from None
        except (RayActorError, DeploymentUnavailableError) as e:  # restarting, or gone
            raise RegistryUnavailable(
                f"the registry service is not reachable ({type(e).__name__}); retry shortly",
                retry_after_s=1.0,
            ) from None
