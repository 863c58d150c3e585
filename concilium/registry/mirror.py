"""A read-only registry store fed from the process that owns the SQLite file.

On Ray Serve one `RegistryService` replica owns ``registry.sqlite``; every other replica (gateways,
ExpertServers) can read the registry from a `MirrorStore` instead of opening the file: the
service publishes (version, records) snapshots and the replica's feed (``deployments/``) keeps
the mirror current with a long poll. That is what lets replicas run on other nodes than the
store: SQLite's WAL mode needs every reader on the host that holds the file (its shared-memory
index does not work over a network filesystem), and only artifacts — content-addressed files,
written once — need a shared path.

The mirror answers the read half of `RegistryStore` (`version`, `get`, `list`, `snapshot`) from
memory; writes go to the service (`RayRegistrar`), and a write attempted here is an error.

    owner:    publisher = Publisher(store)           # watch(after, wait_s) -> snapshot | None
    replica:  feed = Feed(publisher.watch, mirror)   # over Ray: handle.watch.remote
              await feed.first(); feed.start()      # then mirror.version() / get() / list()

`Publisher` reads the store's version once per `poll_s` for every watcher (writes by other
processes, e.g. `concilium experts add` on the same home, are seen too); `Feed` keeps the last
snapshot while the owner cannot be reached and retries.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, Protocol

from concilium.errors import ExpertNotFound, RegistryUnavailable
from concilium.registry.store import ExpertRecord

log = logging.getLogger(__name__)
Snapshot = tuple[int, list[ExpertRecord]]  # (registry version, every record, oldest first)
Watch = Callable[[int | None, float], Awaitable[Snapshot | None]]  # (after, wait_s)


class _Versioned(Protocol):
    def version(self) -> int: ...

    def snapshot(self) -> Snapshot: ...


class MirrorStore:
    """The registry as last published by its owner; thread-safe."""

    def __init__(self) -> None:
        self._version: int | None = None  # None: nothing received yet
        self._records: dict[str, ExpertRecord] = {}
        self._changed = threading.Condition()

    # -- fed by the owner --------------------------------------------------------------------
    def publish(self, version: int, records: Sequence[ExpertRecord]) -> bool:
        """Take a snapshot (the owner's version and all its records, oldest first). A store
        that was recreated may count from a lower version again, so any other version is
        taken. True when it changed the mirror."""
        with self._changed:
            if version == self._version:
                return False
            self._version = version
            self._records = {r.name: r for r in records}
            self._changed.notify_all()
            return True

    @property
    def received(self) -> int | None:
        """The version of the last snapshot taken, None before the first."""
        return self._version

    def wait_for(self, version: int, timeout: float) -> bool:
        """Block until the mirror holds `version` or a later one (a write this process asked the
        owner for is visible here: read-your-writes); False after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._version is None or self._version < version:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return True

    # -- the read half of RegistryStore ------------------------------------------------------
    def version(self) -> int:
        return self._ready()

    def get(self, name: str) -> ExpertRecord:
        self._ready()
        rec = self._records.get(name)
        if rec is None:
            raise ExpertNotFound(f"no expert named {name!r}")
        return rec

    def list(self) -> builtins.list[ExpertRecord]:
        """All experts, oldest first."""
        return self.snapshot()[1]

    def snapshot(self) -> tuple[int, builtins.list[ExpertRecord]]:
        with self._changed:
            version = self._ready()
            return version, sorted(self._records.values(), key=lambda r: r.version)

    def _ready(self) -> int:
        version = self._version
        if version is None:
            raise RegistryUnavailable(
                "the registry has not been received from the RegistryService yet",
                retry_after_s=1.0,
            )
        return version

    # -- writes belong to the owner ----------------------------------------------------------
    def add(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._read_only()

    def remove(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._read_only()

    def update_artifacts(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._read_only()

    @staticmethod
    def _read_only() -> NoReturn:
        raise RegistryUnavailable(
            "this replica reads a mirror of the registry: writes go to the RegistryService"
        )


class Publisher:
    """The owner's side: `watch` long polls, all served by one reader of the store's version."""

    def __init__(self, store: _Versioned, *, poll_s: float = 0.1, max_wait_s: float = 30.0) -> None:
        self.store, self.poll_s, self.max_wait_s = store, poll_s, max_wait_s
        self._seen: int | None = None  # the store's version as last read
        self._moved = asyncio.Event()  # set, then replaced, each time the version moves
        self._poller: asyncio.Task[None] | None = None
        self._last: Snapshot | None = None  # read once per version for every watcher it wakes
        self._reading: asyncio.Lock | None = None

    async def watch(self, after: int | None, wait_s: float = 10.0) -> Snapshot | None:
        """(version, records) once the store's version differs from `after` (None: as soon as
        it has been read once), or None when it has not moved within `wait_s` (capped at
        `max_wait_s`)."""
        self._start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, min(wait_s, self.max_wait_s))
        while self._seen is None or self._seen == after:
            moved, left = self._moved, deadline - loop.time()
            if left <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(moved.wait(), left)
        return await self._snapshot()

    async def _snapshot(self) -> Snapshot:
        """The store's snapshot, read once for all the watchers one version move wakes."""
        if self._reading is None:
            self._reading = asyncio.Lock()
        async with self._reading:
            if self._last is None or self._last[0] != self._seen:
                self._last = await asyncio.to_thread(self.store.snapshot)
                self._moved_to(self._last[0])  # it may be past the last poll: wake those behind
            return self._last

    def _moved_to(self, version: int) -> None:
        if version != self._seen:
            self._seen = version
            self._moved.set()
            self._moved = asyncio.Event()

    def _start(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            try:
                version = await asyncio.to_thread(self.store.version)
            except Exception as e:  # a busy moment of the store: the next tick tries again
                log.warning("registry version read failed: %s", e)
            else:
                self._moved_to(version)
            await asyncio.sleep(self.poll_s)


class Feed:
    """A replica's side: keeps a `MirrorStore` current from the owner's `watch`. While the owner
    cannot be reached the mirror keeps its last snapshot (the replica serves on) and the feed
    retries every `retry_s`, logging the outage once."""

    def __init__(
        self, watch: Watch, mirror: MirrorStore, *, wait_s: float = 10.0, retry_s: float = 1.0
    ) -> None:
        self.watch, self.mirror = watch, mirror
        self.wait_s, self.retry_s = wait_s, retry_s
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    async def first(self, timeout_s: float = 120.0) -> None:
        """Wait for the first snapshot (a replica starting beside its owner waits for it to
        come up); RegistryUnavailable after `timeout_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.mirror.received is None:
            left = deadline - loop.time()
            if left <= 0:
                raise RegistryUnavailable(
                    f"no registry snapshot from the RegistryService within {timeout_s:g} s"
                )
            await self.step(wait_s=min(5.0, left))

    def start(self) -> None:
        """Follow the registry from now on (on the running event loop)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._follow())

    def stop(self) -> None:
        """Stop following (from any thread: Serve stops a replica from a worker thread)."""
        task = self._task
        if task is not None and not task.done():
            with contextlib.suppress(RuntimeError):  # the loop is closed already
                task.get_loop().call_soon_threadsafe(task.cancel)

    async def _follow(self) -> None:
        while True:
            await self.step()

    async def step(self, wait_s: float | None = None) -> bool:
        """One long poll; True when it brought a new snapshot."""
        pending = self.watch(self.mirror.received, self.wait_s if wait_s is None else wait_s)
        try:
            got = await pending
        except asyncio.CancelledError:
            cancel = getattr(pending, "cancel", None)  # a Serve response: stop the remote call
            if cancel is not None:
                cancel()
            raise
        except Exception as e:  # restarting, redeployed, or not up yet
            if not self._failing:
                log.warning("registry feed: the RegistryService is not reachable (%r)", e)
            self._failing = True
            await asyncio.sleep(self.retry_s)
            return False
        if self._failing:
            log.info("registry feed: the RegistryService is reachable again")
        self._failing = False
        return got is not None and self.mirror.publish(*got)
