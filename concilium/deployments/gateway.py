"""Gateway: the FastAPI ingress on Ray Serve, dispatching local models to ExpertServer replicas."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from functools import partial
from typing import TYPE_CHECKING, Any

from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from concilium.config import DeploymentConfig, ServiceConfig
from concilium.errors import ConciliumError, ExpertFailed, ExpertNotFound, ExpertUnavailable
from concilium.experts.base import FALLBACK_LEFT, Generation, GenParams, Message, StreamItem, Target
from concilium.experts.guard import guarded_client
from concilium.experts.pool import ExpertPool

if TYPE_CHECKING:
    from concilium.orchestrator.service import Service

log = logging.getLogger(__name__)
Deploy = Callable[[str, str], Awaitable[DeploymentHandle]]  # (model, weights dir) -> its handle


def unwrap_ray_error(e: BaseException) -> BaseException:
    """The ConciliumError a replica raised (Ray wraps it), else `e` itself."""
    cause = getattr(e, "cause", None) if isinstance(e, RayTaskError) else None
    return cause if isinstance(cause, ConciliumError) else e


def _failed(target: Target, e: RayTaskError) -> BaseException:
    """What a replica's error means to the caller: its ConciliumError as raised, anything else
    (a bug, out of memory in the model) an ExpertFailed naming it, so the request falls back to
    the next candidate or ends 502, not 500."""
    cause = unwrap_ray_error(e)
    if isinstance(cause, ConciliumError):
        return cause
    inner = getattr(e, "cause", None) or e
    log.warning("expert %s failed on its replica: %r", target.expert, inner)
    return ExpertFailed(f"expert {target.expert!r} failed: {type(inner).__name__}: {inner}")


def _overloaded(target: Target, e: BackPressureError) -> ExpertUnavailable:
    return ExpertUnavailable(
        f"expert {target.expert!r} is at capacity (its request queue is full); retry later",
        retry_after_s=getattr(e, "retry_after_s", None) or 1.0,
    )


def model_path_of(registry: Any, name: str) -> str | None:
    """The weights directory model expert `name` is registered with, None when it is not."""
    try:
        spec = registry.get(name).spec
    except ExpertNotFound:
        return None
    return str(spec.path) if getattr(spec, "kind", None) == "model" else None


class RayBackend:
    """ExpertBackend over Serve handles; remote and embedding experts run in the gateway.

    A non-streaming request whose replica dies is retried once on another replica (Serve does not
    do this itself); a stream is not (it may have sent pieces already): its caller gets an error
    event, or the next candidate when nothing was sent. A full queue is a 503 with Retry-After.
    A model expert gets its own ExpertServer application on first use when the main application
    has none for it, or has one for other weights (a base re-registered with another directory);
    such an application is started again on the next use after it was deleted (the expert was
    removed, then registered again) or failed to start, and never for an expert that is no longer
    registered with those weights (`registered`: name -> weights directory, None when gone).
    """

    def __init__(
        self,
        handles: dict[str, DeploymentHandle],
        local: ExpertPool,
        deployment: DeploymentConfig,
        retries: int = 1,
        home: str | None = None,
        paths: dict[str, str] | None = None,
        registered: Callable[[str], str | None] | None = None,
        deploy: Deploy | None = None,
    ) -> None:
        self.handles = dict(handles)  # model expert name -> ExpertServer handle
        self.paths = dict(paths or {})  # model expert name -> the weights its handle serves
        self.local, self.deployment, self.retries = local, deployment, retries
        self.home = home  # the registry data dir, for late ExpertServers to watch
        self.registered = registered
        self.deploy = deploy
        self.retried: Counter[str] = Counter()  # per model: requests retried after a replica died
        self._replicas: dict[str, tuple[str, dict[str, float]]] = {}  # id -> (model, counters)
        self._deploying: dict[tuple[str, str], asyncio.Task[DeploymentHandle]] = {}
        self._late: set[str] = set()  # models whose own application this gateway started
        # starting an application blocks a thread for as long as Serve takes: not the loop's
        # default executor, which the query encoder's batches share
        self._deployer = ThreadPoolExecutor(2, thread_name_prefix="concilium-deploy")

    def model(self, path: Any) -> Any:  # the registration-time latency profiler loads here
        return self.local.model(path)

    async def _handle(self, target: Target) -> DeploymentHandle | None:
        path, name = target.model_path, target.model or target.expert
        if target.remote is not None or path is None:
            return None
        handle = self.handles.get(name)
        if handle is None or self.paths.get(name, path) != path:
            handle = await self._late_handle(target, name, path)
        return handle.options(multiplexed_model_id=target.adapter or "")

    async def _deploy_here(self, name: str, path: str) -> DeploymentHandle:
        """Start it from this process, only while it is registered with those weights (a request
        routed before a DELETE must not start it again); the RegistryService checks the same in
        `ensure_app`, under the lock it shares with DELETE."""
        from concilium.deployments.topology import deploy_expert_app

        if self.registered is not None and await asyncio.to_thread(self.registered, name) != path:
            raise ExpertUnavailable(f"model {name!r} is no longer registered with weights {path}")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._deployer, deploy_expert_app, name, path, self.deployment, self.home
        )

    async def _late_handle(self, target: Target, name: str, path: str) -> DeploymentHandle:
        """Start (or find) the application of model `name` with weights `path`: through
        `deploy` when set (the RegistryService, which serialises starts and deletes across
        gateway replicas), else from this process. While the orchestrator has a later candidate
        (FALLBACK_LEFT) a request waits at most `late_start_wait_s` for the start, then fails
        over; the last candidate waits for it (up to the request's deadline)."""
        task = self._deploying.get((name, path))
        if task is None:
            task = asyncio.ensure_future((self.deploy or self._deploy_here)(name, path))
            task.add_done_callback(partial(self._forget_failed, (name, path)))
            self._deploying[(name, path)] = task
        wait = self.deployment.late_start_wait_s if FALLBACK_LEFT.get() else None
        await asyncio.wait({task}, timeout=wait)  # never cancels the start
        if not task.done():  # a later candidate answers this request; the start goes on
            raise ExpertUnavailable(
                f"expert {target.expert!r}: its ExpertServer is still starting (waited "
                f"{wait:g} s, deployment.late_start_wait_s)",
                retry_after_s=wait,
            )
        try:
            handle = task.result()
        except Exception as e:  # forgotten as it failed (`_forget_failed`): the next one retries
            raise ExpertUnavailable(
                f"expert {target.expert!r}: its ExpertServer did not start ({e})"
            ) from e
        self.handles[name], self.paths[name] = handle, path
        self._late.add(name)
        return handle

    def _forget_failed(self, key: tuple[str, str], task: asyncio.Task[DeploymentHandle]) -> None:
        """A start that failed is forgotten as it ends, whether a request still waits for it or
        every one has failed over: the next request starts the model again."""
        failed = task.cancelled() or task.exception() is not None
        if failed and self._deploying.get(key) is task:
            del self._deploying[key]

    def _gone(self, target: Target, e: DeploymentUnavailableError) -> ExpertUnavailable:
        """The application behind a cached handle was deleted: forget the handle, so that the
        next call deploys the (re-registered) expert again."""
        name = target.model or target.expert
        if name in self._late:
            self.handles.pop(name, None)
            self.paths.pop(name, None)
            for key in [k for k in self._deploying if k[0] == name]:
                del self._deploying[key]
            self._late.discard(name)
        return ExpertUnavailable(f"expert {target.expert!r}: its deployment is gone ({e})")

    async def chat(
        self, target: Target, messages: Sequence[Message], params: GenParams
    ) -> Generation:
        for attempt in range(self.retries + 1):
            handle = await self._handle(target)
            if handle is None:
                return await self.local.chat(target, messages, params)
            response = handle.chat.remote(target, list(messages), params)
            try:
                gen: Generation = await response
                self._heard(gen)
                return gen
            except asyncio.CancelledError:  # deadline or client gone: stop the replica's work
                response.cancel()
                raise
            except BackPressureError as e:
                raise _overloaded(target, e) from None
            except DeploymentUnavailableError as e:
                err = self._gone(target, e)
                if attempt == self.retries:
                    raise err from e
            except RayActorError as e:
                if attempt == self.retries:
                    raise ExpertUnavailable(f"expert {target.expert!r}: replica died ({e})") from e
                self.retried[target.model or target.expert] += 1
                log.warning("replica of %s died mid-request; retrying once", target.expert)
            except RayTaskError as e:
                raise _failed(target, e) from None
        raise AssertionError("unreachable")

    async def chat_stream(
        self, target: Target, messages: Sequence[Message], params: GenParams
    ) -> AsyncIterator[StreamItem]:
        handle = await self._handle(target)
        if handle is None:
            async with aclosing(self.local.chat_stream(target, messages, params)) as local:
                async for item in local:
                    yield item
            return
        stream: Any = handle.options(stream=True).chat_stream.remote(target, list(messages), params)
        try:
            async for item in stream:
                if isinstance(item, Generation):
                    self._heard(item)
                yield item
        except BackPressureError as e:
            raise _overloaded(target, e) from None
        except DeploymentUnavailableError as e:
            raise self._gone(target, e) from e
        except RayActorError as e:
            raise ExpertUnavailable(f"expert {target.expert!r}: replica died mid-stream") from e
        except RayTaskError as e:
            raise _failed(target, e) from None
        finally:
            stream.cancel()  # a no-op when finished; cancels the decode when the client left

    async def embed(self, target: Target, texts: Sequence[str]) -> list[list[float]]:
        return await self.local.embed(target, texts)

    def _heard(self, gen: Generation) -> None:
        """Keep the latest counters of the replica that ran `gen` (monotonic per replica)."""
        if gen.replica is not None:
            self._replicas[str(gen.replica["id"])] = (
                str(gen.replica["model"]),
                dict(gen.replica["stats"]),
            )

    def stats(self) -> dict[str, dict[str, float]]:
        """{model: {event: count}}: replica counters summed over every replica heard from (one
        that went away keeps its last values), plus this gateway replica's retries."""
        out: dict[str, Counter[str]] = {}
        for model, counters in self._replicas.values():
            out.setdefault(model, Counter()).update(counters)
        for model, n in self.retried.items():
            out.setdefault(model, Counter())["retries"] += n
        return {m: {k: float(v) for k, v in c.items()} for m, c in out.items()}

    def stop_deploys(self) -> None:
        """Stop this process's deploy threads (queued starts are dropped)."""
        self._deployer.shutdown(wait=False, cancel_futures=True)

    async def aclose(self) -> None:
        self.stop_deploys()
        await self.local.aclose()


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256)
@serve.ingress()
class Gateway:
    """OpenAI-compatible ingress. Reads the shared registry; never owns a model itself."""

    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self,
        config: dict[str, Any],
        experts: dict[str, DeploymentHandle],
        registry: DeploymentHandle | None = None,
        paths: dict[str, str] | None = None,
    ) -> None:
        from concilium.deployments.registry_service import RayRegistrar, registry_feed
        from concilium.orchestrator.service import build_service
        from concilium.registry.mirror import MirrorStore

        cfg = ServiceConfig.model_validate(config)
        local = ExpertPool(
            client=guarded_client(allow_private=cfg.allow_private_urls),
            max_adapters=cfg.max_adapters,
            batch_window_ms=cfg.batch_window_ms,
        )
        self.backend = RayBackend(experts, local, cfg.deployment, home=str(cfg.home), paths=paths)
        # reads: a mirror the RegistryService feeds (no SQLite here), or the store under home
        mirror, self.feed = None, None
        if registry is not None and cfg.deployment.registry_reads == "service":
            mirror = MirrorStore()
            self.feed = registry_feed(registry, mirror)
            await self.feed.first()
        # writes go to the RegistryService, which alone trains gates; this replica only reads
        registrar = RayRegistrar(registry, mirror) if registry is not None else None
        if registrar is not None:
            cfg = cfg.model_copy(update={"train_gates": False})
            self.backend.deploy = registrar.deploy
        self.service = build_service(
            cfg, backend=self.backend, seed=False, registrar=registrar, store=mirror
        )
        self.backend.registered = partial(model_path_of, self.service.registry)
        if self.feed is not None:
            self.feed.start()

    def __del__(self) -> None:
        """Serve calls this when the replica stops (and the interpreter may call it again):
        write the outcomes still queued, so feedback on those requests still finds them."""
        service: Service | None = getattr(self, "service", None)  # None: __init__ failed
        outcomes = None if service is None else service.orchestrator.outcomes
        if outcomes is not None:
            outcomes.close()  # idempotent; waits at most a few seconds
        backend: RayBackend | None = getattr(self, "backend", None)
        if backend is not None:
            backend.stop_deploys()
        feed = getattr(self, "feed", None)
        if feed is not None:
            feed.stop()

    def __serve_build_asgi_app__(self) -> Any:
        from concilium.orchestrator.http import create_app

        replica = serve.get_replica_context().replica_id.unique_id
        return create_app(self.service, instance=replica)
