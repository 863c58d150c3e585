"""The routing step of a request: model name → router or named expert → `RouteDecision`.

Pure decision, no expert is called: the orchestrator executes what this returns, and the CLI's
`route` command and the evaluation harness use it alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from concilium.errors import InvalidInput, ObjectiveUnsatisfiable, UnknownModel
from concilium.orchestrator import token_plan
from concilium.orchestrator.catalog import Catalog, CatalogCache, Entry, estimate_tokens, priced
from concilium.orchestrator.encoding import Encoded, encode_query
from concilium.orchestrator.objective import Objective
from concilium.registry.index import TextEncoder
from concilium.routers.base import Candidate, Query, QueryRouter, RouteDecision


@dataclass(frozen=True, slots=True)
class Routed:
    """A decision plus the candidates it was made over (the fallback pool)."""

    decision: RouteDecision
    candidates: dict[str, Candidate]
    catalog: Catalog
    objective: Objective = field(default_factory=Objective)
    embedding: np.ndarray | None = None
    text: str = ""
    # what the answer reports as its active parameters when not the answering expert's own
    # (a token mixture's upper bound, see token_plan.mixture_active_params)
    active_params: int | None = None


class QueryRouting:
    """Routes one query over the registry's current catalog with the named routers."""

    def __init__(
        self,
        catalogs: CatalogCache,
        encoder: TextEncoder,
        routers: Mapping[str, QueryRouter],
        default_router: str,
        default_max_tokens: int,
    ) -> None:
        if default_router not in routers:
            raise InvalidInput(f"default router {default_router!r} is not among {sorted(routers)}")
        self.catalogs, self.encoder = catalogs, encoder
        self.routers, self.default_router = dict(routers), default_router
        self.default_max_tokens = default_max_tokens
        self._prepared: dict[str, int] = {}  # router id:task -> catalog version it was prepared on

    def route(
        self,
        text: str,
        *,
        model: str = "auto",
        objective: Objective | None = None,
        task: str = "generate",
        max_tokens: int | None = None,
        encoded: Encoded | None = None,
        prompt_tokens: int | None = None,
    ) -> Routed:
        """Route `text`; `encoded`: its (embedding, token embeddings) when already encoded;
        `prompt_tokens`: what the request sends the expert, when more than `text` (priced)."""
        objective = objective or Objective()
        named = objective.excluded | (objective.allowed or frozenset())
        router, direct, catalog = self._resolve_fresh(model, task, named)
        prompt = estimate_tokens(text) if prompt_tokens is None else prompt_tokens
        pool = [
            priced(e, prompt, max_tokens or self.default_max_tokens)
            for e in (direct if direct is not None else catalog.of_task(task))
        ]
        if not pool:
            raise ObjectiveUnsatisfiable(f"no {task} expert is registered", field="model")
        cands = objective.filter(pool, catalog.names())
        embedding = None if encoded is None else encoded[0]
        if router is None:
            decision = _direct(cands[0].name, model)
        else:
            self._prepare(router, catalog, task)
            embedding, tokens = encoded or encode_query(self.encoder, [text])[0]
            query = Query(text, embedding, objective.quality_weight, tokens)
            decision = router.route(query, cands)
        return Routed(decision, {c.name: c for c in cands}, catalog, objective, embedding, text)

    def _resolve_fresh(
        self, model: str, task: str, named: frozenset[str]
    ) -> tuple[QueryRouter | None, list[Entry] | None, Catalog]:
        """`resolve` on the current catalogue, or on a fresh one when that lacks `model` or an
        expert the objective `named`."""
        catalog = self.catalogs.get()
        if named <= catalog.names():
            try:
                return *self.resolve(model, catalog, task), catalog
            except UnknownModel:
                pass
        # registered a moment ago (through another process)? look now, not at the next refresh
        self.catalogs.invalidate()
        fresh = self.catalogs.get()
        return *self.resolve(model, fresh, task), fresh

    def resolve(
        self, model: str, catalog: Catalog, task: str
    ) -> tuple[QueryRouter | None, list[Entry] | None]:
        """(router, None) for `auto` / `router-<name>`; (default router, the base's adapters)
        for `<base>:mixture`; (None, [entry]) for a named expert or `<base>:<adapter>`."""
        if model == "auto":
            return self.routers[self.default_router], None
        if model.startswith("router-"):
            return self._named_router(model), None
        if model.endswith(":" + token_plan.MIXTURE):
            return self.routers[self.default_router], _adapters_of(model, catalog, task)
        return None, [_named_expert(model, catalog, task, sorted(self.routers))]

    def _named_router(self, model: str) -> QueryRouter:
        name = model.removeprefix("router-")
        if name not in self.routers:
            raise UnknownModel(
                f"model {model!r}: no router {name!r} (routers: {sorted(self.routers)})",
                field="model",
            )
        return self.routers[name]

    def _prepare(self, router: QueryRouter, catalog: Catalog, task: str) -> None:
        key = f"{id(router)}:{task}"
        if self._prepared.get(key) != catalog.version:
            router.prepare([e.candidate for e in catalog.of_task(task)])
            self._prepared[key] = catalog.version


def _direct(name: str, model: str) -> RouteDecision:
    return RouteDecision(
        router="direct",
        experts=(name,),
        weights=(1.0,),
        scores={name: 1.0},
        confidence=1.0,
        reason=f"model {model!r} requested",
    )


def _adapters_of(model: str, catalog: Catalog, task: str) -> list[Entry]:
    base = model.removesuffix(":" + token_plan.MIXTURE)
    adapters = [e for e in catalog.of_task(task) if e.candidate.base == base]
    if not adapters:
        raise UnknownModel(
            f"model {model!r}: {base!r} is not a base model with registered adapters",
            field="model",
        )
    return adapters


def _named_expert(model: str, catalog: Catalog, task: str, routers: list[str]) -> Entry:
    name = model
    if ":" in model:
        base, _, name = model.partition(":")
        e = catalog.entries.get(name)
        if e is None or e.candidate.base != base:
            raise UnknownModel(
                f"model {model!r}: {name!r} is not an adapter of {base!r}", field="model"
            )
    entry = catalog.entries.get(name)
    if entry is None:
        raise UnknownModel(
            f"model {model!r} is not a registered expert, 'auto' or "
            f"'router-<name>' (routers: {routers})",
            field="model",
        )
    if entry.spec.task != task:
        raise InvalidInput(
            f"model {model!r} is a {entry.spec.task} expert, not {task}", field="model"
        )
    return entry
