"""RayBackend without a cluster: Serve handles and the late-deploy step replaced by fakes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from concilium.config import DeploymentConfig
from concilium.deployments import gateway, topology
from concilium.errors import ExpertUnavailable
from concilium.experts.base import Generation, GenParams, Target
from concilium.experts.pool import ExpertPool


class _Call:
    def __init__(self, gen: Generation) -> None:
        self.gen = gen

    def __await__(self) -> Any:
        async def done() -> Generation:
            return self.gen

        return done().__await__()

    def cancel(self) -> None:
        pass


class _Handle:
    """Enough of a DeploymentHandle for `RayBackend.chat`."""

    def __init__(self) -> None:
        self.chat = self

    def options(self, **_: Any) -> _Handle:
        return self

    def remote(self, *_: Any) -> _Call:
        return _Call(
            Generation(text="ok", prompt_tokens=1, completion_tokens=1, finish_reason="stop")
        )


def test_a_late_model_whose_server_failed_to_start_is_started_again_next_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    starts: list[str] = []

    def deploy(name: str, *_: Any) -> _Handle:
        starts.append(name)
        if len(starts) == 1:
            raise RuntimeError("controller busy")  # what serve.run raises on a failed deploy
        return _Handle()

    monkeypatch.setattr(topology, "deploy_expert_app", deploy)
    backend = gateway.RayBackend({}, ExpertPool(), DeploymentConfig())
    target = Target(expert="late", kind="model", model="late", model_path="/models/late")

    async def twice() -> Generation:
        with pytest.raises(ExpertUnavailable, match=r"did not start.*controller busy"):
            await backend.chat(target, [{"role": "user", "content": "hi"}], GenParams())
        return await backend.chat(target, [{"role": "user", "content": "hi"}], GenParams())

    assert asyncio.run(twice()).text == "ok"
    assert starts == ["late", "late"]  # a failed start is not cached


class _Failing:
    """A call that fails with `error` when awaited, as a Serve response does."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __await__(self) -> Any:
        async def fail() -> Generation:
            raise self.error

        return fail().__await__()

    def cancel(self) -> None:
        pass


