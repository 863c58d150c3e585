"""request → objective → route → dispatch (with fallback inside the allowed set) → response.

The orchestrator owns no model: it asks a router for a `RouteDecision` over the candidates that
satisfy the caller's objective, then executes it on an
`ExpertBackend` (in-process pool or Ray Serve).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from concilium.errors import ExpertFailed, ExpertTimeout, InvalidInput
from concilium.experts.base import (
    FALLBACK_LEFT,
    ExpertBackend,
    Generation,
    GenParams,
    Message,
    StreamItem,
)
from concilium.orchestrator import token_plan
from concilium.orchestrator.catalog import CatalogCache, Entry, cost_of, estimate_tokens
from concilium.orchestrator.deadline import Deadline
from concilium.orchestrator.encoding import BatchingEncoder, Encoded
from concilium.orchestrator.objective import Objective
from concilium.orchestrator.planning import Plan
from concilium.orchestrator.responses import (
    chat_body,
    embeddings_body,
    routing_headers,
    routing_object,
    sse_whole,
)
from concilium.orchestrator.routing import QueryRouting, Routed
from concilium.orchestrator.schemas import ChatCompletionRequest, EmbeddingRequest, RoutingOptions
from concilium.orchestrator.strategies import Ran, plan_for, run_cascade, run_ensemble
from concilium.orchestrator.streaming import sse_chunks
from concilium.outcomes.store import Logged, OutcomeStore
from concilium.registry.index import TextEncoder
from concilium.registry.registry import Registry
from concilium.routers.base import QueryRouter

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_CASCADE_THRESHOLD = -0.1  # mean token log-probability a cascade stage must reach


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
        request_timeout_s: float = 120.0,
        outcomes: OutcomeStore | None = None,
        cascade_threshold: float = DEFAULT_CASCADE_THRESHOLD,
        cascade_adequacy: float = 0.5,
        fusion: str = "vote",
    ) -> None:
        self.registry, self.backend, self.encoder = registry, backend, encoder
        self.catalogs = CatalogCache(registry, refresh_s=refresh_s)
        self.routing = QueryRouting(
            self.catalogs, encoder, routers, default_router, default_max_tokens
        )
        self.route = self.routing.route  # the routing step alone (CLI `route`, evaluation)
        self.routers, self.default_router = self.routing.routers, default_router
        self.default_max_tokens = default_max_tokens
        self.max_fallbacks = max_fallbacks
        self.request_timeout_s = request_timeout_s
        self.outcomes = outcomes
        self.cascade_threshold = cascade_threshold
        self.cascade_adequacy = cascade_adequacy
        self.fusion = fusion  # ensembles' default: "vote" | "logits"
        self.query_encoder = BatchingEncoder(encoder)

    # -- execution ------------------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest) -> Outcome:
        t0 = time.perf_counter()
        deadline = Deadline.of(req.routing, self.request_timeout_s)
        routed, messages, params = await self._routed_chat(req, deadline)
        if _multi(routed):
            ran = await self._run_plan(routed, messages, params, deadline)
            latency_ms = (time.perf_counter() - t0) * 1000
            out = self._chat_outcome(
                req, routed, ran.chosen.entry, ran.chosen.generation, [], latency_ms, ran=ran
            )
        else:
            expert, gen, tried = await self._dispatch(routed, messages, params, deadline)
            latency_ms = (time.perf_counter() - t0) * 1000
            out = self._chat_outcome(req, routed, expert, gen, tried, latency_ms)
        self._log(routed, out.body["routing"])
        return out

    # -- multi-expert plans (ensemble, cascade) ---------------------------------------------------
    def plan(self, routed: Routed) -> Plan:
        """The ensemble or cascade for a routed request, inside its objective's budget."""
        return plan_for(routed, self.cascade_adequacy)

    async def _run_plan(
        self, routed: Routed, messages: list[Message], params: GenParams, deadline: Deadline
    ) -> Ran:
        plan = self.plan(routed)
        entries = [routed.catalog.entries[n] for n in plan.experts]
        if plan.strategy == "ensemble":
            fusion = routed.objective.fusion or self.fusion
            return await run_ensemble(
                self.backend, entries, plan, messages, params, deadline, fusion
            )
        return await run_cascade(
            self.backend, entries, plan, messages, params, deadline, self.cascade_threshold
        )

    def _log(self, routed: Routed, routing: Mapping[str, Any]) -> None:
        """Queue the request for the outcome store (feedback attaches quality later)."""
        if self.outcomes is None:
            return
        ran = [m["expert"] for m in routing.get("members", [])] or [routing["expert"]]
        self.outcomes.log(
            Logged(
                decision_id=str(routing["decision_id"]),
                query=routed.text,
                embedding=routed.embedding,
                router=str(routing["router"]),
                strategy=str(routing.get("strategy", "single")),
                experts=tuple(ran),
                expert=str(routing["expert"]),
                cost=float(routing["cost"]),
                latency_ms=float(routing["latency_ms"]),
                active_params=routing.get("active_parameters"),
            )
        )

    async def _routed_chat(
        self, req: ChatCompletionRequest, deadline: Deadline
    ) -> tuple[Routed, list[Message], GenParams]:
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
            min_tokens=req.min_tokens,
        )
        text = _query_text(messages)
        routed = self.route(
            text,
            model=req.model,
            objective=Objective.from_options(req.routing),
            max_tokens=params.max_tokens,
            encoded=await deadline.run(self._embed_query(req.model, text)),
        )
        tr = token_plan.requested(req.model, req.routing)
        if tr is not None:
            routed, mix = token_plan.mixture_plan(
                routed, tr, self.registry, routed.objective.strategy
            )
            params = dataclasses.replace(params, token_routing=mix)
        return routed, messages, params

    async def _embed_query(self, model: str, text: str) -> Encoded | None:
        """The query's embedding and token embeddings when a router will need them (batched
        with concurrent requests)."""
        if model == "auto" or model.startswith("router-") or model.endswith(":mixture"):
            return await self.query_encoder.encode(text)
        return None

    def _order(self, routed: Routed) -> list[str]:
        """The chosen expert(s), then fallbacks by score: all inside the allowed set and the
        fallback pool (`routed.candidates`, which a token mixture narrows to its adapters)."""
        d = routed.decision
        order = list(d.experts) + [n for n in d.ranked() if n not in d.experts]
        order = [n for n in order if n in routed.candidates]
        return order[: 1 + self.max_fallbacks] if d.router != "direct" else order[:1]

    async def _dispatch(
        self, routed: Routed, messages: list[Message], params: GenParams, deadline: Deadline
    ) -> tuple[Entry, Generation, list[str]]:
        return await self._first_answer(
            routed, deadline, lambda e: self.backend.chat(e.target, messages, params)
        )

    async def _first_answer(
        self, routed: Routed, deadline: Deadline, attempt: Callable[[Entry], Awaitable[T]]
    ) -> tuple[Entry, T, list[str]]:
        """Try the chosen expert, then the fallbacks, until one answers inside the deadline."""
        order = self._order(routed)
        tried: list[str] = []
        last: ExpertFailed | None = None
        for name in order:
            entry = routed.catalog.entries[name]
            tried.append(name)
            left = FALLBACK_LEFT.set(name != order[-1])  # the backend may give up early
            try:
                return entry, await deadline.run(attempt(entry)), tried
            except ExpertFailed as e:
                if isinstance(e, ExpertTimeout) and deadline.spent:
                    raise  # the caller's deadline is spent: no fallback can answer in time
                _log_failure(name, e, last_one=name == order[-1])
                last = e
            finally:
                FALLBACK_LEFT.reset(left)
        assert last is not None
        raise last

    # -- streaming ------------------------------------------------------------------------------
    async def chat_stream(
        self, req: ChatCompletionRequest
    ) -> tuple[dict[str, str], AsyncIterator[bytes]]:
        """Headers (known once the first piece arrived) and the SSE byte stream.

        Fallback to the next candidate happens only before anything was streamed; a failure
        after that ends the stream with an explicit SSE error event.
        """
        t0 = time.perf_counter()
        deadline = Deadline.of(req.routing, self.request_timeout_s)
        routed, messages, params = await self._routed_chat(req, deadline)
        if _multi(routed):  # the answer exists only after fusion/escalation: one piece
            ran = await self._run_plan(routed, messages, params, deadline)
            out = self._chat_outcome(
                req,
                routed,
                ran.chosen.entry,
                ran.chosen.generation,
                [],
                (time.perf_counter() - t0) * 1000,
                ran=ran,
            )
            self._log(routed, out.body["routing"])
            return out.headers, sse_whole(out.body)
        entry, first, stream, tried = await self._open_stream(routed, messages, params, deadline)
        routing = routing_object(routed, entry, 0.0, (time.perf_counter() - t0) * 1000, tried)
        events = sse_chunks(
            routed, entry, first, stream, tried, deadline, t0, lambda r: self._log(routed, r)
        )
        return routing_headers(routing), events

    async def _open_stream(
        self, routed: Routed, messages: list[Message], params: GenParams, deadline: Deadline
    ) -> tuple[Entry, StreamItem, AsyncIterator[StreamItem], list[str]]:
        async def first_piece(entry: Entry) -> tuple[AsyncIterator[StreamItem], StreamItem]:
            stream = self.backend.chat_stream(entry.target, messages, params)
            return stream, await anext(stream)

        entry, (stream, first), tried = await self._first_answer(routed, deadline, first_piece)
        return entry, first, stream, tried

    def _chat_outcome(
        self,
        req: ChatCompletionRequest,
        routed: Routed,
        entry: Entry,
        gen: Generation | None,
        tried: list[str],
        latency_ms: float,
        *,
        ran: Ran | None = None,
    ) -> Outcome:
        assert gen is not None
        cost = cost_of(entry, gen) if ran is None else ran.cost
        routing = routing_object(routed, entry, cost, latency_ms, tried, ran=ran)
        if gen.routing_summary is not None:
            routing["token_routing"] = gen.routing_summary
        body = chat_body(routed, entry, gen, routing)
        return Outcome(body=body, headers=routing_headers(routing))

    async def embeddings(self, req: EmbeddingRequest) -> Outcome:
        t0 = time.perf_counter()
        deadline = Deadline.of(req.routing, self.request_timeout_s)
        _refuse_unsupported(req.routing)
        texts = req.texts()
        if not texts or any(not t for t in texts):
            raise InvalidInput(
                "input must be a non-empty string or list of non-empty strings", field="input"
            )
        tokens = sum(estimate_tokens(t) for t in texts)
        routed = self.route(
            texts[0],
            model=req.model,
            task="embed",
            objective=Objective.from_options(req.routing),
            max_tokens=1,
            encoded=await deadline.run(self._embed_query(req.model, texts[0])),
            prompt_tokens=tokens,  # the objective's cost and energy cover every input
        )
        entry = routed.catalog.entries[routed.decision.expert]
        vectors = await deadline.run(self.backend.embed(entry.target, texts))
        _check_dimensions(req.dimensions, entry.spec.name, vectors)
        cost = tokens * entry.spec.price_in_per_1k / 1000
        routing = routing_object(
            routed, entry, cost, (time.perf_counter() - t0) * 1000, [entry.spec.name]
        )
        self._log(routed, routing)
        body = embeddings_body(entry, vectors, req.encoding_format, tokens, routing)
        return Outcome(body=body, headers=routing_headers(routing))


