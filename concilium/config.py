"""Service configuration: one pydantic model, loadable from YAML, every field described."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from concilium.errors import ConfigError
from concilium.explain import config_error, first
from concilium.routers.query import RouterConfig

log = logging.getLogger(__name__)


def default_home() -> Path:
    """$CONCILIUM_HOME, else ./.concilium."""
    return Path(os.environ.get("CONCILIUM_HOME", ".concilium"))


def default_routers() -> dict[str, Any]:
    return {
        "retriever": {"kind": "retriever"},
        "category": {"kind": "category"},
        "random": {"kind": "random"},
        "predictive": {"kind": "predictive"},
    }


class OutcomesConfig(BaseModel):
    """The outcome store: routed requests logged for feedback and the predictive router."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(
        default=True, description="Log routed requests to <home>/outcomes.sqlite."
    )
    keep_queries: bool = Field(
        default=True, description="Store query text (embeddings are stored either way)."
    )
    max_rows: int = Field(
        default=200_000, ge=1000, description="Oldest unlabelled rows are dropped beyond this."
    )
    path: Path | None = Field(
        default=None,
        description="The store's SQLite file (default <home>/outcomes.sqlite). On a cluster whose "
        "home is a network filesystem put it on a local disk: SQLite's WAL mode needs every "
        "reader and writer on one host, so each node then keeps the outcomes its gateways "
        "logged (feedback finds a decision on the node that answered it).",
    )


class StrategyConfig(BaseModel):
    """Multi-expert strategies (routing.strategy cascade / ensemble)."""

    model_config = ConfigDict(extra="forbid")
    cascade_threshold: float = Field(
        default=-0.1,
        le=0,
        description="Mean token log-probability a cascade stage must reach to be accepted "
        "(concilium calibrate fits it).",
    )
    cascade_adequacy: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Cascade stages: experts whose gate is at least this share of the best.",
    )
    fusion: Literal["vote", "logits"] = Field(
        default="vote",
        description="Ensemble fusion when the request does not say (routing.fusion): 'vote' "
        "over the answers, or 'logits' for members that are adapters of one local model.",
    )


class ScalingConfig(BaseModel):
    """Ray Serve sizing and autoscaling of one deployment (defaults fit 2 cores)."""

    model_config = ConfigDict(extra="forbid")
    num_cpus: float = Field(default=0.5, gt=0, description="CPUs reserved per replica.")
    min_replicas: int = Field(default=1, ge=0, description="Fewest replicas (0: scale to zero).")
    max_replicas: int = Field(default=2, ge=1, description="Most replicas.")
    initial_replicas: int | None = Field(default=None, ge=0, description="Replicas at start.")
    target_ongoing_requests: float = Field(
        default=8, gt=0, description="Ongoing requests per replica the autoscaler aims for."
    )
    upscale_delay_s: float = Field(
        default=2.0, ge=0, description="Load must last this to scale up."
    )
    downscale_delay_s: float = Field(
        default=30.0, ge=0, description="Idle time before a replica is removed."
    )
    downscale_to_zero_delay_s: float | None = Field(
        default=None, ge=0, description="Idle time before the last replica goes (min_replicas 0)."
    )
    look_back_period_s: float | None = Field(
        default=None, gt=0, description="Window the ongoing-request average is taken over (30 s)."
    )
    max_ongoing_requests: int = Field(default=64, ge=1, description="Concurrency per replica.")
    max_queued_requests: int = Field(
        default=256, ge=-1, description="Queued requests per caller before 503 (-1: unbounded)."
    )

    @model_validator(mode="after")
    def _bounds(self) -> ScalingConfig:
        if self.max_replicas < max(self.min_replicas, 1):
            raise ValueError(f"max_replicas {self.max_replicas} < min_replicas {self.min_replicas}")
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError(
                f"initial_replicas {initial} is outside [min_replicas {self.min_replicas}, "
                f"max_replicas {self.max_replicas}]"
            )
        return self

    def autoscaling(self) -> dict[str, Any]:
        keys: tuple[str, ...] = ("min_replicas", "max_replicas", "initial_replicas")
        keys += ("target_ongoing_requests", "upscale_delay_s", "downscale_delay_s")
        keys += ("downscale_to_zero_delay_s", "look_back_period_s")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


