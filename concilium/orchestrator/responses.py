"""The pieces of an OpenAI-shaped answer: the `routing` object and its x-concilium-* headers,
usage, SSE chunks and error events, embeddings' encodings."""

from __future__ import annotations

import base64
import json
import math
import time
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np

from concilium.experts.base import Generation

if TYPE_CHECKING:
    from concilium.orchestrator.catalog import Entry
    from concilium.orchestrator.routing import Routed
    from concilium.orchestrator.strategies import Ran


def encode_vector(vector: list[float], fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return vector


def usage(gen: Generation) -> dict[str, int]:
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
        "total_tokens": gen.prompt_tokens + gen.completion_tokens,
    }


def sse_event(
    meta: dict[str, Any], delta: dict[str, Any], finish: str | None = None, **extra: Any
) -> bytes:
    chunk = meta | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]} | extra
    return f"data: {json.dumps(chunk)}\n\n".encode()


async def sse_whole(body: dict[str, Any]) -> AsyncIterator[bytes]:
    """A finished chat completion as an SSE stream: role, the whole content, the final chunk."""
    meta = {k: body[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    choice = body["choices"][0]
    yield sse_event(meta, {"role": "assistant", "content": ""})
    yield sse_event(meta, {"content": choice["message"]["content"]})
    yield sse_event(meta, {}, choice["finish_reason"], usage=body["usage"], routing=body["routing"])
    yield b"data: [DONE]\n\n"


def sse_error(message: str, err_type: str, param: str | None = None) -> bytes:
    """An explicit SSE error event (OpenAI clients raise it) ending a broken stream; `param`
    names the field at fault, as in a plain error answer (a deadline: routing.deadline_ms)."""
    body = {"error": {"message": message, "type": err_type, "param": param, "code": None}}
    return f"data: {json.dumps(body)}\n\n".encode()


def routing_object(
    routed: Routed,
    entry: Entry,
    cost: float,
    latency_ms: float,
    tried: list[str],
    *,
    ran: Ran | None = None,
) -> dict[str, Any]:
    d = routed.decision
    chosen = routed.candidates.get(entry.spec.name)
    top = sorted(d.scores.items(), key=lambda kv: -kv[1])
    out = {
        "decision_id": d.decision_id,
        "router": d.router,
        "expert": entry.spec.name,
        "experts": list(d.experts),
        "weights": list(d.weights),
        "confidence": round(d.confidence, 6),
        "reason": d.reason,
        "scores": {k: round(v, 6) for k, v in top},
        "estimated_cost": _finite(chosen.est_cost) if chosen else None,
        "estimated_latency_ms": _finite(chosen.est_latency_ms) if chosen else None,
        "cost": cost,
        "active_parameters": (
            entry.candidate.params_active if routed.active_params is None else routed.active_params
        ),
        "latency_ms": round(latency_ms, 3),
        "fallbacks": tried[1:],
        "registry_version": routed.catalog.version,
        "strategy": "single" if ran is None else ran.plan.strategy,
    }
    if ran is not None:
        p = ran.plan
        out |= {
            "experts": list(p.experts),
            "weights": [round(w, 6) for w in p.weights],
            "estimated_cost": _finite(p.est_cost),
            "estimated_latency_ms": _finite(p.est_latency_ms),
            "active_parameters": ran.active_params,
            "plan": {"value": round(p.value, 6), "exact": p.exact},
            "members": [m.summary() for m in ran.members],
            **ran.detail,
        }
    return out


def _finite(x: float | None) -> float | None:
    """None for an estimate JSON cannot hold (a legacy spec's infinite expected latency)."""
    return x if x is None or math.isfinite(x) else None


def header_value(text: str) -> str:
    """`text` as a valid HTTP header value: percent-encoded past the unreserved characters, so
    a registry name (NAME_RE) is unchanged and a legacy one ending in a newline is no error."""
    return quote(text, safe="")


def routing_headers(routing: Mapping[str, Any]) -> dict[str, str]:
    """The x-concilium-* response headers for a routing object."""
    top5 = dict(list(routing["scores"].items())[:5])
    return {
        "x-concilium-decision-id": str(routing["decision_id"]),
        "x-concilium-router": header_value(str(routing["router"])),
        "x-concilium-expert": header_value(str(routing["expert"])),
        "x-concilium-confidence": f"{routing['confidence']:.4f}",
        "x-concilium-scores": json.dumps(top5, separators=(",", ":")),
        "x-concilium-estimated-cost": f"{routing['estimated_cost'] or 0:.8g}",
        "x-concilium-cost": f"{routing['cost']:.8g}",
        "x-concilium-active-params": str(routing["active_parameters"] or ""),
        "x-concilium-latency-ms": f"{routing['latency_ms']:.1f}",
    }


def chat_body(
    routed: Routed, entry: Entry, gen: Generation, routing: dict[str, Any]
) -> dict[str, Any]:
    """A whole chat completion with its routing object."""
    return {
        "id": f"chatcmpl-{routed.decision.decision_id}",
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
        "usage": usage(gen),
        "routing": routing,
    }


def embeddings_body(
    entry: Entry, vectors: list[list[float]], fmt: str, tokens: int, routing: dict[str, Any]
) -> dict[str, Any]:
    """An embeddings list in `fmt` (float or base64) with its routing object."""
    return {
        "object": "list",
        "model": entry.spec.name,
        "data": [
            {"object": "embedding", "index": i, "embedding": encode_vector(v, fmt)}
            for i, v in enumerate(vectors)
        ],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "routing": routing,
    }