def _log_failure(name: str, err: ExpertFailed, *, last_one: bool) -> None:
    log.warning(
        "expert %s failed (%s); %s", name, err, "no fallback left" if last_one else "falling back"
    )


def _multi(routed: Routed) -> bool:
    """Whether the request runs a multi-expert plan (a named expert always runs alone)."""
    return routed.objective.strategy != "single" and routed.decision.router != "direct"


def _refuse_unsupported(opts: RoutingOptions | None) -> None:
    """Embeddings take no token-level mixture, and one expert embeds each request (no cascade
    or ensemble: vectors of different experts are not comparable)."""
    if opts is not None and opts.token_routing is not None and opts.token_routing.router != "none":
        raise InvalidInput(
            "routing.token_routing applies to chat generation, not embeddings",
            field="routing.token_routing.router",
        )
    if opts is not None and opts.strategy != "single":
        raise InvalidInput(
            f"routing.strategy {opts.strategy!r} applies to chat generation; embeddings are "
            "routed to one expert (strategy 'single')",
            field="routing.strategy",
        )


def _check_dimensions(dimensions: int | None, expert: str, vectors: list[list[float]]) -> None:
    """OpenAI's `dimensions` is a no-op when it is the expert's own size (known once it has
    embedded: a remote expert declares none); concilium never shortens vectors."""
    size = len(vectors[0]) if vectors else None
    if dimensions is not None and size is not None and dimensions != size:
        raise InvalidInput(
            f"dimensions {dimensions}: expert {expert!r} embeds at {size} dimensions and "
            "vectors are not shortened (omit dimensions, or ask for that size)",
            field="dimensions",
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
