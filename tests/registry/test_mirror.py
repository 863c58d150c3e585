"""Replicas read the registry from a mirror the store's owner feeds (registry_reads: service):
the mirror serves the last snapshot, the publisher's long poll wakes on any write to the store
(also one made by another process), the feed keeps serving through an outage, and a service on a
mirror never opens the SQLite file."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from concilium.config import load_config
from concilium.errors import ExpertNotFound, RegistryUnavailable
from concilium.orchestrator.http import create_app
from concilium.orchestrator.service import build_service
from concilium.registry.mirror import Feed, MirrorStore, Publisher
from concilium.registry.registry import Registry
from tests.conftest import FakeBackend, HashEncoder, remote_spec

REVERSE = remote_spec("reverse", ["reverse the word", "spell the word backwards"])
MATH = remote_spec("math", ["add the numbers", "what is the sum of numbers"])


def owner(home: Path) -> Registry:
    reg = Registry(home, HashEncoder())
    reg.register(REVERSE)
    return reg


def test_a_mirror_without_a_snapshot_is_unavailable_and_never_writes(tmp_path: Path) -> None:
    mirror = MirrorStore()
    for read in (mirror.version, mirror.list, lambda: mirror.get("reverse")):
        with pytest.raises(RegistryUnavailable, match="not been received"):
            read()
    rec = owner(tmp_path).get("reverse")
    mirror.publish(3, [rec])
    with pytest.raises(RegistryUnavailable, match="writes go to the RegistryService"):
        Registry(tmp_path, HashEncoder(), store=mirror).register(MATH)
    assert [r.name for r in mirror.list()] == ["reverse"]  # unchanged


def test_a_mirror_serves_the_snapshot_it_was_given(tmp_path: Path) -> None:
    reg = owner(tmp_path)
    reg.register(MATH)
    version, records = reg.store.snapshot()
    mirror = MirrorStore()
    assert mirror.publish(version, list(reversed(records)))
    assert not mirror.publish(version, [])  # the same version again: nothing to take
    assert mirror.version() == version
    assert [r.name for r in mirror.list()] == ["reverse", "math"]  # oldest first
    assert mirror.get("math") == reg.get("math")
    with pytest.raises(ExpertNotFound):
        mirror.get("nope")
    assert mirror.publish(1, records[:1])  # a recreated store counts from lower again
    assert [r.name for r in mirror.list()] == ["reverse"]


def test_wait_for_returns_when_another_thread_publishes(tmp_path: Path) -> None:
    rec = owner(tmp_path).get("reverse")
    mirror = MirrorStore()
    assert not mirror.wait_for(1, timeout=0.05)
    threading.Timer(0.05, mirror.publish, args=(2, [rec])).start()
    t0 = time.monotonic()
    assert mirror.wait_for(2, timeout=5.0)
    assert time.monotonic() - t0 < 4.0
    assert not mirror.wait_for(3, timeout=0.05)


def test_the_feed_follows_writes_from_any_process(tmp_path: Path) -> None:
    reg = owner(tmp_path)
    mirror = MirrorStore()

    async def scenario() -> list[str]:
        publisher = Publisher(reg.store, poll_s=0.02)
        feed = Feed(publisher.watch, mirror, wait_s=1.0)
        await feed.first(timeout_s=5.0)
        assert [r.name for r in mirror.list()] == ["reverse"]
        feed.start()
        before = mirror.version()
        # another process (the CLI) writes the same store: not through the publisher
        await asyncio.to_thread(Registry(tmp_path, HashEncoder()).register, MATH)
        deadline = time.monotonic() + 5.0
        while mirror.version() == before and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        feed.stop()
        await asyncio.sleep(0)
        return [r.name for r in mirror.list()]

    assert asyncio.run(scenario()) == ["reverse", "math"]


def test_a_watch_that_sees_no_change_answers_none_within_its_cap(tmp_path: Path) -> None:
    reg = owner(tmp_path)

    async def scenario() -> tuple[Any, Any, float]:
        publisher = Publisher(reg.store, poll_s=0.01, max_wait_s=0.2)
        first = await publisher.watch(None, 5.0)
        assert first is not None
        t0 = time.monotonic()
        again = await publisher.watch(first[0], 60.0)  # capped at max_wait_s
        return first, again, time.monotonic() - t0

    first, again, took = asyncio.run(scenario())
    assert first[0] == reg.version() and [r.name for r in first[1]] == ["reverse"]
    assert again is None and took < 5.0


def test_the_feed_keeps_its_snapshot_while_the_owner_is_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rec = owner(tmp_path).get("reverse")
    mirror = MirrorStore()
    mirror.publish(5, [rec])
    calls: list[tuple[int | None, float]] = []

    async def down(after: int | None, wait_s: float) -> None:
        calls.append((after, wait_s))
        raise ConnectionError("replica restarting")

    async def scenario() -> list[bool]:
        feed = Feed(down, mirror, retry_s=0.0)
        return [await feed.step(), await feed.step()]

    with caplog.at_level(logging.WARNING, logger="concilium.registry.mirror"):
        assert asyncio.run(scenario()) == [False, False]
    assert calls[0][0] == 5  # it asks for what comes after the snapshot it holds
    assert mirror.version() == 5 and mirror.get("reverse") == rec
    assert sum("not reachable" in r.message for r in caplog.records) == 1  # logged once


def test_a_service_on_a_mirror_never_opens_the_registry_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = owner(tmp_path)
    reg.register(MATH)
    mirror = MirrorStore()
    mirror.publish(*reg.store.snapshot())
    real_connect = sqlite3.connect

    def connect(path: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        if str(path).endswith("registry.sqlite"):
            raise AssertionError(f"opened {path}")
        return real_connect(path, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", connect)
    cfg = load_config(None, home=tmp_path, seed_embedder=False)
    svc = build_service(cfg, encoder=HashEncoder(), backend=FakeBackend(), seed=False, store=mirror)
    with TestClient(create_app(svc)) as client:
        assert client.get("/health").json()["registry_source"] == "mirror"
        models = client.get("/v1/models").json()["data"]
        assert {"reverse", "math"} <= {m["id"] for m in models}
        r = client.post(
            "/v1/chat/completions",
            json={"model": "auto", "messages": [{"role": "user", "content": "add the numbers"}]},
        )
        assert r.status_code == 200, r.text
        assert r.json()["routing"]["expert"] == "math"


def test_one_version_move_reads_the_store_once_for_every_watcher(tmp_path: Path) -> None:
    reg = owner(tmp_path)
    reads: list[int] = []

    class Counting:
        def version(self) -> int:
            return reg.store.version()

        def snapshot(self) -> tuple[int, list[Any]]:
            reads.append(1)
            return reg.store.snapshot()

    async def scenario() -> list[Any]:
        publisher = Publisher(Counting(), poll_s=0.01)
        first = await publisher.watch(None, 5.0)
        assert first is not None
        reads.clear()
        watchers = [asyncio.create_task(publisher.watch(first[0], 5.0)) for _ in range(8)]
        await asyncio.sleep(0.05)
        await asyncio.to_thread(reg.register, MATH)
        return await asyncio.gather(*watchers)

    got = asyncio.run(scenario())
    assert all(g is not None and [r.name for r in g[1]] == ["reverse", "math"] for g in got)
    assert len(reads) == 1
