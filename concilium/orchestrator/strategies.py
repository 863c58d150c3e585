"""Running a multi-expert plan: an ensemble in parallel then fused, or a cascade in cost order.

The plan (`planning.py`) already fits the budget; this module only executes it inside the
request's deadline. A member that fails is left out of the fusion (ensemble) or escalated past
(cascade); the request fails only when no member answered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from concilium.errors import ExpertFailed, ExpertTimeout, ObjectiveUnsatisfiable
from concilium.experts.base import (
    ExpertBackend,
    Generation,
    GenParams,
    LogitFusionParams,
    Message,
    Target,
)
from concilium.orchestrator.catalog import Entry, cost_of
from concilium.orchestrator.fusion import Vote, fuse
from concilium.orchestrator.planning import Budget, Option, Plan, plan_cascade, plan_ensemble
from concilium.routers.base import gate_qualities

if TYPE_CHECKING:
    from concilium.orchestrator.deadline import Deadline
    from concilium.orchestrator.routing import Routed

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Member:
    """One expert of a plan as it ran."""

    entry: Entry
    gate: float
    generation: Generation | None = None
    error: str | None = None

    @property
    def cost(self) -> float:
        return 0.0 if self.generation is None else cost_of(self.entry, self.generation)

    def summary(self) -> dict[str, Any]:
        g = self.generation
        return {
            "expert": self.entry.spec.name,
            "gate": round(self.gate, 6),
            "ok": g is not None,
            "mean_logprob": None if g is None else _rounded(g.mean_logprob),
            "cost": self.cost,
            **({"error": self.error} if self.error else {}),
        }


def _rounded(lp: float | None) -> float | None:
    """A log-probability for the routing object: None where JSON cannot hold it (NaN, ±inf)."""
    return None if lp is None or not math.isfinite(lp) else round(lp, 4)


@dataclass(frozen=True, slots=True)
class Ran:
    """An executed plan: every member that ran, and which one's answer is returned."""

    plan: Plan
    members: tuple[Member, ...]
    answer: int  # index into members
    detail: dict[str, Any]

    @property
    def chosen(self) -> Member:
        return self.members[self.answer]

    @property
    def cost(self) -> float:
        return sum(m.cost for m in self.members)

    @property
    def active_params(self) -> int | None:
        ps = [m.entry.candidate.params_active for m in self.members if m.generation is not None]
        return None if not ps or any(p is None for p in ps) else sum(p or 0 for p in ps)


def plan_for(routed: Routed, adequacy: float) -> Plan:
    """The ensemble or cascade for a routed request, inside its objective's budget."""
    obj = routed.objective
    gates = gate_qualities(routed.decision)
    options = [
        Option(n, gates.get(n, 0.0), c.est_cost, c.est_latency_ms, c.est_energy_j)
        for n, c in routed.candidates.items()
    ]
    budget = Budget(
        max_cost=obj.max_cost,
        max_latency_ms=obj.max_latency_ms,
        max_energy_j=obj.max_energy_j,
        max_experts=obj.max_experts,
        quality_weight=1.0 if obj.quality_weight is None else obj.quality_weight,
    )
    if obj.strategy == "ensemble":
        plan = plan_ensemble(options, budget)
    else:
        plan = plan_cascade(options, budget, adequacy=adequacy)
    if plan is None:  # the objective filter admitted every candidate alone: cannot happen
        raise ObjectiveUnsatisfiable("no expert fits the request's budget", field="routing")
    return plan


