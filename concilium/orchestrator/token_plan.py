"""From a query-level decision to a token-level mixture (Glider's global prior).

A request asks for a per-token mixture of adapters with `routing.token_routing` (router
`phatgoose` | `arrow`) or with `model: "<base>:mixture"` (Arrow unless told otherwise). The query
router has already scored the candidates; the top-M LoRA adapters of the routed expert's base
become the mixture's candidates, and the log of their gate (predicted quality or softmax of the
scores), times PRIOR_WEIGHT, is the prior the replica adds to every token's router logits.

The answer of a mixture reports as its active parameters the base model's plus those of its
`top_k` largest candidate adapters: each token runs the base and at most `top_k` of them, so
this bounds every token's count from above (`mixture_active_params`); `uniform` merges every
candidate on every token, so all of them count there.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from concilium.errors import InvalidInput
from concilium.experts.base import TokenRoutingParams
from concilium.orchestrator.schemas import RoutingOptions, TokenRouting

if TYPE_CHECKING:
    from concilium.orchestrator.catalog import Catalog
    from concilium.orchestrator.routing import Routed
    from concilium.registry.registry import Registry
    from concilium.routers.base import Candidate

MIXTURE = "mixture"  # model "<base>:mixture"
DEFAULT_CANDIDATES = 8  # adapters mixed when routing.token_routing.candidates is not set
# Strength of the global prior: the replica adds log_softmax(prior) to every token's router logits.
# 10 was chosen on a dev split of the adapters' own train_examples (never the held-out set) in
# benchmarks/token_routing_quality.py: weight 1 → 0.646, 3 → 0.854, 10 → 0.917 there.
PRIOR_WEIGHT = 10.0


def requested(model: str, opts: RoutingOptions | None) -> TokenRouting | None:
    """The token routing a request asks for, or None."""
    tr = opts.token_routing if opts is not None else None
    if tr is not None and tr.router != "none":
        return tr
    if model.endswith(":" + MIXTURE):
        return (
            TokenRouting(router="arrow")
            if tr is None
            else tr.model_copy(update={"router": "arrow"})
        )
    return None


def mixture_plan(
    routed: Routed, tr: TokenRouting, registry: Registry, strategy: str
) -> tuple[Routed, TokenRoutingParams]:
    """The mixture's candidates and prior; `routed` narrowed to them (the fallback pool) and
    carrying the mixture's active parameters."""
    from concilium.routers.base import gate_qualities

    field = "routing.token_routing"
    if strategy != "single":
        raise InvalidInput(
            f"{field} mixes adapters inside one replica; it cannot be combined with "
            f"routing.strategy {strategy!r}",
            field=field,
        )
    d = routed.decision
    chosen = routed.candidates[d.expert]
    if chosen.kind != "lora" or chosen.base is None:
        raise InvalidInput(
            f"{field} mixes the LoRA adapters of one base model, but the request was routed to "
            f"{chosen.name!r}, a {chosen.kind} expert",
            field=field,
        )
    gates = gate_qualities(d)
    same_base = [
        c for c in routed.candidates.values() if c.kind == "lora" and c.base == chosen.base
    ]
    same_base.sort(key=lambda c: -gates.get(c.name, 0.0))
    keep = same_base[: tr.candidates or DEFAULT_CANDIDATES]
    adapters, vectors = [], []
    for c in keep:
        entry = routed.catalog.entries[c.name]
        path = entry.target.adapter_path
        if path is None:
            raise InvalidInput(f"adapter {c.name!r} has no stored files", field=field)
        adapters.append((c.name, path))
        path_of = registry.router_artifact(entry.record, tr.router)
        vectors.append(None if path_of is None else str(path_of))
    if tr.router == "phatgoose" and any(v is None for v in vectors):
        missing = [a for (a, _), v in zip(adapters, vectors, strict=True) if v is None]
        raise InvalidInput(
            f"{field}.router 'phatgoose': no trained gate yet for {missing} (gates are trained "
            "at registration from the spec's train_examples); use 'arrow' or fewer candidates",
            field=field + ".router",
        )
    prior = tuple(PRIOR_WEIGHT * math.log(max(gates.get(n, 0.0), 1e-6)) for n, _ in adapters)
    params = TokenRoutingParams(
        router=tr.router,
        top_k=min(tr.top_k, len(adapters)),
        adapters=tuple(adapters),
        prior=prior,
        vectors=tuple(vectors),
    )
    per_token = len(adapters) if tr.router == "uniform" else params.top_k  # uniform: all of them
    narrowed = dataclasses.replace(
        routed,
        candidates={c.name: c for c in keep},
        active_params=mixture_active_params(routed.catalog, chosen.base, keep, per_token),
    )
    return narrowed, params


def mixture_active_params(
    catalog: Catalog, base: str, keep: Sequence[Candidate], top_k: int
) -> int | None:
    """Active parameters of a token mixture of `base`'s adapters `keep`, an upper bound per
    token: the base model's plus the `top_k` largest of the candidates' own adapter parameters
    (a candidate's ``params_active`` less the base's). None when a count is unknown."""
    entry = catalog.entries.get(base)
    base_params = None if entry is None else entry.candidate.params_active
    counts = [c.params_active for c in keep]
    if base_params is None or None in counts:
        return None
    own = sorted((max(n - base_params, 0) for n in counts if n is not None), reverse=True)
    return base_params + sum(own[:top_k])
