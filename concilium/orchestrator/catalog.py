"""The catalogue: registry records turned into router candidates and execution targets.

Rebuilt when the registry version changes (checked at most every `refresh_s`), so a registration in
any process becomes routable here without a restart.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from dataclasses import dataclass

from concilium.experts.base import Generation, Target
from concilium.registry.registry import Registry
from concilium.registry.specs import LoraSpec, ModelSpec, RemoteSpec
from concilium.registry.store import ExpertRecord
from concilium.routers.base import Candidate


@dataclass(frozen=True, slots=True)
class Entry:
    record: ExpertRecord
    candidate: Candidate  # static part; per-request cost/latency are filled by `priced`
    target: Target

    @property
    def spec(self) -> ModelSpec | LoraSpec | RemoteSpec:
        return self.record.spec


@dataclass(frozen=True, slots=True)
class Catalog:
    version: int
    entries: dict[str, Entry]

    def names(self) -> set[str]:
        return set(self.entries)

    def of_task(self, task: str) -> list[Entry]:
        return [e for e in self.entries.values() if e.spec.task == task]


def estimate_tokens(text: str) -> int:
    """Rough token count for cost estimates before the expert tokenises (≈4 chars per token)."""
    return max(1, math.ceil(len(text) / 4))


def cost_of(entry: Entry, gen: Generation) -> float:
    """What a finished generation cost: its tokens at the expert's prices."""
    s = entry.spec
    return (
        gen.prompt_tokens * s.price_in_per_1k + gen.completion_tokens * s.price_out_per_1k
    ) / 1000


def priced(entry: Entry, prompt_tokens: int, max_tokens: int) -> Candidate:
    """The entry's candidate with this request's estimated cost (upper bound) and latency."""
    s = entry.spec
    cost = (prompt_tokens * s.price_in_per_1k + max_tokens * s.price_out_per_1k) / 1000
    prof = entry.record.artifacts.get("profile", {})
    per_tok = prof.get("latency_ms_per_token")
    if per_tok is not None:
        latency = float(prof.get("latency_ms_overhead", 0.0)) + float(per_tok) * max_tokens
    else:
        latency = s.expected_latency_ms or 0.0
    per_1k = s.energy_j_per_1k_tokens
    energy = None if per_1k is None else (prompt_tokens + max_tokens) * per_1k / 1000
    return dataclasses.replace(
        entry.candidate, est_cost=cost, est_latency_ms=latency, est_energy_j=energy
    )


class CatalogCache:
    """Holds the current catalogue; refreshes from the registry when its version moves."""

    def __init__(self, registry: Registry, *, refresh_s: float = 0.2) -> None:
        self.registry = registry
        self.refresh_s = refresh_s
        self._catalog: Catalog | None = None
        self._checked = -math.inf
        self._lock = threading.Lock()

    def get(self) -> Catalog:
        now = time.monotonic()
        cat = self._catalog
        if cat is not None and now - self._checked < self.refresh_s:
            return cat
        with self._lock:
            self._checked = now
            if self._catalog is None or self.registry.version() != self._catalog.version:
                self._catalog = self._build()
            return self._catalog

    def invalidate(self) -> None:
        """Check the registry version at the next `get` (0.0 would not do while the
        monotonic clock, which counts from an arbitrary point, is still below `refresh_s`)."""
        self._checked = -math.inf

    def _build(self) -> Catalog:
        version, records = self.registry.store.snapshot()
        by_name = {r.name: r for r in records}
        entries = {r.name: self._entry(r, by_name) for r in records}
        self.registry.retain_tokens(records)
        return Catalog(version=version, entries=entries)

    def _entry(self, rec: ExpertRecord, by_name: dict[str, ExpertRecord]) -> Entry:
        emb = self.registry.embeddings(rec)
        tokens, offsets = self.registry.pilot_tokens(rec, emb) or (None, None)
        s = rec.spec
        base = by_name.get(s.base) if isinstance(s, LoraSpec) else None
        cand = Candidate(
            name=s.name,
            kind=s.kind,
            task=s.task,
            pilots=emb["pilots"],
            description=emb["description"][0],
            categories=tuple(s.categories),
            base=s.base if isinstance(s, LoraSpec) else None,
            params_active=_active_params(rec, base),
            params_total=s.params_total,
            pilot_tokens=tokens,
            pilot_token_offsets=offsets,
        )
        return Entry(record=rec, candidate=cand, target=self._target(rec, base))

    def _target(self, rec: ExpertRecord, base: ExpertRecord | None) -> Target:
        s = rec.spec
        if isinstance(s, RemoteSpec):
            return Target(expert=s.name, kind=s.kind, remote=s)
        if isinstance(s, ModelSpec):
            return Target(expert=s.name, kind=s.kind, model=s.name, model_path=s.path)
        assert base is not None and isinstance(base.spec, ModelSpec), "lora base vanished"
        path = self.registry.runtime_path(rec)
        return Target(
            expert=s.name,
            kind=s.kind,
            model=base.name,
            model_path=base.spec.path,
            adapter=s.name,
            adapter_path=str(path) if path else None,
        )


def _active_params(rec: ExpertRecord, base: ExpertRecord | None) -> int | None:
    """Declared active parameters, else base active (+ adapter) parameters, else measured total."""
    s = rec.spec
    if s.params_active is not None:
        return s.params_active
    lora = rec.artifacts.get("lora", {}).get("num_params", 0)
    if base is not None:
        inner = _active_params(base, None)
        return None if inner is None else inner + int(lora)
    measured = rec.artifacts.get("model", {}).get("num_params")
    return int(measured) if measured is not None else None