MoEBackendName = Literal["auto", "grouped", "grouped_mm", "decode", "dense", "reference", "stock"]


class MoEConfig(BaseModel):
    """How an ExpertServer runs a sparse-MoE base model (a dense base ignores it)."""

    model_config = ConfigDict(extra="forbid")
    backend: MoEBackendName = Field(
        default="auto",
        description="Kernel for the experts' FFNs (concilium.experts.moe); 'stock' keeps the "
        "transformers modules.",
    )
    resident_experts: int | None = Field(
        default=None,
        ge=1,
        description="Experts kept in memory per MoE layer; the rest stay in a memory-mapped "
        "safetensors file, loaded on demand (ExpertFlow-style tiering). None: all resident.",
    )
    policy: Literal["lru", "lfu"] = Field(default="lru", description="Tier cache eviction.")
    prefetch: bool = Field(
        default=True, description="Tiering: load the next layer's predicted experts ahead."
    )
    background: bool = Field(
        default=False,
        description="Tiering: prefetch on a worker thread, overlapping compute. Off by default: "
        "with the tier file in the page cache and 2 cores, copying on a second thread measured "
        "slower than in line (benchmarks/moe_generation.py); it pays when loads wait on disk.",
    )
    pin_super_experts: bool = Field(
        default=True, description="Tiering: keep super experts (massive activations) resident."
    )

    def options(self) -> Any:
        """The runtime's `MoEOptions` (concilium.experts.moe.replica)."""
        from concilium.experts.moe.replica import MoEOptions

        backend = None if self.backend == "stock" else self.backend
        fields = self.model_dump(exclude={"backend"})
        return MoEOptions(backend=backend, **fields)


class ExpertScalingConfig(ScalingConfig):
    """An ExpertServer deployment: scaling plus its adapter cache, batching and MoE kernels.

    Serve adds a replica once the replicas average `target_ongoing_requests`; a target below
    `max_batch` splits the load before one replica's batch can fill, so the default target is
    `max_batch` (`load_config` warns about a lower one: allowed, it trades batching for latency).
    """

    target_ongoing_requests: float = Field(
        default=16,
        gt=0,
        description="Ongoing requests per replica the autoscaler aims for (at least max_batch, "
        "so a replica's batch can fill before Serve scales out).",
    )
    max_adapters: int = Field(default=8, ge=1, description="Adapters resident per replica (LRU).")
    max_batch: int = Field(default=16, ge=1, description="Rows decoded together in one batch.")
    batch_wait_ms: float = Field(default=2.0, ge=0, description="Wait to fill a batch, in ms.")
    moe: MoEConfig = Field(
        default_factory=MoEConfig, description="Sparse-MoE kernels and expert weight tiering."
    )

    def underfilled_batch(self) -> str | None:
        """Why a replica's batch of `max_batch` rows cannot fill under this scaling, or None."""
        if self.target_ongoing_requests < self.max_batch:
            return (
                f"target_ongoing_requests {self.target_ongoing_requests:g} < max_batch "
                f"{self.max_batch}: Serve scales out before one replica's batch can fill"
            )
        if self.max_ongoing_requests < self.max_batch:
            return (
                f"max_ongoing_requests {self.max_ongoing_requests} < max_batch "
                f"{self.max_batch}: a replica never holds a full batch"
            )
        return None


def _gateway_default() -> ScalingConfig:
    return ScalingConfig(
        num_cpus=0.25, max_replicas=2, target_ongoing_requests=32, max_ongoing_requests=256
    )


