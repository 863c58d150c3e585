"""A single expert's answer as OpenAI server-sent events, the routing object in the last chunk.

The first piece has already arrived when this starts (fallback happens only before anything was
streamed); a failure after that ends the stream with an explicit SSE error event.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from concilium.errors import ExpertFailed
from concilium.experts.base import Generation, StreamItem
from concilium.orchestrator.catalog import Entry, cost_of
from concilium.orchestrator.deadline import Deadline
from concilium.orchestrator.responses import routing_object, sse_error, sse_event, usage
from concilium.orchestrator.routing import Routed

log = logging.getLogger(__name__)


async def sse_chunks(
    routed: Routed,
    entry: Entry,
    first: StreamItem,
    stream: AsyncIterator[StreamItem],
    tried: list[str],
    deadline: Deadline,
    t0: float,
    on_done: Callable[[Mapping[str, Any]], None],
) -> AsyncIterator[bytes]:
    """The SSE byte stream; `on_done(routing)` once the expert finished (outcome logging)."""
    meta = {
        "id": f"chatcmpl-{routed.decision.decision_id}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": entry.spec.name,
    }
    item = first
    try:  # from the first chunk on: a client that stops reading closes the expert's stream
        yield sse_event(meta, {"role": "assistant", "content": ""})
        while not isinstance(item, Generation):
            yield sse_event(meta, {"content": item.text})
            item = await deadline.run(anext(stream))
    except ExpertFailed as e:
        yield sse_error(e.message, type(e).__name__, e.field)
        return
    except Exception:
        log.exception("stream of %s broke", entry.spec.name)
        yield sse_error("internal error while streaming", "internal_error")
        return
    finally:
        await aclose(stream)
    cost = cost_of(entry, item)
    routing = routing_object(routed, entry, cost, (time.perf_counter() - t0) * 1000, tried)
    if item.routing_summary is not None:
        routing["token_routing"] = item.routing_summary
    on_done(routing)
    yield sse_event(meta, {}, item.finish_reason, usage=usage(item), routing=routing)
    yield b"data: [DONE]\n\n"


async def aclose(stream: AsyncIterator[StreamItem]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception as e:  # a stream that died while closing: nothing left to cancel
            log.debug("closing an expert stream failed: %s", e)
