"""The Serve side of registry_reads: service, without a cluster: a gateway's write returns once
its own mirror shows it, and an ExpertServer retires the adapters the RegistryService's long
poll reports gone."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from concilium.deployments import registry_service as rs
from concilium.deployments.expert_server import ExpertServer
from concilium.registry.mirror import MirrorStore
from concilium.registry.registry import Registry
from concilium.registry.store import ExpertRecord
from tests.conftest import HashEncoder, remote_spec


class _Method:
    """`handle.<method>` whose `.remote(...)` awaits `fn(...)`."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        return self.fn(*args)


def record(tmp_path: Path, name: str = "reverse") -> ExpertRecord:
    return Registry(tmp_path, HashEncoder()).register(remote_spec(name, ["reverse the word"]))


def test_a_gateway_write_returns_once_its_own_mirror_shows_it(tmp_path: Path) -> None:
    rec = record(tmp_path)
    mirror = MirrorStore()
    mirror.publish(rec.version - 1, [])

    async def register(data: Any) -> ExpertRecord:
        # the feed brings the new snapshot a moment after the service answered
        threading.Timer(0.2, mirror.publish, args=(rec.version, [rec])).start()
        return rec

    handle: Any = type("H", (), {"register": _Method(register)})()
    got = asyncio.run(rs.RayRegistrar(handle, mirror).register({}))
    assert got == rec
    assert mirror.version() == rec.version  # read-your-writes: visible here on return


def test_a_write_whose_snapshot_never_comes_returns_after_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = record(tmp_path)
    mirror = MirrorStore()
    mirror.publish(0, [])
    monkeypatch.setattr(rs, "READ_YOUR_WRITE_S", 0.05)

    async def register(data: Any) -> ExpertRecord:
        return rec

    handle: Any = type("H", (), {"register": _Method(register)})()
    assert asyncio.run(rs.RayRegistrar(handle, mirror).register({})) == rec
    assert mirror.version() == 0


def test_an_expert_server_retires_adapters_the_long_poll_reports_gone(tmp_path: Path) -> None:
    reg = Registry(tmp_path, HashEncoder())
    reg.register(remote_spec("other", ["anything"]))
    snapshots = [reg.store.snapshot()]  # no adapter of this base is registered
    asked: list[int | None] = []

    async def watch(after: int | None, wait_s: float) -> Any:
        asked.append(after)
        if snapshots:
            return snapshots.pop()
        await asyncio.sleep(3600)  # nothing moves any more

    server: Any = object.__new__(ExpertServer.func_or_class)
    server.name, server._home = "base", None
    server._registry = type("H", (), {"watch": _Method(watch)})()
    server._loaded = {"gone": "/artifacts/abc"}
    server.stats = Counter()
    retired: list[str] = []
    server._retire = retired.append

    async def main() -> None:
        task = asyncio.get_running_loop().create_task(server._watch())
        for _ in range(100):
            await asyncio.sleep(0.01)
            if retired:
                break
        task.cancel()

    asyncio.run(main())
    assert retired == ["gone"] and server.stats["adapter_unregistered"] == 1
    assert asked[:2] == [None, reg.version()]  # then it asks for what comes after it
