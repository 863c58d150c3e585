"""Plans and fallbacks at the edges of the objective: budget sums at the ceiling, a narrowed
pool, an expert's own timeout, multi-input embeddings, names registered a moment ago."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from concilium.config import load_config
from concilium.errors import ExpertFailed, ExpertTimeout
from concilium.experts.base import Generation, GenParams, Message, Target
from concilium.orchestrator import planning
from concilium.orchestrator.deadline import Deadline
from concilium.orchestrator.http import create_app
from concilium.orchestrator.objective import Objective
from concilium.orchestrator.planning import Budget, Option, Plan, plan_ensemble
from concilium.orchestrator.service import Service, build_service
from concilium.orchestrator.strategies import run_cascade, run_ensemble
from tests.conftest import FakeBackend, HashEncoder, remote_spec

# Summed left to right, 0.3 + 0.2 + 0.1 == 0.6 but 0.1 + 0.2 + 0.3 == 0.6000000000000001: a plan
# whose fit was checked in one order and whose members are listed (and summed) in another
# passes the energy ceiling by one ulp.
ENERGY_OPTS = [
    Option("x", 0.5, 1.0, 10.0, 0.3),
    Option("y", 0.6, 1.0, 10.0, 0.2),
    Option("z", 0.7, 1.0, 10.0, 0.1),
]


def _energy(plan: planning.Plan, opts: Sequence[Option]) -> float:
    by_name = {o.name: o for o in opts}
    return sum(by_name[n].energy_j or 0.0 for n in plan.experts)


def test_exact_ensemble_energy_fits_in_the_order_the_plan_lists_its_members() -> None:
    budget = Budget(max_energy_j=0.6, max_experts=3)
    plan = plan_ensemble(ENERGY_OPTS, budget)
    assert plan is not None
    assert _energy(plan, ENERGY_OPTS) <= 0.6
    assert plan.est_energy_j is not None and plan.est_energy_j <= 0.6


def test_greedy_ensemble_energy_fits_in_the_order_the_plan_lists_its_members(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(planning, "EXACT_LIMIT", 0)
    # greedy picks by gain per cost: the cheap, weak options first, the strong one last
    opts = [
        Option("x", 0.5, 0.1, 10.0, 0.3),
        Option("y", 0.6, 0.5, 10.0, 0.2),
        Option("z", 0.7, 1.0, 10.0, 0.1),
    ]
    plan = plan_ensemble(opts, Budget(max_energy_j=0.6, max_experts=3))
    assert plan is not None
    assert _energy(plan, opts) <= 0.6
    assert plan.est_energy_j is not None and plan.est_energy_j <= 0.6


# -- the fallback pool ----------------------------------------------------------------------------
def _service(home: Path, backend: FakeBackend) -> Service:
    cfg = load_config(None, home=home, seed_embedder=False)
    svc = build_service(cfg, encoder=HashEncoder(), backend=backend, seed=False)
    svc.registry.register(remote_spec("reverse", ["reverse the word", "spell it backwards"]))
    svc.registry.register(remote_spec("math", ["add the numbers", "sum of numbers"]))
    return svc


def test_fallbacks_stay_inside_a_narrowed_candidate_pool(tmp_path: Path) -> None:
    """A token mixture narrows `Routed.candidates` to its adapters (the fallback pool): a failed
    dispatch must not fall back to an expert outside it."""
    backend = FakeBackend()
    orch = _service(tmp_path, backend).orchestrator
    routed = orch.route("reverse the word planet", model="router-retriever")
    chosen = routed.decision.expert
    narrowed = dataclasses.replace(routed, candidates={chosen: routed.candidates[chosen]})
    assert set(orch._order(narrowed)) <= set(narrowed.candidates)
    backend.fail = {chosen}
    deadline = Deadline(at=time.monotonic() + 60, budget_ms=60_000, field=None)
    msgs: list[Message] = [{"role": "user", "content": "reverse the word planet"}]
    with pytest.raises(ExpertFailed):
        asyncio.run(orch._dispatch(narrowed, msgs, GenParams(max_tokens=8), deadline))
    assert [c[0] for c in backend.calls] == [chosen]


# -- an expert's own timeout is a failure, not the caller's deadline ---------------------------
class SlowRemote(FakeBackend):
    """`reverse` times out on its own (a remote expert's timeout_s), long before any deadline."""

    async def chat(
        self, target: Target, messages: Sequence[Message], params: GenParams
    ) -> Generation:
        if target.expert == "reverse":
            self.calls.append((target.expert, list(messages), params))
            raise ExpertTimeout("remote expert 'reverse' timed out (http://127.0.0.1:9/v1)")
        return await super().chat(target, messages, params)


def test_an_experts_own_timeout_falls_back_inside_the_deadline(tmp_path: Path) -> None:
    backend = SlowRemote()
    with TestClient(create_app(_service(tmp_path, backend))) as c:
        r = c.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "reverse the word"}]},
        )
    assert r.status_code == 200, r.text
    assert [x[0] for x in backend.calls] == ["reverse", "math"]
    assert r.json()["routing"]["expert"] == "math"


