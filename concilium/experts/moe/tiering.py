"""Expert weight tiering (ExpertFlow-style) for replicas that cannot hold every expert.

Every expert's weights live in one memory-mapped safetensors file; each MoE layer keeps at most
`budget` experts resident in an `ExpertCache` (LRU or LFU). A miss loads the expert from the
mapped file; routing-aware prefetch (see `tiered.py`) asks the *next* layer's router, on this
layer's hidden states, which experts it will want, and loads them ahead — on a background thread
when the cache has a `loader`, so the copy out of the mapping overlaps this layer's compute (the
thread only reads the file; every change to the cache happens on the caller's thread, which
takes the finished loads). Pinned ("super") experts are never evicted. `TierStats` counts hits,
misses, prefetches and bytes moved.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from concilium.errors import ConfigError

Policy = Literal["lru", "lfu"]
Weights = tuple[torch.Tensor, torch.Tensor]  # one expert's (w13 [2H, D], w2 [D, H])


def expert_key(layer: int, expert: int, part: str) -> str:
    return f"layers.{layer}.experts.{expert}.{part}"


def write_store(path: Path, layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write per-layer (w13 [E, 2H, D], w2 [E, D, H]) as one tensor per expert and part."""
    from safetensors.torch import save_file

    tensors = {}
    for layer, (w13, w2) in enumerate(layers):
        for e in range(w13.shape[0]):
            tensors[expert_key(layer, e, "w13")] = w13[e].detach().contiguous()
            tensors[expert_key(layer, e, "w2")] = w2[e].detach().contiguous()
    save_file(tensors, str(path))


class ExpertStore:
    """Read-only, memory-mapped access to the experts of `write_store`'s file."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        self._file = safe_open(str(self.path), framework="pt")

    def load(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 [2H, D], w2 [D, H]) of one expert, copied out of the mapping (`get_tensor` alone
        returns a view of it: the bytes would be read later, by whoever computes with them)."""
        get = self._file.get_tensor
        w13, w2 = get(expert_key(layer, expert, "w13")), get(expert_key(layer, expert, "w2"))
        return w13.clone(), w2.clone()

    def close(self) -> None:
        """Unmap the file (loads fail after this; the experts already loaded stay valid)."""
        self._file.__exit__(None, None, None)


@dataclass(slots=True)
class TierStats:
    """Counters of one layer's cache (or their sum over layers)."""

    hits: int = 0
    misses: int = 0
    prefetched: int = 0  # loads issued by prefetch
    prefetch_used: int = 0  # prefetched experts later hit before eviction
    bytes_moved: int = 0
    waits: int = 0  # hits on a background load still in flight (the caller waited for it)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 1.0

    def __add__(self, other: TierStats) -> TierStats:
        return TierStats(*(a + b for a, b in zip(self.astuple(), other.astuple(), strict=True)))

    def astuple(self) -> tuple[int, int, int, int, int, int]:
        return (
            self.hits,
            self.misses,
            self.prefetched,
            self.prefetch_used,
            self.bytes_moved,
            self.waits,
        )


@dataclass(slots=True)
class ExpertCache:
    """At most `budget` resident experts of one layer (counting loads in flight); pinned ones
    never leave. With a `loader` (one worker thread) prefetches load in the background."""

    store: ExpertStore
    layer: int
    budget: int
    policy: Policy = "lru"
    pinned: frozenset[int] = frozenset()
    loader: Executor | None = None
    stats: TierStats = field(default_factory=TierStats)
    _slots: OrderedDict[int, Weights] = field(default_factory=OrderedDict)
    _pending: dict[int, Future[Weights]] = field(default_factory=dict)
    _uses: Counter[int] = field(default_factory=Counter)
    _unused_prefetch: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.budget < len(self.pinned) + 1:
            raise ConfigError(
                f"layer {self.layer}: budget {self.budget} must exceed the {len(self.pinned)} "
                "pinned experts by at least one"
            )
        for e in sorted(self.pinned):
            self._load(e)

    @property
    def resident(self) -> list[int]:
        self._settle()
        return sorted(self._slots)

    def get(self, expert: int) -> Weights:
        """The expert's (w13 [2H, D], w2 [D, H]), loaded on a miss."""
        self._uses[expert] += 1
        if expert in self._pending:
            self.stats.waits += not self._pending[expert].done()
            self._settle(expert)
        if expert in self._slots:
            self.stats.hits += 1
            self.stats.prefetch_used += expert in self._unused_prefetch
            self._unused_prefetch.discard(expert)
            self._slots.move_to_end(expert)
            return self._slots[expert]
        self.stats.misses += 1
        return self._load(expert)

    def prefetch(self, experts: Iterable[int], keep: Iterable[int] = ()) -> None:
        """Load the predicted experts not resident, never evicting `keep` or each other."""
        self._settle()
        experts = list(dict.fromkeys(experts))  # an iterator is read once, below twice
        wanted = [e for e in experts if e not in self._slots and e not in self._pending]
        protect = set(keep) | set(experts)
        for e in wanted[: max(0, self.budget - len(self.pinned))]:
            if self._evict(protect) or self._used() < self.budget:
                self._start(e)
                self.stats.prefetched += 1
                self._unused_prefetch.add(e)

    def close(self) -> None:
        """Wait for the loads in flight (the loader may then be shut down)."""
        self._settle(*self._pending)

    def _used(self) -> int:
        return len(self._slots) + len(self._pending)

    def _start(self, expert: int) -> None:
        """Load `expert` into a slot already free: in the background when there is a loader."""
        if self.loader is None:
            self._insert(expert, self.store.load(self.layer, expert))
        else:
            self._pending[expert] = self.loader.submit(self.store.load, self.layer, expert)

    def _settle(self, *wait: int) -> None:
        """Move finished background loads (and those in `wait`, waiting) into the slots."""
        for e in [e for e, f in self._pending.items() if e in wait or f.done()]:
            self._insert(e, self._pending.pop(e).result())

    def _insert(self, expert: int, weights: Weights) -> Weights:
        self.stats.bytes_moved += weights[0].nbytes + weights[1].nbytes
        self._slots[expert] = weights
        return weights

    def _load(self, expert: int) -> Weights:
        if self._used() >= self.budget and not self._evict(set()):
            self._settle(*self._pending)  # every free slot is a load in flight: take them first
            self._evict(set())
        return self._insert(expert, self.store.load(self.layer, expert))

    def _evict(self, protect: set[int]) -> bool:
        """Drop one expert (LRU: least recent; LFU: least used), never pinned or protected."""
        if self._used() < self.budget:
            return False
        victims = [e for e in self._slots if e not in self.pinned and e not in protect]
        if not victims:
            return False
        victim = victims[0] if self.policy == "lru" else min(victims, key=self._uses.__getitem__)
        del self._slots[victim]
        self._unused_prefetch.discard(victim)
        return True