class _Raising(_Handle):
    """A handle whose calls fail with `error`."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error

    def remote(self, *_: Any) -> Any:
        return _Failing(self.error)


def _deploys(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    starts: list[tuple[str, str]] = []

    def deploy(name: str, path: str, *_: Any) -> _Handle:
        starts.append((name, path))
        return _Handle()

    monkeypatch.setattr(topology, "deploy_expert_app", deploy)
    return starts


def _chat(backend: gateway.RayBackend, target: Target) -> Generation:
    return asyncio.run(backend.chat(target, [{"role": "user", "content": "hi"}], GenParams()))


def test_a_model_no_longer_registered_is_never_deployed_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    starts = _deploys(monkeypatch)
    registered: dict[str, str] = {"moved": "/models/new"}
    backend = gateway.RayBackend({}, ExpertPool(), DeploymentConfig(), registered=registered.get)
    gone = Target(expert="gone", kind="model", model="gone", model_path="/models/gone")
    with pytest.raises(ExpertUnavailable, match="no longer registered"):
        _chat(backend, gone)  # routed before its DELETE, dispatched after
    moved = Target(expert="moved", kind="model", model="moved", model_path="/models/old")
    with pytest.raises(ExpertUnavailable, match="no longer registered"):
        _chat(backend, moved)  # re-registered with other weights meanwhile
    assert starts == []
    now = Target(expert="moved", kind="model", model="moved", model_path="/models/new")
    assert _chat(backend, now).text == "ok"
    assert starts == [("moved", "/models/new")]


def test_a_base_re_registered_with_other_weights_gets_its_own_application(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    starts = _deploys(monkeypatch)
    stale = _Raising(AssertionError("the main application serves the old weights"))
    backend = gateway.RayBackend(
        {"base": stale}, ExpertPool(), DeploymentConfig(), paths={"base": "/models/v1"}
    )
    target = Target(expert="base", kind="model", model="base", model_path="/models/v2")
    assert _chat(backend, target).text == "ok"
    assert starts == [("base", "/models/v2")]
    assert _chat(backend, target).text == "ok"  # the new handle is kept
    assert starts == [("base", "/models/v2")]


def test_an_unexpected_replica_error_is_an_expert_failure_not_a_500() -> None:
    from ray.exceptions import RayTaskError

    from concilium.errors import ExpertFailed
    from concilium.orchestrator.http import status_of

    crash = RayTaskError("chat", "Traceback ...", RuntimeError("CUDA out of memory"))
    backend = gateway.RayBackend({"m": _Raising(crash)}, ExpertPool(), DeploymentConfig())
    target = Target(expert="m", kind="model", model="m", model_path="/models/m")
    with pytest.raises(ExpertFailed, match="RuntimeError: CUDA out of memory") as info:
        _chat(backend, target)
    assert status_of(info.value) == 502  # and the pipeline falls back to the next candidate
    mapped = RayTaskError("chat", "Traceback ...", ExpertUnavailable("busy"))
    backend = gateway.RayBackend({"m": _Raising(mapped)}, ExpertPool(), DeploymentConfig())
    with pytest.raises(ExpertUnavailable, match="busy"):
        _chat(backend, target)


class _Serve:
    """The part of `ray.serve` the late-application helpers use, over a dict of app statuses."""

    def __init__(self, apps: dict[str, str]) -> None:
        self.apps = dict(apps)
        self.calls: list[tuple[str, str]] = []
        self.status_calls = 0

    def status(self) -> Any:
        from types import SimpleNamespace

        from ray.serve.schema import ApplicationStatus

        self.status_calls += 1
        return SimpleNamespace(
            applications={
                a: SimpleNamespace(status=ApplicationStatus(s)) for a, s in self.apps.items()
            }
        )

    def delete(self, app: str, _blocking: bool = True) -> None:
        self.calls.append(("delete", app))
        del self.apps[app]

    def run(self, _app: Any, name: str, route_prefix: Any = None) -> None:
        self.calls.append(("run", name))
        self.apps[name] = "RUNNING"

    def get_deployment_handle(self, deployment: str, app_name: str) -> tuple[str, str]:
        return deployment, app_name


def test_an_application_that_failed_to_start_is_deleted_and_started_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = topology.app_name_for("late", "/models/late")
    fake = _Serve({app: "DEPLOY_FAILED"})
    monkeypatch.setattr(topology, "serve", fake)
    monkeypatch.setattr(topology, "expert_deployment", lambda *_: object())
    handle = topology.deploy_expert_app("late", "/models/late", DeploymentConfig())
    assert fake.calls == [("delete", app), ("run", app)]
    assert handle == ("expert-late", app)  # type: ignore[comparison-overlap]
    topology.deploy_expert_app("late", "/models/late", DeploymentConfig())
    assert fake.calls == [("delete", app), ("run", app)]  # a running one is reused


def test_applications_are_per_weights_and_deleted_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a1 = topology.app_name_for("late", "/models/v1")
    a2 = topology.app_name_for("late", "/models/v2")
    other = topology.app_name_for("late-2", "/models/v1")
    assert len({a1, a2, other}) == 3
    legacy = a1.rsplit("-", 1)[0]  # the per-name application of earlier releases
    fake = _Serve(
        {a1: "RUNNING", a2: "RUNNING", legacy: "RUNNING", other: "RUNNING", "concilium": "RUNNING"}
    )
    monkeypatch.setattr(topology, "serve", fake)
    assert topology.expert_apps("late") == sorted([a1, a2, legacy])
    assert topology.delete_expert_app("late")
    assert set(fake.apps) == {other, "concilium"}
    assert not topology.delete_expert_app("late")


def test_one_delete_of_a_late_model_asks_serve_for_its_applications_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace

    from concilium.deployments import registry_service as rs

    app = topology.app_name_for("late", "/models/late")
    fake = _Serve({app: "RUNNING", "concilium": "RUNNING"})
    monkeypatch.setattr(topology, "serve", fake)
    monkeypatch.setattr(rs, "DELETE_GRACE_S", 0.0)
    svc = object.__new__(rs.RegistryService.func_or_class)
    svc.registry, svc._app_locks = SimpleNamespace(remove=lambda name: 7), {}
    assert asyncio.run(svc.remove("late")) == 7
    assert fake.status_calls == 1 and fake.calls == [("delete", app)]
    assert set(fake.apps) == {"concilium"}
    assert asyncio.run(svc.remove("late")) == 7  # no application left: asked, nothing deleted
    assert fake.status_calls == 2 and fake.calls == [("delete", app)]


def test_an_unreachable_registry_service_is_a_503_to_retry() -> None:
    from ray.exceptions import RayActorError

    from concilium.deployments.registry_service import RayRegistrar
    from concilium.errors import RegistryUnavailable
    from concilium.orchestrator.http import status_of

    class Dead:
        def __getattr__(self, _: str) -> Any:
            return _Raising(RayActorError())

    with pytest.raises(RegistryUnavailable, match="not reachable") as info:
        asyncio.run(RayRegistrar(Dead()).remove("x"))  # type: ignore[arg-type]
    assert status_of(info.value) == 503 and info.value.retry_after_s == 1.0


def test_an_evicted_adapter_is_retired_once_on_the_replica_loop() -> None:
    import threading

    from concilium.deployments.expert_server import _Resident

    class Server:
        def __init__(self) -> None:
            self.evicted: list[tuple[str, bool]] = []

        def _evicted(self, name: str) -> None:
            self.evicted.append((name, threading.current_thread() is threading.main_thread()))

    async def main() -> Server:
        server = Server()
        resident = _Resident(server, "a")  # type: ignore[arg-type]
        # what Serve's LRU does: __del__ in a worker thread, then an instance attribute
        await asyncio.get_running_loop().run_in_executor(None, resident.__del__)
        resident.__del__ = lambda _: None  # type: ignore[method-assign]
        del resident  # the interpreter's own __del__ call
        await asyncio.sleep(0.01)
        return server

    assert asyncio.run(main()).evicted == [("a", True)]


def test_a_stopping_gateway_writes_its_queued_outcomes() -> None:
    from types import SimpleNamespace

    cls = gateway.Gateway.func_or_class  # Serve's ingress wrapper awaits our __del__ in its own
    half = object.__new__(cls)
    asyncio.run(half.__del__())  # __init__ failed before setting anything: nothing to do
    closed: list[bool] = []
    replica = object.__new__(cls)
    replica.service = SimpleNamespace(
        orchestrator=SimpleNamespace(outcomes=SimpleNamespace(close=lambda: closed.append(True)))
    )
    replica.backend = gateway.RayBackend({}, ExpertPool(), DeploymentConfig())
    asyncio.run(replica.__del__())
    assert closed == [True]


def test_the_registry_service_serialises_a_late_start_with_its_delete(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace

    from concilium.deployments import registry_service as rs
    from concilium.errors import ExpertNotFound

    rows = {"m": "/models/m"}
    events: list[str] = []

    def get(name: str) -> Any:
        if name not in rows:
            raise ExpertNotFound(name)
        return SimpleNamespace(spec=SimpleNamespace(kind="model", path=rows[name]))

    def remove(name: str) -> int:
        events.append("remove")
        del rows[name]
        return 2

    monkeypatch.setattr(rs, "DELETE_GRACE_S", 0.05)
    monkeypatch.setattr(rs, "expert_apps", lambda name: ["app"])
    monkeypatch.setattr(rs, "delete_expert_app", lambda *_: events.append("delete"))
    monkeypatch.setattr(rs, "deploy_expert_app", lambda *a: events.append("deploy"))
    svc = object.__new__(rs.RegistryService.func_or_class)
    svc.registry = SimpleNamespace(get=get, remove=remove)
    svc._deployment, svc._home, svc._app_locks, svc._failed_at = DeploymentConfig(), None, {}, {}

    async def main() -> list[Any]:
        return await asyncio.gather(
            svc.remove("m"), svc.ensure_app("m", "/models/m"), return_exceptions=True
        )

    version, start = asyncio.run(main())
    assert version == 2 and isinstance(start, ExpertUnavailable), start
    assert events == ["remove", "delete"]  # the start waited for the delete, then refused
    rows["m"] = "/models/m"
    asyncio.run(svc.ensure_app("m", "/models/m"))
    assert events[-1] == "deploy"


def test_a_late_start_that_failed_is_retried_after_a_back_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace

    from concilium.deployments import registry_service as rs

    starts: list[str] = []

    def deploy(*_: Any) -> None:
        starts.append("start")
        if len(starts) == 1:
            raise RuntimeError("bad weights")

    clock = [100.0]
    monkeypatch.setattr(rs.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(rs, "deploy_expert_app", deploy)
    spec = SimpleNamespace(spec=SimpleNamespace(kind="model", path="/models/m"))
    svc = object.__new__(rs.RegistryService.func_or_class)
    svc.registry = SimpleNamespace(get=lambda name: spec)
    svc._deployment, svc._home, svc._app_locks, svc._failed_at = DeploymentConfig(), None, {}, {}
    with pytest.raises(RuntimeError, match="bad weights"):
        asyncio.run(svc.ensure_app("m", "/models/m"))
    clock[0] += 3
    with pytest.raises(ExpertUnavailable, match="back-off") as info:
        asyncio.run(svc.ensure_app("m", "/models/m"))  # not started again at once
    assert starts == ["start"] and info.value.retry_after_s == pytest.approx(7.0)
    clock[0] += rs.START_BACKOFF_S
    asyncio.run(svc.ensure_app("m", "/models/m"))
    assert starts == ["start", "start"]


def test_a_request_with_a_fallback_gives_up_on_a_slow_start_and_the_start_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a later candidate behind it a request waits late_start_wait_s for a late model's
    server, then fails over (503 material with Retry-After); the last candidate waits; the
    start is never cancelled or repeated."""
    import threading
    import time

    from concilium.experts.base import FALLBACK_LEFT

    release = threading.Event()
    starts: list[str] = []

    def deploy(name: str, *_: Any) -> _Handle:
        starts.append(name)
        release.wait(10)
        return _Handle()

    monkeypatch.setattr(topology, "deploy_expert_app", deploy)
    backend = gateway.RayBackend({}, ExpertPool(), DeploymentConfig(late_start_wait_s=0.2))
    target = Target(expert="late", kind="model", model="late", model_path="/models/late")
    msgs = [{"role": "user", "content": "hi"}]

    async def go() -> tuple[float, str]:
        FALLBACK_LEFT.set(True)
        t0 = time.perf_counter()
        with pytest.raises(ExpertUnavailable, match="still starting") as err:
            await backend.chat(target, msgs, GenParams())
        waited = time.perf_counter() - t0
        assert err.value.retry_after_s == 0.2
        FALLBACK_LEFT.set(False)  # the last candidate: waits for the same start
        asyncio.get_running_loop().call_later(0.5, release.set)
        gen = await backend.chat(target, msgs, GenParams())
        return waited, gen.text

    waited, text = asyncio.run(go())
    assert 0.15 < waited < 2.0 and text == "ok"
    assert starts == ["late"]  # one start, not cancelled by the request that gave up