class DeploymentConfig(BaseModel):
    """Ray Serve topology: the gateway and one ExpertServer per local base model."""

    model_config = ConfigDict(extra="forbid")
    gateway: ScalingConfig = Field(default_factory=_gateway_default, description="The ingress.")
    expert_defaults: ExpertScalingConfig = Field(
        default_factory=ExpertScalingConfig, description="Every ExpertServer unless overridden."
    )
    experts: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per model-expert name: fields overriding expert_defaults.",
    )
    access_log: bool = Field(
        default=False,
        description="Ray Serve's access log (a line per request in the proxy and every replica, "
        "written to a file). Serve 2.60 ignores RAY_SERVE_ENABLE_ACCESS_LOG; this sets each "
        "deployment's and the proxy's logging_config.enable_access_log.",
    )
    registry_reads: Literal["service", "store"] = Field(
        default="service",
        description="How gateway and ExpertServer replicas read the registry: 'service' - from "
        "the RegistryService, the one replica that opens registry.sqlite (snapshots by long "
        "poll; replicas may then run on other nodes, with only the artifact store on a shared "
        "path); 'store' - every replica opens the SQLite file itself (one machine only: "
        "SQLite's WAL mode does not work over a network filesystem).",
    )
    late_start_wait_s: float = Field(
        default=5.0,
        gt=0,
        description="How long a request routed to a late-registered model waits for its new "
        "ExpertServer application to start when a fallback candidate exists; past it the next "
        "candidate answers while the start goes on. The last candidate waits (up to the "
        "request's deadline).",
    )

    def logging(self) -> dict[str, Any]:
        """Serve `logging_config` for the proxy and every deployment."""
        return {"enable_access_log": self.access_log}

    @model_validator(mode="after")
    def _check_overrides(self) -> DeploymentConfig:
        for name in self.experts:
            self.expert(name)
        return self

    def expert(self, name: str) -> ExpertScalingConfig:
        """The scaling of expert `name`: the defaults with its overrides applied."""
        data = self.expert_defaults.model_dump() | self.experts.get(name, {})
        moe = self.experts.get(name, {}).get("moe")
        if isinstance(moe, dict):  # merged key by key onto the defaults' moe
            data["moe"] = self.expert_defaults.moe.model_dump() | moe
        try:
            return ExpertScalingConfig.model_validate(data)
        except ValidationError as e:
            problem = first(e, ExpertScalingConfig)
            where = ".".join(p for p in (f"deployment.experts.{name}", problem.field) if p)
            raise ValueError(f"{where}: {problem.message}") from None


class ServiceConfig(BaseModel):
    """Everything `concilium serve` and the in-process service need."""

    model_config = ConfigDict(extra="forbid")
    home: Path = Field(
        default_factory=default_home, description="Data dir: registry.sqlite and artifacts/."
    )
    host: str = Field(default="127.0.0.1", description="Gateway bind address.")
    port: int = Field(default=8000, ge=1, le=65535, description="Gateway port.")
    admin_api_key: str | None = Field(
        default=None,
        description="Key required for POST/DELETE /v1/experts (env CONCILIUM_ADMIN_KEY wins).",
    )
    api_keys: list[str] = Field(
        default_factory=list,
        description="When set, inference endpoints need one of these keys (or the admin key).",
    )
    default_router: str = Field(default="retriever", description="Router used for model 'auto'.")
    routers: dict[str, RouterConfig] = Field(
        default_factory=default_routers,
        validate_default=True,
        description="Named query routers (model 'router-<name>').",
    )
    pack: Path | None = Field(
        default=None, description="Demo pack dir to seed an empty registry from (default experts)."
    )
    embed_pack: Path | None = Field(
        default=None,
        description="Embedding pack dir (domain LoRA experts on MiniLM) registered on first start.",
    )
    seed_embedder: bool = Field(
        default=True, description="Register the packaged all-MiniLM-L6-v2 as embed expert 'minilm'."
    )
    default_max_tokens: int = Field(
        default=64, ge=1, le=8192, description="max_tokens when the request gives none."
    )
    request_timeout_s: float = Field(
        default=120.0, gt=0, description="Deadline of a request without routing.deadline_ms."
    )
    max_fallbacks: int = Field(default=2, ge=0, description="Fallback experts tried on failure.")
    max_adapters: int = Field(default=64, ge=1, description="Adapters resident per base model.")
    batch_window_ms: float = Field(default=2.0, ge=0, description="Mixed-batch collection window.")
    max_request_mb: float = Field(
        default=32, gt=0, description="Largest HTTP request body accepted (MiB); 413 beyond."
    )
    max_rank: int = Field(default=64, ge=1, description="Largest LoRA rank accepted.")
    max_adapter_mb: float = Field(default=256, gt=0, description="Largest adapter accepted (MiB).")
    model_root: Path | None = Field(
        default=None, description="When set, `model` experts must live under this directory."
    )
    allow_private_urls: bool = Field(
        default=True,
        description="Whether remote experts may live at private or loopback addresses (checked "
        "at registration and at every connection; link-local and metadata addresses never).",
    )
    train_gates: bool = Field(
        default=True,
        description="Train a lora's PHATGOOSE gate in the background when it is registered "
        "with train_examples (needed for routing.token_routing.router 'phatgoose').",
    )
    deployment: DeploymentConfig = Field(default_factory=DeploymentConfig)
    outcomes: OutcomesConfig = Field(default_factory=OutcomesConfig)
    strategies: StrategyConfig = Field(default_factory=StrategyConfig)

    def admin_key(self) -> str | None:
        """The admin key (env wins); an empty one is no key, never a key everyone has."""
        env = (os.environ.get("CONCILIUM_ADMIN_KEY") or "").strip()
        return env or (self.admin_api_key or "").strip() or None  # a blank env hides nothing

    def user_keys(self) -> list[str]:
        """Keys accepted for inference (env CONCILIUM_API_KEYS, comma-separated, wins)."""
        env = [k.strip() for k in (os.environ.get("CONCILIUM_API_KEYS") or "").split(",")]
        keys = [k for k in env if k] or [k.strip() for k in self.api_keys]  # blank env: config's
        return [k for k in keys if k]


