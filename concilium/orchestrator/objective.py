"""The per-request objective and the candidate filter it applies before any router runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from concilium.errors import InvalidInput, ObjectiveUnsatisfiable
from concilium.orchestrator.schemas import RoutingOptions
from concilium.routers.base import Candidate

DEFAULT_MAX_EXPERTS = 3


@dataclass(frozen=True, slots=True)
class Objective:
    """Hard constraints (cost, latency, allowed set) and preferences (quality weight)."""

    max_cost: float | None = None
    max_latency_ms: float | None = None
    max_energy_j: float | None = None
    allowed: frozenset[str] | None = None
    excluded: frozenset[str] = frozenset()
    quality_weight: float | None = None  # None: the router's default
    strategy: str = "single"
    max_experts: int = 1
    fusion: str | None = None  # ensembles: "vote" | "logits"; None = the service's default

    @classmethod
    def from_options(cls, opts: RoutingOptions | None) -> Objective:
        if opts is None:
            return cls()
        if opts.fusion is not None and opts.strategy != "ensemble":
            raise InvalidInput(
                f"routing.fusion fuses an ensemble's members; routing.strategy is "
                f"{opts.strategy!r} (use 'ensemble')",
                field="routing.fusion",
            )
        return cls(
            max_cost=opts.max_cost,
            max_latency_ms=opts.max_latency_ms,
            max_energy_j=opts.max_energy_j,
            allowed=frozenset(opts.allowed_experts) if opts.allowed_experts is not None else None,
            excluded=frozenset(opts.excluded_experts),
            quality_weight=opts.quality_weight,
            strategy=opts.strategy,
            fusion=opts.fusion,
            max_experts=1
            if opts.strategy == "single"
            else (opts.max_experts or DEFAULT_MAX_EXPERTS),
        )

    def filter(self, candidates: Sequence[Candidate], known: set[str]) -> list[Candidate]:
        """Candidates that satisfy every hard constraint; raise naming the constraint that binds."""
        self._check_names(known)
        steps: list[tuple[str, str, object]] = [
            ("routing.allowed_experts", "allowed", self.allowed),
            ("routing.excluded_experts", "excluded", self.excluded),
            ("routing.max_cost", "cost", self.max_cost),
            ("routing.max_latency_ms", "latency", self.max_latency_ms),
            ("routing.max_energy_j", "energy", self.max_energy_j),
        ]
        pool = list(candidates)
        for field, what, value in steps:
            kept = [c for c in pool if self._admits(what, c)]
            if not kept:
                raise ObjectiveUnsatisfiable(_why(field, value, pool), field=field)
            pool = kept
        return pool

    def _admits(self, what: str, c: Candidate) -> bool:
        if what == "allowed":
            return self.allowed is None or c.name in self.allowed
        if what == "excluded":
            return c.name not in self.excluded
        if what == "cost":
            return self.max_cost is None or c.est_cost <= self.max_cost
        if what == "energy":  # undeclared energy cannot be promised under an energy ceiling
            e = c.est_energy_j
            return self.max_energy_j is None or (e is not None and e <= self.max_energy_j)
        # unknown latency (0) cannot be promised under a latency ceiling
        return self.max_latency_ms is None or 0 < c.est_latency_ms <= self.max_latency_ms

    def _check_names(self, known: set[str]) -> None:
        for field, names in (
            ("routing.allowed_experts", self.allowed or ()),
            ("routing.excluded_experts", self.excluded),
        ):
            unknown = sorted(set(names) - known)
            if unknown:
                raise InvalidInput(f"{field} names unknown experts {unknown}", field=field)


def _why(field: str, value: object, pool: Sequence[Candidate]) -> str:
    if field == "routing.max_cost":
        cheapest = min(c.est_cost for c in pool)
        return (
            f"no expert satisfies {field}={value}: the cheapest candidate is estimated at "
            f"{cheapest:.6g}"
        )
    if field == "routing.max_latency_ms":
        known = [c.est_latency_ms for c in pool if c.est_latency_ms > 0]
        best = f"{min(known):.1f} ms" if known else "unknown for every candidate"
        return f"no expert satisfies {field}={value}: the fastest estimate is {best}"
    if field == "routing.max_energy_j":
        known_e = [c.est_energy_j for c in pool if c.est_energy_j is not None]
        least = f"{min(known_e):.4g} J" if known_e else "undeclared for every candidate"
        return f"no expert satisfies {field}={value}: the lowest energy estimate is {least}"
    shown = sorted(value) if isinstance(value, frozenset) else value
    return f"no candidate expert is left after {field}={shown}"
