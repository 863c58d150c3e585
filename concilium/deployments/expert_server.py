"""ExpertServer: one Ray Serve deployment per local base model.

* Adapters are loaded on demand through ``@serve.multiplexed`` (per-replica LRU of
  `max_adapters`); the gateway sends ``multiplexed_model_id=<adapter>`` so traffic for one adapter
  sticks to replicas that already hold it. Serve's eviction unloads the adapter only once no
  in-flight request uses it.
* Concurrent requests, whatever their adapters, are decoded together through ``@serve.batch``:
  one forward per token for the whole batch, a different adapter per row. (Serve 2.60 splits a
  batch by ``multiplexed_model_id`` and runs the sub-batches concurrently; a `MicroBatcher` with a
  1 ms window joins them back into one mixed-adapter forward.)
* Streams decode on their own and yield text as it settles; a client that goes away cancels them.
* `DELETE` of an adapter drains: each time the registry changes (the RegistryService's long
  poll, or with registry_reads 'store' the SQLite version every WATCH_S) a replica unloads the
  adapters of its base that are gone (or were re-registered with other weights) once their
  in-flight requests end; a request naming other weights than the resident ones reloads them.
* A request with ``params.token_routing`` is a per-token mixture of adapters: every candidate is
  acquired through the same multiplexed LRU (and held until the request ends), then it joins the
  batches like any other row.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from concilium.errors import ExpertFailed
from concilium.experts.base import Generation, GenParams, Message, StreamItem, Target
from concilium.experts.batching import MicroBatcher
from concilium.experts.local import GenRequest, LocalCausalLM
from concilium.experts.pool import decode_rows, needed_adapters, stream_local

log = logging.getLogger(__name__)
MERGE_WINDOW_S = 0.001  # Serve's per-adapter sub-batches start within this of each other
WATCH_S = 0.5  # how often a replica checks the registry version for deleted adapters
WATCH_WAIT_S = 10.0  # how long one long poll of the RegistryService is held open


class _Resident:
    """Serve's handle on one loaded adapter. Serve calls __del__ (in a worker thread) when its LRU
    evicts it, and the interpreter calls it again when the object is freed: only the first call
    counts, and it hands the eviction to the replica's event loop."""

    def __init__(self, server: ExpertServer, name: str) -> None:
        self.server, self.name = server, name
        self._loop = asyncio.get_running_loop()
        self._done = False

    def __del__(self) -> None:
        if self._done:
            return
        self._done = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: the replica is stopping
            self._loop.call_soon_threadsafe(self.server._evicted, self.name)


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
class ExpertServer:
    """Hosts one base model and its adapters; runs mixed-adapter batches."""

    def __init__(
        self,
        model_path: str,
        max_adapters: int = 8,
        max_batch: int = 16,
        batch_wait_ms: float = 2.0,
        registry_home: str | None = None,
        moe: dict[str, Any] | None = None,
        registry: DeploymentHandle | None = None,
    ) -> None:
        from concilium.config import MoEConfig

        options = MoEConfig.model_validate(moe or {}).options()
        if registry_home is not None:  # the tier file goes to disk beside the registry
            options = dataclasses.replace(options, store_dir=Path(registry_home) / "tier")
        # the model's own LRU is a safety net: Serve's multiplexing LRU is the real cap
        self.lm = LocalCausalLM(Path(model_path), max_adapters=2 * max_adapters + 8, moe=options)
        self.model_path = model_path
        ctx = serve.get_replica_context()
        self._replica_id = ctx.replica_id.unique_id
        self.name = ctx.deployment.removeprefix("expert-")
        self._paths: dict[str, str] = {}  # adapter -> the dir its latest request named
        self._loaded: dict[str, str] = {}  # adapter -> the dir resident in the model
        self._home = registry_home
        self._registry = registry  # the RegistryService to watch; None: the store under home
        self._watcher: asyncio.Task[None] | None = None
        self._inflight: Counter[str] = Counter()
        self._unload_when_idle: set[str] = set()
        self._unloads: set[asyncio.Task[None]] = set()  # unloads running in worker threads
        self.stats: Counter[str] = Counter()
        # Serve keeps its LRU / batch queue on the decorated function: decorate plain closures
        # so the sizes can come from the config

        async def load(name: str) -> _Resident:
            return await self._load(name)

        async def run_batch(requests: list[GenRequest]) -> list[Generation | Exception]:
            return await self._run_batch(requests)

        self._decode = decode_rows(self.lm)  # a failing batch fails only its bad rows
        self._merger: MicroBatcher[list[GenRequest], list[Generation | Exception]] = MicroBatcher(
            self._generate_merged, max_batch=max_batch, window_s=MERGE_WINDOW_S
        )
        self._adapter = serve.multiplexed(max_num_models_per_replica=max_adapters)(load)
        self._batch = serve.batch(
            max_batch_size=max_batch, batch_wait_timeout_s=batch_wait_ms / 1e3
        )(run_batch)

    # -- adapters ----------------------------------------------------------------------------
    async def _load(self, name: str) -> _Resident:
        path = self._paths.get(name)
        if path is None:
            raise ExpertFailed(f"adapter {name!r}: no path was sent with the request")
        self._unload_when_idle.discard(name)
        await asyncio.to_thread(self.lm.ensure_adapter, name, path)
        self._loaded[name] = path
        self.stats["adapter_loads"] += 1
        return _Resident(self, name)

    def _unload(self, name: str) -> None:
        self.lm.unload_adapter(name)
        self._loaded.pop(name, None)

    def _unload_later(self, name: str) -> None:
        """Unload in a worker thread (the model's lock may be held by a decode for a while:
        never wait for it on the event loop), unless a request took the adapter meanwhile."""

        def unload() -> None:
            if not self._inflight[name]:
                self._unload(name)

        task = asyncio.get_running_loop().create_task(asyncio.to_thread(unload))
        self._unloads.add(task)
        task.add_done_callback(self._unloads.discard)

    def _reload(self, name: str, path: str) -> None:
        """Load `path` under `name` when the model holds other weights under it, or none."""
        self._unload(name)
        self.lm.ensure_adapter(name, path)
        self._loaded[name] = path
        self.stats["adapter_loads"] += 1

    def _evicted(self, name: str) -> None:
        self.stats["adapter_evictions"] += 1
        self._retire(name)

    def _retire(self, name: str) -> None:
        """Unload now, or, while requests still use it, when the last of them ends (drain)."""
        if self._inflight[name]:
            self._unload_when_idle.add(name)
        else:
            self._unload_later(name)

    async def _acquire(self, held: list[str], target: Target, params: GenParams) -> None:
        """Load the request's adapters (a mixture: all its candidates); `held` lists those to
        release, filled before any load so that a failed load releases them all."""
        self._watch_registry()
        needed = needed_adapters(target, params)
        for name, path in needed:
            self._paths[name] = path
            self._inflight[name] += 1
            held.append(name)
        for name, path in needed:
            await self._adapter(name)  # Serve's LRU: loads on a miss
            if self._loaded.get(name) != path or name not in self.lm.adapters:
                # re-registered under the same name (new weights), or dropped after a delete
                self._unload_when_idle.discard(name)
                await asyncio.to_thread(self._reload, name, path)

    def _release(self, held: list[str]) -> None:
        for a in held:
            self._inflight[a] -= 1
            if not self._inflight[a] and a in self._unload_when_idle:
                self._unload_when_idle.discard(a)
                self._unload_later(a)

    # -- deletions -------------------------------------------------------------------------
    def _watch_registry(self) -> None:
        watched = self._home is not None or self._registry is not None
        if watched and (self._watcher is None or self._watcher.done()):
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        """Each time the registry changes: unload the adapters of this base that are no longer
        registered (or were re-registered with other weights), after their in-flight requests
        end."""
        changes = self._from_service() if self._registry is not None else self._from_store()
        async for records in changes:
            live = self._registered(records)
            for name, path in list(self._loaded.items()):
                if live.get(name) != Path(path).name:
                    self.stats["adapter_unregistered"] += 1
                    self._retire(name)

    async def _from_store(self) -> AsyncIterator[list[Any]]:
        """The records, every WATCH_S that the SQLite store's version moved."""
        from concilium.registry.store import store_at

        assert self._home is not None
        store = store_at(Path(self._home))
        seen: int | None = None
        while True:
            await asyncio.sleep(WATCH_S)
            try:
                version = await asyncio.to_thread(store.version)
                if version == seen:
                    continue
                records = await asyncio.to_thread(store.list)
                seen = version
            except Exception as e:  # the store is shared; a busy moment is retried next tick
                log.warning("registry watch of %s failed: %s", self.name, e)
                continue
            yield records

    async def _from_service(self) -> AsyncIterator[list[Any]]:
        """The records each time the RegistryService's long poll reports a new version."""
        assert self._registry is not None
        seen: int | None = None
        while True:
            try:
                got = await self._registry.watch.remote(seen, WATCH_WAIT_S)
            except Exception as e:  # restarting or redeployed: try again shortly
                log.warning("registry watch of %s failed: %s", self.name, e)
                await asyncio.sleep(WATCH_S)
                continue
            if got is not None:
                seen, records = got
                yield records

    def _registered(self, records: Sequence[Any]) -> dict[str, str]:
        """lora name -> artifact ref, for the registered adapters of this base."""
        return {
            r.name: str(r.artifacts.get("adapter"))
            for r in records
            if r.spec.kind == "lora" and getattr(r.spec, "base", None) == self.name
        }

    # -- requests ----------------------------------------------------------------------------
    async def chat(
        self, target: Target, messages: Sequence[Message], params: GenParams
    ) -> Generation:
        held: list[str] = []
        try:
            await self._acquire(held, target, params)
            out = await self._batch(
                GenRequest(list(messages), params, target.adapter, target.adapter_path)
            )
            if isinstance(out, Exception):
                raise out
            return self._stamped(out)
        except asyncio.CancelledError:
            self.stats["cancelled"] += 1
            raise
        finally:
            self._release(held)

    async def _run_batch(self, requests: list[GenRequest]) -> list[Generation | Exception]:
        # Serve splits a batch by multiplexed_model_id and runs the per-adapter sub-batches
        # concurrently; the merger joins them again so every adapter shares one forward.
        self.stats["batched_rows"] += len(requests)
        return await self._merger.submit(requests)

    def _generate_merged(
        self, groups: list[list[GenRequest]]
    ) -> list[list[Generation | Exception]]:
        """One mixed-adapter forward for every sub-batch that arrived together; a row that
        makes it fail gets its own error (the rest are decoded again without it)."""
        self.stats["batches"] += 1
        flat = [r for g in groups for r in g]
        if len({r.adapter for r in flat}) > 1:
            self.stats["mixed_adapter_batches"] += 1
        out = self._decode(flat)
        split, start = [], 0
        for g in groups:
            split.append(out[start : start + len(g)])
            start += len(g)
        return split

    async def chat_stream(
        self, target: Target, messages: Sequence[Message], params: GenParams
    ) -> AsyncIterator[StreamItem]:
        held: list[str] = []
        try:
            await self._acquire(held, target, params)
            request = GenRequest(list(messages), params, target.adapter, target.adapter_path)
            async with aclosing(stream_local(self.lm, request)) as local:
                async for item in local:
                    yield self._stamped(item) if isinstance(item, Generation) else item
        except asyncio.CancelledError:
            self.stats["cancelled"] += 1
            raise
        finally:
            self._release(held)

    def _stamped(self, gen: Generation) -> Generation:
        """The generation with this replica's counters attached (the gateway's /metrics)."""
        return dataclasses.replace(
            gen,
            replica={"id": self._replica_id, "model": self.name, "stats": self._counters()},
        )

    # -- introspection (tests, operators) ----------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "adapters": self.lm.adapters,
            "stats": self._counters(),
            "moe": self.lm.moe.info(),
        }

    def _counters(self) -> dict[str, float]:
        """Serving events plus the MoE tier's counters (the gateway sums them over replicas)."""
        return {**self.stats, **self.lm.moe.counters()}

    def check_health(self) -> None:
        if self.lm.model is None:  # pragma: no cover - the model is loaded in __init__
            raise RuntimeError("model not loaded")