def load_config(path: Path | None = None, **overrides: Any) -> ServiceConfig:
    """Read a YAML file (optional) and apply keyword overrides; ConfigError names the bad field."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping, got {type(loaded).__name__}")
        data = _our_section(dict(loaded or {}))
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = ServiceConfig.model_validate(data)
    except ValidationError as e:
        raise config_error(e, ServiceConfig, "config") from None
    loopback = cfg.host in ("127.0.0.1", "localhost", "::1") or cfg.host.startswith("127.")
    if not loopback and cfg.admin_key() is None:
        raise ConfigError(
            f"host {cfg.host!r} is not loopback: set admin_api_key (or CONCILIUM_ADMIN_KEY) so "
            "expert registration is not open to the network",
            field="admin_api_key",
        )
    _warn_underfilled_batches(cfg.deployment)
    if cfg.default_router not in cfg.routers:
        raise ConfigError(
            f"default_router {cfg.default_router!r} is not among the configured "
            f"routers {sorted(cfg.routers)}",
            field="default_router",
        )
    return cfg


def _warn_underfilled_batches(dep: DeploymentConfig) -> None:
    """Log each expert scaling under which a replica's batch cannot fill (an override only
    when its reason differs from the defaults')."""
    default = dep.expert_defaults.underfilled_batch()
    if default is not None:
        log.warning("deployment.expert_defaults: %s", default)
    for name in dep.experts:
        why = dep.expert(name).underfilled_batch()
        if why is not None and why != default:
            log.warning("deployment.experts.%s: %s", name, why)


def _our_section(data: dict[str, Any]) -> dict[str, Any]:
    """Our settings from a plain config, or from a Serve YAML's first application args."""
    http: dict[str, Any] = {}
    if "applications" in data:
        opts = _mapping(data.get("http_options") or {}, "http_options")
        http = {k: v for k, v in opts.items() if k in ("host", "port")}
        apps = data["applications"] or [{}]
        if not isinstance(apps, list):
            raise ConfigError("the Serve config's 'applications' must be a list")
        data = _mapping(_mapping(apps[0], "applications[0]").get("args") or {}, "args")
    section = data.get("concilium", data)
    if not isinstance(section, dict):
        raise ConfigError("the 'concilium' config section must be a mapping")
    return http | dict(section)


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"the config's {what!r} must be a mapping, got {type(value).__name__}")
    return value
