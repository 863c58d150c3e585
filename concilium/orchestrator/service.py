"""Composition root: config → encoder, registry, expert backend, routers, orchestrator.

Everything is built here and injected downward; nothing below holds module-level state.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from concilium.config import ServiceConfig
from concilium.errors import ConfigError, Conflict
from concilium.experts.base import ExpertBackend
from concilium.orchestrator.pipeline import Orchestrator
from concilium.orchestrator.registrar import LocalRegistrar, Registrar
from concilium.outcomes.store import OutcomeStore
from concilium.registry.index import TextEncoder
from concilium.registry.mirror import MirrorStore
from concilium.registry.registry import GateTrainer, Profiler, Registry, RegistryLimits
from concilium.registry.store import AnySpec, ExpertRecord
from concilium.routers.query import build_router

log = logging.getLogger(__name__)

EMBEDDER_EXPERT = "minilm"


@dataclass
class Service:
    config: ServiceConfig
    registry: Registry  # reads (and, with the default registrar, writes) the shared store
    backend: ExpertBackend
    orchestrator: Orchestrator
    registrar: Registrar  # who writes the registry for the HTTP API


def limits_of(config: ServiceConfig) -> RegistryLimits:
    return RegistryLimits(
        max_rank=config.max_rank,
        max_adapter_bytes=int(config.max_adapter_mb * 1024**2),
        model_root=config.model_root,
        allow_private_urls=config.allow_private_urls,
    )


def open_registry(
    config: ServiceConfig,
    encoder: TextEncoder | None = None,
    profiler: Profiler | None = None,
    store: MirrorStore | None = None,
) -> Registry:
    """The registry alone (CLI `experts` commands): no expert backend is started. `store`: read
    a mirror fed by the store's owner instead of the SQLite file under `config.home`."""
    if encoder is None:
        from concilium.experts.embedder import SentenceEncoder

        encoder = SentenceEncoder()
    return Registry(
        config.home,
        encoder,
        profiler=profiler,
        limits=limits_of(config),
        adapter_routing=arrow_artifacts,
        gate_trainer=phatgoose_gates() if config.train_gates else None,
        store=store,
    )


def arrow_artifacts(adapter_dir: Path) -> dict[str, Any]:
    """Arrow's token-routing prototypes of a stored adapter: computed, never trained."""
    from concilium.experts.moe.lora_gates import arrow_prototypes

    return {m: p.numpy() for m, p in arrow_prototypes(adapter_dir).items()}


def phatgoose_gates(steps: int = 100, time_budget_s: float = 30.0, threads: int = 1) -> GateTrainer:
    """PHATGOOSE gates at registration: trained on a private copy of the base (loaded on first
    use), adapter frozen, its own examples only, ``threads`` intra-op threads on the job thread."""
    trainers: list[Any] = []

    def train(
        base_dir: Path,
        adapter_dir: Path,
        examples: list[tuple[str, str]],
        stop: Callable[[], bool] | None = None,
    ) -> dict[str, Any]:
        from concilium.experts.moe.lora_gates import PhatgooseTrainer

        if not trainers:
            trainer = PhatgooseTrainer(steps=steps, time_budget_s=time_budget_s, threads=threads)
            trainers.append(trainer)
        return dict(trainers[0](base_dir, adapter_dir, examples, stop))

    return train


def pool_profiler(backend: Any) -> Profiler:
    """Measure a local model's latency once, at registration, by loading it in the pool."""

    def profile(spec: AnySpec, runtime_dir: Path | None) -> dict[str, float]:
        if runtime_dir is None:
            return {}
        return dict(backend.model(runtime_dir).measure_latency())

    return profile


