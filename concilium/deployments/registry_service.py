"""RegistryService: the one Serve replica that writes the registry.

Gateways forward `POST /v1/experts` and `DELETE /v1/experts/{name}` here (through `RayRegistrar`);
this replica validates the spec, copies the files into the artifact store, embeds the pilots,
profiles a new local model, inserts the row and bumps the registry version; deleting a model
expert that runs in its own application (registered while serving) also deletes that application,
once Serve has drained its in-flight requests. It alone owns the
background PHATGOOSE gate jobs: it resumes the gates a previous run left pending when it starts,
and trains the gate of every lora registered through it. It also publishes the registry: `watch` is
a long poll that answers with a (version, records) snapshot as soon as the version moves, which
gateway and ExpertServer replicas mirror (`deployment.registry_reads: service`, the default), so
no other replica opens the SQLite file; with `registry_reads: store` they read it directly (one
machine). Writes made outside this replica (`concilium experts add` against the same home) are
seen within POLL_S.
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
from ray.serve.exceptions import DeploymentUnavailableError, RayServeException
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
from concilium.registry.mirror import Feed, MirrorStore, Publisher
from concilium.registry.store import AnySpec, ExpertRecord

log = logging.getLogger(__name__)
# longer than a gateway's catalogue refresh (ServiceConfig.refresh_s, 0.2 s by default)
DELETE_GRACE_S = 1.0
START_BACKOFF_S = 10.0  # after a failed start of a late model, before the next try
POLL_S = 0.1  # how often the store's version is read for `watch` (one read for all watchers)
MAX_WATCH_S = 30.0  # the longest a `watch` call is held open
READ_YOUR_WRITE_S = 2.0  # how long a write waits for the writer's own mirror to show it


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


# every gateway and ExpertServer replica holds one `watch` call open: room for them beside writes
@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1024)
class RegistryService:
    """Owns registry writes and gate training; one replica per application."""

    def __init__(self, config: dict[str, Any]) -> None:
        from concilium.orchestrator.service import open_registry

        cfg = ServiceConfig.model_validate(config)
        self.registry = open_registry(cfg, profiler=profile_once)
        self._deployment, self._home = cfg.deployment, str(cfg.home)
        self._app_locks: dict[str, asyncio.Lock] = {}  # per model: its start and its delete
        self._failed_at: dict[tuple[str, str], float] = {}  # (model, weights) -> last failure
        self.publisher = Publisher(self.registry.store, poll_s=POLL_S, max_wait_s=MAX_WATCH_S)
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
                await asyncio.to_thread(
                    deploy_expert_app, name, path, self._deployment, self._home, self._own_handle()
                )
            except Exception:
                self._failed_at[(name, path)] = time.monotonic()
                raise
            self._failed_at.pop((name, path), None)

    def _own_handle(self) -> DeploymentHandle | None:
        """A handle on this deployment, for the ExpertServers it starts to watch; None outside
        a Serve replica or with registry_reads 'store' (they then read the store itself)."""
        if self._deployment.registry_reads != "service":
            return None
        try:
            ctx = serve.get_replica_context()
        except RayServeException:
            return None
        return serve.get_deployment_handle(ctx.deployment, app_name=ctx.app_name)

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

    async def watch(
        self, after: int | None, wait_s: float = 10.0
    ) -> tuple[int, list[ExpertRecord]] | None:
        """Long poll for the replicas' mirrors (see `concilium.registry.mirror.Publisher`)."""
        return await self.publisher.watch(after, wait_s)

    def pending_gates(self) -> list[str]:
        """Experts whose gate training is queued or running (operators, tests)."""
        return self.registry.jobs.pending()

    def check_health(self) -> None:
        self.registry.version()  # the store is readable


class RayRegistrar:
    """The gateway's `Registrar` on Serve: every write goes to the RegistryService replica. With
    a `mirror` (registry_reads: service) a write returns once this replica's mirror holds it
    (read-your-writes), or after READ_YOUR_WRITE_S."""

    def __init__(self, handle: DeploymentHandle, mirror: MirrorStore | None = None) -> None:
        self.handle = handle
        self.mirror = mirror

    async def register(self, data: Any) -> ExpertRecord:
        rec: ExpertRecord = await self._call("register", data)
        await self._seen(rec.version)
        return rec

    async def remove(self, name: str) -> int:
        version: int = await self._call("remove", name)
        await self._seen(version)
        return version

    async def _seen(self, version: int) -> None:
        if self.mirror is not None:
            await asyncio.to_thread(self.mirror.wait_for, version, READ_YOUR_WRITE_S)

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


def registry_feed(handle: DeploymentHandle, mirror: MirrorStore) -> Feed:
    """The `Feed` that keeps `mirror` current from the RegistryService behind `handle`."""
    return Feed(handle.watch.remote, mirror)
