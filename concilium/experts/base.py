"""The expert runtime contract: what the orchestrator asks of any expert, local or remote."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from concilium.registry.specs import RemoteSpec

Message = dict[str, str]  # {"role": ..., "content": ...}


@dataclass(frozen=True, slots=True)
class GenParams:
    """Sampling parameters of one generation."""

    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    min_tokens: int = 0  # end-of-sequence is suppressed until this many tokens


@dataclass(frozen=True, slots=True)
class Generation:
    """One finished completion."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # stop | length
    mean_logprob: float | None = None


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
