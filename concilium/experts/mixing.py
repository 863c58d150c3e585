"""One batch row decoded as a per-token mixture of adapters: its token router, prior and statistics.

A :class:`MixtureRow` is what a request with ``GenParams.token_routing`` becomes inside the expert
runtime. At every adapted layer the :class:`~concilium.experts.adapters.AdapterBank` hands it the
row's activations; it asks the token router for ``(gates [L, K], idxs [L, K])`` over its candidate
adapters (restricted and biased by the query-level prior), maps the indices into the bank's
adapter stack and accumulates the routing summary (adapter shares, mean entropy) over the row's
real tokens: prompt and generated, never padding.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from concilium.errors import ConfigError, InvalidInput
from concilium.experts.base import TokenRoutingParams
from concilium.routers.token import (
    TokenPrior,
    TokenRouter,
    build_token_router,
    prior_from_scores,
    stack_priors,
)

if TYPE_CHECKING:
    from torch import Tensor

    from concilium.experts.adapters import AdapterBank

MIXTURE_ROUTERS = ("arrow", "phatgoose", "uniform")  # served kinds (oracle is evaluation only)
FIELD = "routing.token_routing"


class MixtureRow:
    """A request's token router over its candidates, bound to a bank's stack order."""

    def __init__(self, router: TokenRouter, prior: TokenPrior | None = None) -> None:
        import torch

        self.router, self.prior = router, prior
        self.index = torch.arange(len(router.adapters))  # [M] candidate -> bank stack position
        self.mass = torch.zeros(len(router.adapters), dtype=torch.float64)  # [M]
        self.entropy, self.decisions, self.k = 0.0, 0, 0
        self.layers: set[str] = set()

    def bind(self, positions: Mapping[str, int]) -> None:
        """Map the candidates to their positions in the bank's current stack."""
        import torch

        self.index = torch.tensor([positions[n] for n in self.router.adapters])

    def route(self, x: Tensor, layer: str, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x [L, D]`` -> ``(gates [L, K], idxs [L, K])`` into the bank's stack; records stats."""
        gates, idxs = route_rows([self], x[None], layer, None if valid is None else valid[None])
        return gates[0], idxs[0]

    def record(self, gates: Tensor, idxs: Tensor, valid: Tensor | None, layer: str) -> None:
        """Add one layer's decisions ``[L, K]`` (real tokens only) to the summary."""
        g = gates.detach().double()
        if valid is not None:
            g, idxs = g[valid], idxs[valid]
        self.mass.index_add_(0, idxs.reshape(-1), g.reshape(-1))
        self.entropy += float(-(g * g.clamp_min(1e-12).log()).sum())
        self.decisions += g.shape[0]
        self.k = max(self.k, g.shape[1])
        self.layers.add(layer)

    def summary(self) -> dict[str, Any]:
        """Shares of routing mass per candidate (sum 1), mean per-decision entropy (nats), the
        adapters mixed per token (K: the uniform merge mixes all candidates) and tokens routed."""
        total = float(self.mass.sum()) or 1.0
        names = self.router.adapters
        return {
            "router": self.router.kind,
            "top_k": self.k,
            "adapter_shares": {n: float(m) / total for n, m in zip(names, self.mass, strict=True)},
            "mean_entropy": self.entropy / max(self.decisions, 1),
            "tokens": self.decisions // max(len(self.layers), 1),
        }


def route_rows(
    rows: Sequence[MixtureRow], x: Tensor, layer: str, valid: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Rows sharing one router, ``x [R, L, D]``, routed in one call (each row's prior repeated
    over its tokens) -> ``(gates [R, L, K], idxs [R, L, K])`` into the bank's stack."""
    import torch

    router = rows[0].router
    assert all(r.router is router for r in rows), "route_rows needs rows of one router"
    r, length, d = x.shape
    priors = [row.prior for row in rows]
    prior = priors[0]  # [M], the same for every token, when all rows share it
    if any(p is not prior for p in priors):
        prior = stack_priors(priors, [length] * r, len(router.adapters))  # [R·L, M]
    gates, idxs = router.route(x.reshape(r * length, d), layer, prior)
    gates = torch.nan_to_num(gates, nan=0.0)  # a layer that none of the candidates adapts
    gates, idxs = gates.view(r, length, -1), idxs.view(r, length, -1)
    for i, row in enumerate(rows):
        row.record(gates[i], idxs[i], None if valid is None else valid[i], layer)
    return gates, rows[0].index[idxs]


def check_kind(kind: str) -> None:
    if kind not in MIXTURE_ROUTERS:
        raise InvalidInput(
            f"token router {kind!r} cannot serve a mixture (valid: {list(MIXTURE_ROUTERS)})",
            field=f"{FIELD}.router",
        )


def build_router(kind: str, top_k: int, vectors: Sequence[tuple[str, Any]]) -> TokenRouter:
    """A token router of ``kind`` over ``vectors``: (adapter name, {layer: [D]} or None)."""
    check_kind(kind)
    try:
        router = build_token_router({"kind": kind, "top_k": top_k})
    except ConfigError as e:
        raise InvalidInput(str(e), field=f"{FIELD}.top_k") from None
    for name, vecs in vectors:
        router.add_adapter(name, vecs)
    return router


def global_prior(names: Sequence[str], logits: Sequence[float] | None) -> TokenPrior | None:
    """Glider's prior: every candidate allowed, bias ``log_softmax(logits)`` (None: no bias)."""
    if logits is None:
        return None
    if len(logits) != len(names):
        raise InvalidInput(
            f"token_routing.prior has {len(logits)} scores for {len(names)} adapters",
            field=f"{FIELD}.prior",
        )
    return prior_from_scores(names, dict(zip(names, logits, strict=True)), len(names), 1.0)


def load_vectors(path: str | Path) -> dict[str, Tensor]:
    """A router artifact (``{layer: [D]}``, safetensors) from the registry's artifact store."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.suffix != ".safetensors" or not p.is_file():
        raise InvalidInput(f"router artifact {p} is not a safetensors file", field=FIELD)
    return {k: v.float() for k, v in load_file(str(p)).items()}


def check_vectors(name: str, vectors: Mapping[str, Tensor], dims: Mapping[str, int]) -> None:
    """Every vector sits on an adapted layer of this base and has that layer's input size."""
    for layer, v in vectors.items():
        if layer in dims and tuple(v.shape) != (dims[layer],):
            raise InvalidInput(
                f"router vector of {name!r} at {layer} has shape {tuple(v.shape)}, "
                f"expected ({dims[layer]},)",
                field=FIELD,
            )


class MixtureRouters:
    """The token routers of mixture requests on one bank, cached by what defines them."""

    def __init__(self, bank: AdapterBank, capacity: int = 32) -> None:
        self.bank, self.capacity = bank, capacity
        self._cache: OrderedDict[tuple[Any, ...], TokenRouter] = OrderedDict()

    def row(self, tr: TokenRoutingParams) -> MixtureRow:
        """A fresh row (its own statistics) over the cached router; candidates must be loaded."""
        names = [n for n, _ in tr.adapters]
        return MixtureRow(self.router(tr), global_prior(names, tr.prior))

    def router(self, tr: TokenRoutingParams) -> TokenRouter:
        check_kind(tr.router)
        vectors = tr.vectors or (None,) * len(tr.adapters)
        if len(vectors) != len(tr.adapters):
            raise InvalidInput("token_routing.vectors must align with its adapters", field=FIELD)
        key = (tr.router, tr.top_k, tr.adapters, vectors)
        if key not in self._cache:
            pairs = zip([n for n, _ in tr.adapters], vectors, strict=True)
            vecs = [(n, self.vectors(tr.router, n, v)) for n, v in pairs]
            self._cache[key] = build_router(tr.router, tr.top_k, vecs)
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def vectors(self, kind: str, name: str, artifact: str | None) -> dict[str, Tensor] | None:
        """One candidate's per-layer router vectors: its registry artifact, or Arrow's
        prototypes computed from its weights; PHATGOOSE without a gate is refused."""
        if kind == "uniform":
            return None
        if artifact is not None:
            vecs = load_vectors(artifact)
        elif kind == "arrow":
            from concilium.experts.moe.lora_gates import arrow_prototypes

            vecs = arrow_prototypes(self.bank.weights[name])
        else:
            raise InvalidInput(
                f"adapter {name!r} has no {kind} gate yet (it trains after registration when "
                f"its spec has train_examples); retry later or use router 'arrow'",
                field=f"{FIELD}.router",
            )
        dims = {m: layer.base.in_features for m, layer in self.bank.layers.items()}
        check_vectors(name, vecs, dims)
        return vecs
