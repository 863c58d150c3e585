"""`tier(model, ...)`: run a transformers MoE model with only `budget` experts per layer resident.

Each supported experts module (see `patching.SUPPORTED_EXPERTS`) is replaced by `TieredExperts`:
its weights go to one memory-mapped safetensors file and the module's full [E, ...] parameters
are dropped; per forward it fetches the active experts through the layer's `ExpertCache`, then
predicts the next layer's experts by applying the next layer's router to its own input (hidden
states change little across one layer) and prefetches them.

Super experts (Su et al. 2025: a few experts with extreme down-projection outputs whose removal
breaks the model) are found with `find_super_experts` on a calibration batch and pinned.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from concilium.errors import ConfigError
from concilium.experts.moe.kernels.decode import active_experts
from concilium.experts.moe.patching import experts_sites
from concilium.experts.moe.reference import swiglu
from concilium.experts.moe.tiering import ExpertCache, ExpertStore, Policy, TierStats, write_store


class TieredExperts(nn.Module):
    """Drop-in experts module whose weights come from an `ExpertCache`.

    forward(hidden_states [T, D], top_k_index [T, K], top_k_weights [T, K]) -> [T, D]
    """

    def __init__(self, cache: ExpertCache, num_experts: int) -> None:
        super().__init__()
        self.cache = cache
        self.num_experts = num_experts
        self.next: tuple[ExpertCache, torch.Tensor, int] | None = None  # cache, router [E, D], K

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        self._prefetch_next(hidden_states)  # first: background loads overlap this layer
        y = torch.zeros_like(hidden_states)
        for e in active_experts(top_k_index, self.num_experts):
            w13, w2 = self.cache.get(e)
            token, slot = torch.nonzero(top_k_index == e, as_tuple=True)  # [S_e] each
            out = swiglu(hidden_states[token], w13, w2) * top_k_weights[token, slot, None]
            y = y.index_add(0, token, out.to(y.dtype))
        return y

    @torch.no_grad()
    def _prefetch_next(self, hidden_states: torch.Tensor) -> None:
        """Load the experts the next layer's router would pick for these hidden states."""
        if self.next is None:
            return
        cache, router, k = self.next
        picks = (hidden_states @ router.t()).topk(k, dim=-1).indices  # [T, K]
        cache.prefetch(torch.unique(picks).tolist())


@dataclass(frozen=True, slots=True)
class TierReport:
    """The tiered layers' caches, in layer order, their summed counters, and the background
    loader they share (None: prefetch loads synchronously)."""

    names: tuple[str, ...]
    caches: tuple[ExpertCache, ...]
    loader: ThreadPoolExecutor | None = None

    def stats(self) -> TierStats:
        total = TierStats()
        for c in self.caches:
            total = total + c.stats
        return total

    def close(self) -> None:
        """Finish the loads in flight, stop the loader thread and unmap the tier file."""
        for c in self.caches:
            c.close()
        if self.loader is not None:
            self.loader.shutdown(wait=True)
        for c in self.caches:
            c.store.close()


def tier(
    model: nn.Module,
    store_path: Path,
    budget: int,
    *,
    policy: Policy = "lru",
    pinned: dict[int, set[int]] | None = None,
    prefetch: bool = True,
    background: bool = False,
) -> TierReport:
    """Move every supported experts module's weights (stock or patched) to `store_path`, keep
    `budget` per layer. `pinned` maps MoE layer index (in model order) -> experts never evicted.
    `background`: prefetches load on one worker thread, overlapping the layer's compute (call
    `TierReport.close()` when done with the model).
    """
    sites = experts_sites(model, include_ours=True)
    if not sites:
        raise ConfigError(f"{type(model).__name__} has no supported MoE experts module to tier")
    layers = [(s[3].get_parameter("gate_up_proj"), s[3].get_parameter("down_proj")) for s in sites]
    write_store(store_path, layers)
    store = ExpertStore(store_path)
    pins = pinned or {}
    loader = ThreadPoolExecutor(1, "expert-prefetch") if background and prefetch else None
    caches = []
    for i, (_, parent, attr, stock) in enumerate(sites):
        cache = ExpertCache(store, i, budget, policy, frozenset(pins.get(i, set())), loader)
        setattr(parent, attr, TieredExperts(cache, stock.get_parameter("down_proj").shape[0]))
        caches.append(cache)
    if prefetch:
        _link_prefetch(sites)
    return TierReport(tuple(s[0] for s in sites), tuple(caches), loader)


def _link_prefetch(sites: list[tuple[str, nn.Module, str, nn.Module]]) -> None:
    """Give each tiered layer the next layer's cache and router weight [E, D] (`parent.gate`)."""
    for (_, parent, attr, _), (_, nxt_parent, nxt_attr, _) in itertools.pairwise(sites):
        gate = getattr(nxt_parent, "gate", None)
        weight = getattr(gate, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        k = int(getattr(gate, "top_k", 2))
        getattr(parent, attr).next = (getattr(nxt_parent, nxt_attr).cache, weight, k)


@torch.no_grad()
def find_super_experts(
    model: nn.Module, input_ids: torch.Tensor, factor: float = 10.0
) -> dict[int, set[int]]:
    """{layer: experts} whose largest |down-projection output| on `input_ids` exceeds `factor`
    times the median of all experts' largest outputs (the Super Experts criterion). Run it on
    the full model, before `tier`."""
    sites = experts_sites(model, include_ours=True)
    peaks = torch.zeros(len(sites), sites[0][3].get_parameter("down_proj").shape[0])  # [L, E]
    hooks = [_peak_hook(site[3], peaks[i]) for i, site in enumerate(sites)]
    try:
        model(input_ids)
    finally:
        for h in hooks:
            h.remove()
    threshold = factor * peaks[peaks > 0].median()
    return {i: {int(e) for e in torch.nonzero(row > threshold)} for i, row in enumerate(peaks)}


def _peak_hook(experts: nn.Module, peak: torch.Tensor) -> torch.utils.hooks.RemovableHandle:
    """Record per expert the max |SwiGLU output| over the tokens routed to it."""

    w13, w2 = experts.get_parameter("gate_up_proj"), experts.get_parameter("down_proj")

    def hook(module: nn.Module, args: tuple) -> None:
        x, idxs = args[0], args[1]
        for e in active_experts(idxs, peak.numel()):
            token = torch.nonzero((idxs == e).any(-1)).squeeze(-1)
            out = swiglu(x[token], w13[e], w2[e])
            peak[e] = max(float(peak[e]), float(out.abs().max()))

    return experts.register_forward_pre_hook(hook)