def test_a_stage_or_member_that_times_out_on_its_own_is_passed_over(tmp_path: Path) -> None:
    backend = SlowRemote()
    orch = _service(tmp_path, backend).orchestrator
    entries = [orch.catalogs.get().entries[n] for n in ("reverse", "math")]
    plan = Plan("cascade", ("reverse", "math"), (0.5, 0.5), 0.0, 0.0, None, 0.0)
    msgs: list[Message] = [{"role": "user", "content": "reverse the word"}]
    params = GenParams(max_tokens=8)
    deadline = Deadline(at=time.monotonic() + 60, budget_ms=60_000, field=None)
    ran = asyncio.run(run_cascade(backend, entries, plan, msgs, params, deadline, -0.1))
    assert ran.chosen.entry.spec.name == "math" and ran.members[0].error
    plan = dataclasses.replace(plan, strategy="ensemble")
    ran = asyncio.run(run_ensemble(backend, entries, plan, msgs, params, deadline))
    assert ran.chosen.entry.spec.name == "math" and ran.members[0].error


# -- embeddings: max_cost covers every input -------------------------------------------------
def test_embeddings_max_cost_counts_every_input(tmp_path: Path) -> None:
    cfg = load_config(None, home=tmp_path, seed_embedder=False)
    svc = build_service(cfg, encoder=HashEncoder(), backend=FakeBackend(), seed=False)
    svc.registry.register(
        remote_spec("embedder", ["embed text"], task="embed", price_in_per_1k=1.0)
    )
    texts = ["a sentence long enough to embed, and then some"] * 50  # 12 tokens each
    with TestClient(create_app(svc)) as c:
        r = c.post("/v1/embeddings", json={"input": texts, "routing": {"max_cost": 0.05}})
    # one text alone is priced at 0.012, under the ceiling; all fifty cost 0.6
    if r.status_code == 200:
        assert r.json()["routing"]["cost"] <= 0.05, r.json()["routing"]
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == "routing.max_cost"


# -- an objective naming an expert registered a moment ago (another process) ----------------------
def test_allowed_experts_may_name_an_expert_registered_a_moment_ago(tmp_path: Path) -> None:
    svc = _service(tmp_path, FakeBackend())
    orch = svc.orchestrator
    # never re-checked by age (longer than any uptime: the monotonic clock may be below it)
    orch.catalogs.refresh_s = 1e9
    orch.route("reverse the word")
    svc.registry.register(remote_spec("upper", ["uppercase the word", "make it loud"]))
    # as a model name, the new expert is looked up at once ...
    assert orch.route("uppercase the word", model="upper").decision.expert == "upper"

    svc.registry.register(remote_spec("lower", ["lowercase the word", "make it quiet"]))
    # ... and so it is when the objective names it
    objective = Objective(allowed=frozenset({"lower"}))
    assert orch.route("lowercase the word", objective=objective).decision.expert == "lower"
