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
import logging
from typing import Any

from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle

from concilium.config import ServiceConfig
from concilium.deployments.gateway import unwrap_ray_error
from concilium.deployments.topology import delete_expert_app
from concilium.registry.store import ExpertRecord

log = logging.getLogger(__name__)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=16)
class RegistryService:
    """Owns registry writes and gate training; one replica per application."""

    def __init__(self, config: dict[str, Any]) -> None:
        from concilium.experts.pool import ExpertPool
        from concilium.orchestrator.service import open_registry, pool_profiler

        cfg = ServiceConfig.model_validate(config)
        self._pool = ExpertPool(max_adapters=1)  # only to measure a new local model's latency
        self.registry = open_registry(cfg, profiler=pool_profiler(self._pool))
        pending = self.registry.train_pending_gates()
        if pending:
            log.info("resuming PHATGOOSE gates of %s", pending)

    async def register(self, data: Any) -> ExpertRecord:
        return await asyncio.to_thread(self.registry.register, data)

    async def remove(self, name: str) -> int:
        version = await asyncio.to_thread(self.registry.remove, name)
        await asyncio.to_thread(delete_expert_app, name)
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

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self.handle, method).remote(*args)
        except RayTaskError as e:
            raise unwrap_ray_error(e) from None