def test_a_start_that_fails_after_every_request_gave_up_is_tried_again_next_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No request waits for a start that all its callers left (they failed over): when it fails,
    the next request starts the model again instead of getting that stale failure."""
    import threading

    from concilium.experts.base import FALLBACK_LEFT

    release = threading.Event()
    starts: list[str] = []

    def deploy(name: str, *_: Any) -> _Handle:
        starts.append(name)
        if len(starts) == 1:
            release.wait(10)
            raise RuntimeError("controller busy")
        return _Handle()

    monkeypatch.setattr(topology, "deploy_expert_app", deploy)
    backend = gateway.RayBackend({}, ExpertPool(), DeploymentConfig(late_start_wait_s=0.05))
    target = Target(expert="late", kind="model", model="late", model_path="/models/late")
    msgs = [{"role": "user", "content": "hi"}]

    async def go() -> Generation:
        FALLBACK_LEFT.set(True)
        with pytest.raises(ExpertUnavailable, match="still starting"):
            await backend.chat(target, msgs, GenParams())
        (first,) = backend._deploying.values()
        release.set()
        await asyncio.wait({first})  # it fails with nobody waiting on it
        FALLBACK_LEFT.set(False)
        return await backend.chat(target, msgs, GenParams())

    assert asyncio.run(go()).text == "ok"
    assert starts == ["late", "late"]
