"""The token-router interface: per token, which K adapters and with what weights.

A token router scores the N adapters of one base for every token of one adapted layer and returns
``(weights [T, K], idxs [T, K])``; it never runs the layer (the MoE-LoRA layer consumes the pair).
Each adapter brings its own per-layer vectors (a PHATGOOSE gate, an Arrow prototype), stored apart
from every other adapter's, so adding one changes no other adapter's tensors.

The global prior (Glider-style) is the query-level decision carried down to the tokens: a
``TokenPrior`` restricts the candidates to the top-M adapters of the query router and may add a
logit bias, per adapter ``[N]`` or per token ``[T, N]`` (a batch mixing requests).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from concilium.errors import InvalidInput

if TYPE_CHECKING:
    from torch import Tensor


class TokenRouterConfig(BaseModel):
    """Fields every token router shares; each router's config adds its ``kind``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    top_k: int = Field(default=2, ge=1, description="Adapters mixed per token (K).")
    temperature: float = Field(
        default=1.0, gt=0, description="Softmax temperature over the top-k scores."
    )


@dataclass(frozen=True, slots=True)
class TokenPrior:
    """Candidates ``allowed [N] | [T, N]`` (bool) and an optional logit ``bias``, same shape."""

    allowed: Tensor
    bias: Tensor | None = None

    def apply(self, scores: Tensor) -> Tensor:
        """``scores [T, N]`` with non-candidates at -inf and the bias added."""
        out = scores if self.bias is None else scores + self.bias
        return out.masked_fill(~self.allowed, float("-inf"))

    def max_candidates(self) -> int:
        """The most candidates any token has (0 for no tokens)."""
        return int(self.allowed.sum(-1).max()) if self.allowed.numel() else 0


def prior_from_scores(
    adapters: Sequence[str], scores: Mapping[str, float], top_m: int, weight: float = 0.0
) -> TokenPrior:
    """The query router's top-M adapters among ``adapters``; bias ``weight · log p`` (p: softmax
    of their query-level scores), so ``weight = 0`` only restricts."""
    import torch

    s = torch.tensor([scores.get(n, float("-inf")) for n in adapters], dtype=torch.float32)
    m = min(top_m, int(torch.isfinite(s).sum()))
    if m < 1:
        raise InvalidInput(
            f"no adapter of {list(adapters)} has a query-level score", field="routing"
        )
    top = s.topk(m).indices
    allowed = torch.zeros(len(adapters), dtype=torch.bool).index_fill(0, top, True)
    logp = torch.log_softmax(s.masked_fill(~allowed, float("-inf")), -1)
    return TokenPrior(allowed, (weight * logp).masked_fill(~allowed, 0.0) if weight else None)


def stack_priors(priors: Sequence[TokenPrior | None], lengths: Sequence[int], n: int) -> TokenPrior:
    """One ``[T, N]`` prior for a batch of rows with ``lengths`` tokens each (None = no prior)."""
    import torch

    full, zero = TokenPrior(torch.ones(n, dtype=torch.bool)), torch.zeros(n)
    rows = list(zip([p or full for p in priors], lengths, strict=True))
    allowed = torch.cat([r.allowed.expand(t, n) for r, t in rows])  # [T, N]
    if all(r.bias is None for r, _ in rows):
        return TokenPrior(allowed)
    return TokenPrior(
        allowed, torch.cat([(zero if r.bias is None else r.bias).expand(t, n) for r, t in rows])
    )


def top_k_softmax(
    scores: Tensor, k: int, temperature: float, prior: TokenPrior | None = None
) -> tuple[Tensor, Tensor]:
    """``scores [T, N]`` -> softmax over each token's top-k ``(weights [T, K], idxs [T, K])``.

    K is cut to the most candidates any token has, never to the fewest, so a token's routing does
    not depend on the others in its batch; a slot beyond a token's candidates (score -inf) gets
    weight 0, and so does every slot of a token with no candidate at all (not NaN).
    """
    import torch

    if prior is not None:
        scores = prior.apply(scores)
        k = min(k, prior.max_candidates())
    vals, idxs = scores.topk(min(k, scores.shape[-1]), dim=-1)
    weights = torch.softmax(vals / temperature, dim=-1)
    return weights.masked_fill(vals == float("-inf"), 0.0), idxs


class TokenRouter(ABC):
    """Routes the tokens of one adapted layer among the registered adapters (in insertion order)."""

    kind: ClassVar[str]

    def __init__(self, config: Any = None) -> None:
        self.config = config
        self.adapters: list[str] = []
        self._vectors: dict[str, dict[str, Tensor]] = {}  # adapter -> layer -> [D]
        self._stacks: dict[str, tuple[Tensor, Tensor]] = {}  # layer -> ([N, D], present [N])

    def add_adapter(self, name: str, vectors: Mapping[str, Tensor] | None = None) -> None:
        """Register (or replace) one adapter with its per-layer vectors; others stay untouched."""
        if name not in self._vectors:
            self.adapters.append(name)
        self._vectors[name] = {layer: v.detach().float() for layer, v in (vectors or {}).items()}
        self._stacks.clear()

    def remove_adapter(self, name: str) -> None:
        if self._vectors.pop(name, None) is not None:
            self.adapters.remove(name)
            self._stacks.clear()

    def vectors(self, name: str) -> dict[str, Tensor]:
        """The per-layer vectors of one adapter (copies: callers cannot mutate the router)."""
        return {layer: v.clone() for layer, v in self._vectors[name].items()}

    def route(
        self, x: Tensor, layer: str, prior: TokenPrior | None = None
    ) -> tuple[Tensor, Tensor]:
        """``x [T, D]`` at ``layer`` -> ``(weights [T, K], idxs [T, K])`` into ``self.adapters``."""
        if not self.adapters:
            raise InvalidInput("the token router has no adapters", field="token_routing")
        return self.select(self.scores(x, layer), prior)

    def select(self, scores: Tensor, prior: TokenPrior | None) -> tuple[Tensor, Tensor]:
        """``scores [T, N]`` -> softmax over each token's top-k candidates."""
        return top_k_softmax(scores, self.config.top_k, self.config.temperature, prior)

    @abstractmethod
    def scores(self, x: Tensor, layer: str) -> Tensor:
        """``x [T, D]`` -> ``[T, N]`` routing logits; -inf for an adapter with no vector here."""

    def _stack(self, layer: str, d: int) -> tuple[Tensor, Tensor]:
        """``([N, D] vectors, [N] present)`` at ``layer``; zeros where an adapter has none."""
        import torch

        if layer not in self._stacks:
            vecs = [self._vectors[n].get(layer) for n in self.adapters]
            present = torch.tensor([v is not None for v in vecs])
            mat = torch.stack([v if v is not None else torch.zeros(d) for v in vecs])
            self._stacks[layer] = (mat, present)
        return self._stacks[layer]


def masked(scores: Tensor, present: Tensor) -> Tensor:
    """``scores [T, N]`` with adapters lacking a vector at this layer set to -inf."""
    return scores.masked_fill(~present, float("-inf"))


def inv_sqrt(d: int) -> float:
    return 1.0 / math.sqrt(d)
