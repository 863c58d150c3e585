"""Who writes the registry on behalf of the HTTP API.

`POST /v1/experts` and `DELETE /v1/experts/{name}` go through a `Registrar`. In one process (the
CLI, `concilium serve --no-ray`, tests) that is the local `Registry` itself, run off the event loop.
On Ray Serve it is the single `RegistryService` replica (``deployments/registry_service.py``): the
one process that writes the store, builds artifacts and trains PHATGOOSE gates, so two gateway
replicas never train the same gate twice. Replicas read a mirror the RegistryService feeds
(`concilium.registry.mirror`; `deployment.registry_reads: store` has them read the SQLite file
instead), and see a write as soon as the registry version moves.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from concilium.registry.registry import Registry
from concilium.registry.store import ExpertRecord


class Registrar(Protocol):
    async def register(self, data: Any) -> ExpertRecord:
        """Validate and store one expert spec (a dict); raises the registry's errors."""
        ...

    async def remove(self, name: str) -> int:
        """Remove one expert; returns the new registry version."""
        ...


class LocalRegistrar:
    """Writes through a `Registry` in this process (on a worker thread)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def register(self, data: Any) -> ExpertRecord:
        return await asyncio.to_thread(self.registry.register, data)

    async def remove(self, name: str) -> int:
        return await asyncio.to_thread(self.registry.remove, name)
