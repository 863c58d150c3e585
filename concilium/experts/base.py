"""The expert runtime contract: what the orchestrator asks of any expert, local or remote."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

from concilium.registry.specs import RemoteSpec

Message = dict[str, str]  # {"role": ..., "content": ...}


@dataclass(frozen=True, slots=True)
class TokenRoutingParams:
    """A per-token mixture of one base's adapters (the expert replica routes every token).

    ``adapters`` are the candidates, already the top-M of the query-level decision: (registered
    name, stored adapter directory). ``prior`` holds the query router's logits for them, aligned
    with ``adapters`` (e.g. retriever score / its temperature); the runtime adds
    ``log_softmax(prior)`` to every token's router logits (Glider's global prior). ``vectors``:
    per candidate, the path of its registry artifact for ``router`` (PHATGOOSE gate or Arrow
    prototypes, ``<sha256>.safetensors``) or None: Arrow then computes the prototypes from the
    adapter itself, PHATGOOSE refuses the request (no gate yet).
    """

    router: str  # phatgoose | arrow | uniform
    top_k: int
    adapters: tuple[tuple[str, str], ...]  # (adapter name, adapter dir) candidates
    prior: tuple[float, ...] | None = None  # query-level logits aligned with adapters
    vectors: tuple[str | None, ...] | None = None  # router artifact per adapter, aligned


@dataclass(frozen=True, slots=True)
class LogitFusionParams:
    """An ensemble of one model's adapters fused at the logit level inside one replica (MoE²).

    Every member decodes the same prompt as its own row of one mixed-adapter batch; at each step
    the next token is chosen from the gate-weighted mixture of the members' distributions,
    p(y) = Σₖ wₖ·pₖ(y), and fed to every member. ``members`` are (adapter name, adapter dir), or
    None for the model itself without an adapter; ``weights`` are aligned with them (normalised
    by the runtime).
    """

    members: tuple[tuple[str, str] | None, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.members) != len(self.weights) or not self.members:
            raise ValueError("logit fusion needs one weight per member and at least one member")
        if any(not (w >= 0) for w in self.weights) or not sum(self.weights) > 0:
            raise ValueError(f"logit fusion weights must be >= 0 and not all 0: {self.weights}")

    def adapters(self) -> list[tuple[str, str]]:
        """(name, dir) of the members that are adapters."""
        return [m for m in self.members if m is not None]


@dataclass(frozen=True, slots=True)
class GenParams:
    """Sampling parameters of one generation (and its token-level mixture, if any)."""

    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    min_tokens: int = 0  # end-of-sequence is suppressed until this many tokens
    token_routing: TokenRoutingParams | None = None  # set: a per-token mixture of adapters
    fusion: LogitFusionParams | None = None  # set: a logit-level ensemble of adapters


@dataclass(frozen=True, slots=True)
class Generation:
    """One finished completion."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # stop | length
    mean_logprob: float | None = None
    # mixtures only: {"router", "top_k", "adapter_shares": {name: share}, "mean_entropy", "tokens"}
    routing_summary: dict[str, Any] | None = None
    # Serve replicas only: {"id", "model", "stats": {counter: value}} of the replica that ran it,
    # so the gateway's /metrics can sum adapter loads/evictions over every replica it has heard of
    replica: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Delta:
    """A piece of streamed completion text. A stream is Deltas, then one final Generation."""

    text: str


StreamItem = Delta | Generation


@dataclass(frozen=True, slots=True)
class Target:
    """Where a chosen expert runs: a local model (plus adapter) or a remote endpoint."""

    expert: str
    kind: str  # model | lora | remote
    model: str | None = None  # the model expert that runs it (itself, or a lora's base)
    model_path: str | None = None
    adapter: str | None = None  # lora expert name
    adapter_path: str | None = None
    remote: RemoteSpec | None = None
    extra: dict[str, str] = field(default_factory=dict)


# True while the orchestrator tries a target that is not its last candidate: a backend may then
# give up early on a target that cannot answer soon (a model whose server is still starting)
# with ExpertUnavailable, and the next candidate answers; on the last one it waits.
FALLBACK_LEFT: ContextVar[bool] = ContextVar("concilium_fallback_left", default=False)


class ExpertBackend(Protocol):
    """Executes generations for targets; in-process (ExpertPool) or on Ray Serve replicas."""

    async def chat(
        self, target: Target, messages: Sequence[Message], params: GenParams
    ) -> Generation: ...

    def chat_stream(
        self, target: Target, messages: Sequence[Message], params: GenParams
    ) -> AsyncIterator[StreamItem]: ...

    async def embed(self, target: Target, texts: Sequence[str]) -> list[list[float]]: ...

    async def aclose(self) -> None: ...


def backend_stats(backend: object) -> dict[str, dict[str, float]]:
    """A backend's serving counters, {model: {event: count}} (empty when it keeps none)."""
    stats = getattr(backend, "stats", None)
    return dict(stats()) if callable(stats) else {}