def build_service(
    config: ServiceConfig,
    *,
    encoder: TextEncoder | None = None,
    backend: ExpertBackend | None = None,
    seed: bool = True,
    registrar: Registrar | None = None,
    store: MirrorStore | None = None,
) -> Service:
    """The in-process service. `registrar` routes registry writes elsewhere (the Serve
    RegistryService); by default this process writes the store itself. `store`: read the
    registry from a mirror (see `open_registry`)."""
    if backend is None:
        from concilium.experts.guard import guarded_client
        from concilium.experts.pool import ExpertPool

        backend = ExpertPool(
            client=guarded_client(allow_private=config.allow_private_urls),
            max_adapters=config.max_adapters,
            batch_window_ms=config.batch_window_ms,
        )
    profiler = pool_profiler(backend) if hasattr(backend, "model") else None
    registry = open_registry(config, encoder, profiler, store)
    routers = {name: build_router(cfg) for name, cfg in config.routers.items()}
    outcomes = open_outcomes(config)
    for router in routers.values():
        attach, warm = getattr(router, "attach", None), getattr(router, "warm", None)
        if attach is not None:
            attach(outcomes)
        if warm is not None and outcomes is not None:  # learn off the request path
            warm(registry.encoder.dim)
    orch = Orchestrator(
        registry,
        backend,
        registry.encoder,
        routers,
        config.default_router,
        default_max_tokens=config.default_max_tokens,
        max_fallbacks=config.max_fallbacks,
        request_timeout_s=config.request_timeout_s,
        outcomes=outcomes,
        cascade_threshold=config.strategies.cascade_threshold,
        cascade_adequacy=config.strategies.cascade_adequacy,
        fusion=config.strategies.fusion,
    )
    if seed:
        seed_registry(registry, config)
    return Service(
        config=config,
        registry=registry,
        backend=backend,
        orchestrator=orch,
        registrar=registrar or LocalRegistrar(registry),
    )


def open_outcomes(config: ServiceConfig) -> OutcomeStore | None:
    """The outcome store at `outcomes.path` (default <home>/outcomes.sqlite), or None when
    logging is disabled."""
    c = config.outcomes
    if not c.enabled:
        return None
    path = c.path if c.path is not None else Path(config.home) / "outcomes.sqlite"
    return OutcomeStore(path, keep_queries=c.keep_queries, max_rows=c.max_rows)


def seed_registry(registry: Registry, config: ServiceConfig) -> list[ExpertRecord]:
    """Fill a new registry: the demo pack's default experts, the embedding pack, the embedder.

    The embedding pack is installed while its base (the packaged MiniLM, expert ``minilm``) is not
    registered yet, i.e. on first start: an expert the operator removed later stays removed.
    """
    added: list[ExpertRecord] = []
    if config.pack is not None and not registry.list():
        added += install_pack(registry, config.pack, include_held_out=False)
    if config.embed_pack is not None and EMBEDDER_EXPERT not in {r.name for r in registry.list()}:
        from concilium.embedpack.install import install_embed_pack

        added += install_embed_pack(registry, config.embed_pack)
    if config.seed_embedder and EMBEDDER_EXPERT not in {r.name for r in registry.list()}:
        from concilium.experts.embedder import default_model_dir

        rec = _add_once(
            registry,
            {
                "kind": "model",
                "name": EMBEDDER_EXPERT,
                "task": "embed",
                "path": str(default_model_dir()),
                "description": "General English sentence embeddings (all-MiniLM-L6-v2).",
                "params_total": 22_700_000,
                "params_active": 22_700_000,
                "tags": ["embedding"],
            },
        )
        added += [rec] if rec is not None else []
    return added


def load_manifest(pack_dir: Path) -> dict[str, Any]:
    path = Path(pack_dir) / "manifest.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"demo pack manifest {path} unreadable: {e} (build it with `concilium pack build`)"
        ) from None
    if not isinstance(data, dict) or "base" not in data or "experts" not in data:
        raise ConfigError(f"demo pack manifest {path} lacks 'base'/'experts'")
    return data


def pack_expert(pack_dir: Path, name: str) -> dict[str, Any]:
    """One expert spec of the pack (held-out ones included), paths made absolute."""
    m = load_manifest(pack_dir)
    for spec in [m["base"], *m["experts"]]:
        if spec["name"] == name:
            return absolute_spec(spec, Path(pack_dir))
    raise ConfigError(f"the demo pack has no expert {name!r}")


def install_pack(
    registry: Registry, pack_dir: Path, *, include_held_out: bool
) -> list[ExpertRecord]:
    """Register the pack's base model and its (default) adapters; existing names are skipped."""
    m = load_manifest(pack_dir)
    specs = [m["base"]] + [e for e in m["experts"] if include_held_out or e.get("default", True)]
    out = [_add_once(registry, absolute_spec(s, Path(pack_dir))) for s in specs]
    return [r for r in out if r is not None]


def absolute_spec(spec: dict[str, Any], pack_dir: Path) -> dict[str, Any]:
    """A pack manifest spec ready to register: `path` made absolute, pack-only keys dropped."""
    s = {k: v for k, v in spec.items() if k != "default"}
    if "path" in s:
        s["path"] = str((pack_dir / s["path"]).absolute())
    return s


def _add_once(registry: Registry, spec: dict[str, Any]) -> ExpertRecord | None:
    try:
        return registry.register(spec)
    except Conflict:
        return None