async def run_ensemble(
    backend: ExpertBackend,
    entries: Sequence[Entry],
    plan: Plan,
    messages: list[Message],
    params: GenParams,
    deadline: Deadline,
    fusion: str = "vote",
) -> Ran:
    """Every member in parallel, then a gate-weighted vote over the answers. With fusion
    "logits", members that are adapters of one local model (or the model itself) run as one
    logit-level ensemble in one replica; its answer is every such member's vote."""
    calls = _calls(entries, plan.weights, params, fusion)
    results = await asyncio.gather(
        *(deadline.run(backend.chat(target, messages, p)) for _, target, p in calls),
        return_exceptions=True,
    )
    slots: list[Member | None] = [None] * len(entries)
    for (idx, _, _), r in zip(calls, results, strict=True):
        if isinstance(r, ExpertTimeout) and deadline.spent:
            raise r  # the caller stopped waiting (a member's own timeout only leaves it out)
        if isinstance(r, BaseException) and not isinstance(r, ExpertFailed):
            raise r
        for i in idx:
            e, gate = entries[i], plan.weights[i]
            if isinstance(r, ExpertFailed):
                log.warning("ensemble member %s failed: %s", e.spec.name, r)
                slots[i] = Member(e, gate, error=r.message)
            else:
                slots[i] = Member(e, gate, generation=r)
    members = [m for m in slots if m is not None]
    ok = [i for i, m in enumerate(members) if m.generation is not None]
    if not ok:
        raise ExpertFailed(
            "every ensemble member failed: "
            + "; ".join(f"{m.entry.spec.name}: {m.error}" for m in members)
        )
    votes = [
        Vote(
            members[i].entry.spec.name,
            members[i].generation.text,  # type: ignore[union-attr]
            members[i].gate,
            members[i].generation.mean_logprob,  # type: ignore[union-attr]
        )
        for i in ok
    ]
    fused = fuse(votes)
    detail: dict[str, Any] = {
        "fusion": fused.mode,
        "support": round(fused.support, 6),
        "distinct_answers": len(fused.tallies),
    }
    if fusion == "logits":
        detail["logit_fused"] = [[entries[i].spec.name for i in idx] for idx, _, _ in calls]
    return Ran(plan, tuple(members), ok[fused.winner], detail)


def _calls(
    entries: Sequence[Entry], gates: Sequence[float], params: GenParams, fusion: str
) -> list[tuple[list[int], Target, GenParams]]:
    """(members, target, params) of each call an ensemble makes: one per member, or, with
    fusion "logits", one per local model for the members it runs (a logit-level ensemble)."""
    groups: dict[tuple[str | None, ...], list[int]] = {}
    for i, e in enumerate(entries):
        t = e.target
        local = t.remote is None and t.model_path is not None
        fusable = fusion == "logits" and local and (t.adapter is None or t.adapter_path is not None)
        groups.setdefault((t.model, t.model_path) if fusable else (str(i),), []).append(i)
    calls = []
    for idx in groups.values():
        if len(idx) == 1:
            calls.append((idx, entries[idx[0]].target, params))
            continue
        lead = max(idx, key=lambda i: gates[i])  # its adapter picks the replica (affinity)
        weights = [max(gates[i], 0.0) for i in idx]
        members = tuple(_fusion_member(entries[i].target) for i in idx)
        mix = LogitFusionParams(members, tuple(weights if sum(weights) > 0 else [1.0] * len(idx)))
        calls.append((idx, entries[lead].target, dataclasses.replace(params, fusion=mix)))
    return calls


def _fusion_member(t: Target) -> tuple[str, str] | None:
    if t.adapter is None:
        return None  # the model itself, no adapter
    assert t.adapter_path is not None
    return t.adapter, t.adapter_path


async def run_cascade(
    backend: ExpertBackend,
    entries: Sequence[Entry],
    plan: Plan,
    messages: list[Message],
    params: GenParams,
    deadline: Deadline,
    threshold: float,
) -> Ran:
    """Stages in order; stop at the first answer whose mean log-probability ≥ `threshold`.

    An answer without a log-probability (a remote expert that does not report one) is accepted:
    there is nothing to judge it by. The last stage's answer is returned whatever its confidence.
    """
    members: list[Member] = []
    answer: int | None = None
    for k, (e, gate) in enumerate(zip(entries, plan.weights, strict=True)):
        try:
            gen: Generation = await deadline.run(backend.chat(e.target, messages, params))
        except ExpertFailed as err:
            if isinstance(err, ExpertTimeout) and deadline.spent:
                raise  # the caller stopped waiting (a stage's own timeout is escalated past)
            log.warning("cascade stage %s failed: %s", e.spec.name, err)
            members.append(Member(e, gate, error=err.message))
            continue
        members.append(Member(e, gate, generation=gen))
        answer = len(members) - 1
        lp = gen.mean_logprob
        if lp is None or lp >= threshold or k == len(entries) - 1:
            break
    if answer is None:
        raise ExpertFailed(
            "every cascade stage failed: "
            + "; ".join(f"{m.entry.spec.name}: {m.error}" for m in members)
        )
    lp = members[answer].generation.mean_logprob  # type: ignore[union-attr]
    detail = {
        "threshold": threshold,
        "escalations": len(members) - 1,
        "accepted_confidence": _rounded(lp),
    }
    return Ran(plan, tuple(members), answer, detail)
