"""request → objective → route → dispatch (with fallback inside the allowed set) → response.

The orchestrator owns no model: it asks a router for a `RouteDecision` over the candidates that
satisfy the caller's objective, then executes it on an
`ExpertBackend` (in-process pool or Ray Serve).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from concilium.errors import ExpertFailed, InvalidInput, ObjectiveUnsatisfiable, UnknownModel
from concilium.experts.base import ExpertBackend, Generation, GenParams, Message
from concilium.orchestrator.catalog import Catalog, CatalogCache, Entry, estimate_tokens, priced
from concilium.orchestrator.objective import Objective
from concilium.orchestrator.schemas import ChatCompletionRequest, EmbeddingRequest, RoutingOptions
from concilium.registry.index import TextEncoder
from concilium.registry.registry import Registry
from concilium.routers.base import Candidate, Query, QueryRouter, RouteDecision

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Routed:
    """A decision plus the candidates it was made over (the fallback pool)."""

    decision: RouteDecision
    candidates: dict[str, Candidate]
    catalog: Catalog


@dataclass(frozen=True, slots=True)
class Outcome:
    """An executed request: the OpenAI body and the x-concilium-* headers."""

    body: dict[str, Any]
    headers: dict[str, str]


class Orchestrator:
    def __init__(
        self,
        registry: Registry,
        backend: ExpertBackend,
        encoder: TextEncoder,
        routers: Mapping[str, QueryRouter],
        default_router: str,
        *,
        default_max_tokens: int = 64,
        max_fallbacks: int = 2,
        refresh_s: float = 0.2,
    ) -> None:
        if default_router not in routers:
            raise InvalidInput(f"default router {default_router!r} is not among {sorted(routers)}")
        self.registry, self.backend, self.encoder = registry, backend, encoder
        self.routers = dict(routers)
        self.default_router = default_router
        self.default_max_tokens = default_max_tokens
        self.max_fallbacks = max_fallbacks
        self.catalogs = CatalogCache(registry, refresh_s=refresh_s)
        self._prepared: dict[str, int] = {}

    # -- routing (pure decision; also used by the CLI `route` command) ---------------------------
    def route(
        self,
        text: str,
        *,
        model: str = "auto",
        objective: Objective | None = None,
        task: str = "generate",
        max_tokens: int | None = None,
    ) -> Routed:
        objective = objective or Objective()
        catalog = self.catalogs.get()
        max_tokens = max_tokens or self.default_max_tokens
        router, direct = self._resolve(model, catalog, task)
        pool = [
            priced(e, estimate_tokens(text), max_tokens)
            for e in (direct if direct is not None else catalog.of_task(task))
        ]
        if not pool:
            raise ObjectiveUnsatisfiable(f"no {task} expert is registered", field="model")
        cands = objective.filter(pool, catalog.names())
        if router is None:
            c = cands[0]
            decision = RouteDecision(
                router="direct",
                experts=(c.name,),
                weights=(1.0,),
                scores={c.name: 1.0},
                confidence=1.0,
                reason=f"model {model!r} requested",
            )
        else:
            self._prepare(router, catalog, task)
            query = Query(text=text, embedding=self.encoder.encode([text])[0])
            decision = router.route(query, cands)
        return Routed(decision, {c.name: c for c in cands}, catalog)

    def _resolve(
        self, model: str, catalog: Catalog, task: str
    ) -> tuple[QueryRouter | None, list[Entry] | None]:
        if model == "auto":
            return self.routers[self.default_router], None
        if model.startswith("router-"):
            name = model.removeprefix("router-")
            if name not in self.routers:
                raise UnknownModel(
                    f"model {model!r}: no router {name!r} (routers: {sorted(self.routers)})",
                    field="model",
                )
            return self.routers[name], None
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
                f"'router-<name>' (routers: {sorted(self.routers)})",
                field="model",
            )
        if entry.spec.task != task:
            raise InvalidInput(
                f"model {model!r} is a {entry.spec.task} expert, not {task}", field="model"
            )
        return None, [entry]

    def _prepare(self, router: QueryRouter, catalog: Catalog, task: str) -> None:
        key = f"{id(router)}:{task}"
        if self._prepared.get(key) != catalog.version:
            router.prepare([e.candidate for e in catalog.of_task(task)])
            self._prepared[key] = catalog.version

    # -- execution ------------------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest) -> Outcome:
        t0 = time.perf_counter()
        _refuse_unsupported(req.routing)
        try:
            messages: list[Message] = [{"role": m.role, "content": m.text()} for m in req.messages]
        except ValueError as e:
            raise InvalidInput(str(e), field="messages") from None
        params = GenParams(
            max_tokens=req.max_completion_tokens or req.max_tokens or self.default_max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=req.stops(),
            seed=req.seed,
        )
        routed = self.route(
            _query_text(messages),
            model=req.model,
            objective=Objective.from_options(req.routing),
            max_tokens=params.max_tokens,
        )
        expert, gen, tried = await self._dispatch(routed, messages, params)
        latency_ms = (time.perf_counter() - t0) * 1000
        return self._chat_outcome(req, routed, expert, gen, tried, latency_ms)

    async def _dispatch(
        self, routed: Routed, messages: list[Message], params: GenParams
    ) -> tuple[Entry, Generation, list[str]]:
        d = routed.decision
        order = list(d.experts) + [n for n in d.ranked() if n not in d.experts]
        order = order[: 1 + self.max_fallbacks] if d.router != "direct" else order[:1]
        tried: list[str] = []
        last: ExpertFailed | None = None
        for name in order:
            entry = routed.catalog.entries[name]
            tried.append(name)
            try:
                return entry, await self.backend.chat(entry.target, messages, params), tried
            except ExpertFailed as e:
                log.warning(
                    "expert %s failed (%s); %s",
                    name,
                    e,
                    "falling back" if name != order[-1] else "no fallback left",
                )
                last = e
        assert last is not None
        raise last

    def _chat_outcome(
        self,
        req: ChatCompletionRequest,
        routed: Routed,
        entry: Entry,
        gen: Generation,
        tried: list[str],
        latency_ms: float,
    ) -> Outcome:
        s, d = entry.spec, routed.decision
        cost = (
            gen.prompt_tokens * s.price_in_per_1k + gen.completion_tokens * s.price_out_per_1k
        ) / 1000
        routing = _routing_object(routed, entry, cost, latency_ms, tried)
        body = {
            "id": f"chatcmpl-{d.decision_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": entry.spec.name,
            "choices": [
                {
                    "index": 0,
                    "finish_reason": gen.finish_reason,
                    "message": {"role": "assistant", "content": gen.text},
                }
            ],
            "usage": {
                "prompt_tokens": gen.prompt_tokens,
                "completion_tokens": gen.completion_tokens,
                "total_tokens": gen.prompt_tokens + gen.completion_tokens,
            },
            "routing": routing,
        }
        return Outcome(body=body, headers=routing_headers(routing))

    async def embeddings(self, req: EmbeddingRequest) -> Outcome:
        t0 = time.perf_counter()
        _refuse_unsupported(req.routing)
        texts = req.texts()
        if not texts or any(not t for t in texts):
            raise InvalidInput(
                "input must be a non-empty string or list of non-empty strings", field="input"
            )
        routed = self.route(
            texts[0],
            model=req.model,
            task="embed",
            objective=Objective.from_options(req.routing),
            max_tokens=1,
        )
        entry = routed.catalog.entries[routed.decision.expert]
        vectors = await self.backend.embed(entry.target, texts)
        tokens = sum(estimate_tokens(t) for t in texts)
        cost = tokens * entry.spec.price_in_per_1k / 1000
        routing = _routing_object(
            routed, entry, cost, (time.perf_counter() - t0) * 1000, [entry.spec.name]
        )
        body = {
            "object": "list",
            "model": entry.spec.name,
            "data": [
                {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)
            ],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "routing": routing,
        }
        return Outcome(body=body, headers=routing_headers(routing))


def _refuse_unsupported(opts: RoutingOptions | None) -> None:
    if opts is None:
        return
    if opts.strategy != "single":
        raise InvalidInput(
            f"routing.strategy {opts.strategy!r} is not available in this "
            "release (supported: 'single')",
            field="routing.strategy",
        )
    if opts.token_routing is not None and opts.token_routing.router != "none":
        raise InvalidInput(
            f"routing.token_routing.router {opts.token_routing.router!r} is not "
            "available in this release (supported: 'none')",
            field="routing.token_routing.router",
        )


def _query_text(messages: Sequence[Message]) -> str:
    """The routed query: the last user message (the whole conversation when there is none)."""
    for m in reversed(messages):
        if m["role"] == "user" and m["content"]:
            return m["content"]
    text = "\n".join(m["content"] for m in messages if m["content"])
    if not text:
        raise InvalidInput("messages contain no text to answer", field="messages")
    return text


def _routing_object(
    routed: Routed, entry: Entry, cost: float, latency_ms: float, tried: list[str]
) -> dict[str, Any]:
    d = routed.decision
    chosen = routed.candidates.get(entry.spec.name)
    top = sorted(d.scores.items(), key=lambda kv: -kv[1])
    return {
        "decision_id": d.decision_id,
        "router": d.router,
        "expert": entry.spec.name,
        "experts": list(d.experts),
        "weights": list(d.weights),
        "confidence": round(d.confidence, 6),
        "reason": d.reason,
        "scores": {k: round(v, 6) for k, v in top},
        "estimated_cost": chosen.est_cost if chosen else None,
        "estimated_latency_ms": chosen.est_latency_ms if chosen else None,
        "cost": cost,
        "active_parameters": entry.candidate.params_active,
        "latency_ms": round(latency_ms, 3),
        "fallbacks": tried[1:],
        "registry_version": routed.catalog.version,
    }


def routing_headers(routing: Mapping[str, Any]) -> dict[str, str]:
    """The x-concilium-* response headers for a routing object."""
    top5 = dict(list(routing["scores"].items())[:5])
    return {
        "x-concilium-decision-id": str(routing["decision_id"]),
        "x-concilium-router": str(routing["router"]),
        "x-concilium-expert": str(routing["expert"]),
        "x-concilium-confidence": f"{routing['confidence']:.4f}",
        "x-concilium-scores": json.dumps(top5, separators=(",", ":")),
        "x-concilium-estimated-cost": f"{routing['estimated_cost'] or 0:.8g}",
        "x-concilium-cost": f"{routing['cost']:.8g}",
        "x-concilium-active-params": str(routing["active_parameters"] or ""),
        "x-concilium-latency-ms": f"{routing['latency_ms']:.1f}",
    }
