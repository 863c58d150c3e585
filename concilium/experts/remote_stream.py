"""A remote expert's streamed chat completion: OpenAI SSE chunks in, Deltas and a Generation out.

The whole exchange is bounded by one deadline (each read waits at most for what is left of it),
the stream by `MAX_BODY_BYTES` and each line by `MAX_LINE_BYTES`. Failures map onto the tree as a
plain call's do; an endpoint that ignores ``stream: true`` and answers with one JSON completion is
read as one piece. A stream that ends without a finish reason or ``[DONE]`` is ExpertUnavailable
(the endpoint went away), an ``error`` chunk is ExpertFailed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from concilium.errors import ExpertFailed, ExpertUnavailable
from concilium.experts.base import Delta, Generation, StreamItem
from concilium.experts.sse import sse_data

if TYPE_CHECKING:
    from concilium.experts.remote import RemoteExpert

MAX_LINE_BYTES = 1 << 20  # one SSE line (one chunk's JSON) longer than this is refused


async def stream_chat(
    expert: RemoteExpert, body: dict[str, Any], limit: float, max_total: int
) -> AsyncGenerator[StreamItem, None]:
    """POST `body` (``stream: true``) to the expert's /chat/completions; yield what it streams.
    An endpoint that refuses ``stream_options`` with a 400 naming it is asked once more without
    (usage then falls back to counting chunks)."""
    url = expert.spec.url.rstrip("/") + "/chat/completions"
    end = asyncio.get_running_loop().time() + limit
    with expert.transport_errors(url, limit):
        response = await _open(expert, url, body, end, limit)
        if response.status_code == 400 and "stream_options" in body:
            head = await _close_reading(response, end)
            if b"stream_options" not in head:
                expert.check_status(400, head)
            plain = {k: v for k, v in body.items() if k != "stream_options"}
            response = await _open(expert, url, plain, end, limit)
        try:
            async with aclosing(_items(expert, response, end, max_total)) as items:
                async for item in items:
                    yield item
        finally:
            await response.aclose()


async def _open(
    expert: RemoteExpert, url: str, body: dict[str, Any], end: float, limit: float
) -> Any:
    request = expert.client.build_request(
        "POST", url, json=body, headers=expert.headers(), timeout=limit
    )
    async with asyncio.timeout_at(end):
        return await expert.client.send(request, stream=True)


async def _close_reading(response: Any, end: float) -> bytes:
    """The start of `response`'s body; the response closed."""
    try:
        async with asyncio.timeout_at(end):
            return await _head(response)
    finally:
        await response.aclose()


async def _items(
    expert: RemoteExpert, response: Any, end: float, max_total: int
) -> AsyncGenerator[StreamItem, None]:
    who = f"remote expert {expert.spec.name!r}"
    if response.status_code >= 300:
        async with asyncio.timeout_at(end):
            head = await _head(response)
        expert.check_status(response.status_code, head)
    if "text/event-stream" not in response.headers.get("content-type", "text/event-stream").lower():
        async with asyncio.timeout_at(end):
            whole = await read_body(response, max_total, who)
        gen = expert.parse_completion(whole)
        yield Delta(gen.text)
        yield gen
        return
    state = _State(who)
    events = sse_data(response.aiter_bytes(), max_line=MAX_LINE_BYTES, max_total=max_total, who=who)
    async with aclosing(events):
        while True:
            async with asyncio.timeout_at(end):
                data = await anext(events, None)
            if data is None or data.strip() == "[DONE]":
                break
            piece = state.take(data)
            if piece:
                yield Delta(piece)
    yield state.generation(finished=data is not None)


class _State:
    """What the chunks so far said: the text, the finish reason, the usage."""

    def __init__(self, who: str) -> None:
        self.who = who
        self.text: list[str] = []
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None

    def take(self, data: str) -> str:
        """Read one chunk; return its content delta ('' when it has none)."""
        try:
            chunk = json.loads(data)
            if not isinstance(chunk, dict):
                raise TypeError(f"a chunk is a {type(chunk).__name__}, not an object")
            if chunk.get("error") is not None:
                raise ExpertFailed(f"{self.who} streamed an error: {str(chunk['error'])[:200]}")
            if chunk.get("usage") is not None:
                if not isinstance(chunk["usage"], dict):
                    raise TypeError(f"usage {chunk['usage']!r} is not an object")
                self.usage = chunk["usage"]
            choices = chunk.get("choices") or []
            if not choices:
                return ""
            return self._choice(choices[0])
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise ExpertFailed(f"{self.who} streamed a malformed chunk: {e!r}") from e

    def _choice(self, choice: dict[str, Any]) -> str:
        piece = (choice.get("delta") or {}).get("content") or ""
        finish = choice.get("finish_reason")
        if not isinstance(piece, str) or not isinstance(finish, str | None):
            raise TypeError(f"content {piece!r} / finish_reason {finish!r} is not a string")
        self.finish = finish or self.finish
        if piece:
            self.text.append(piece)
        return piece

    def generation(self, *, finished: bool) -> Generation:
        if not finished and self.finish is None:
            raise ExpertUnavailable(f"{self.who} ended its stream before finishing")
        usage = self.usage if self.usage is not None else {"completion_tokens": len(self.text)}
        try:
            return generation("".join(self.text), usage, self.finish or "stop")
        except (TypeError, ValueError, OverflowError) as e:
            raise ExpertFailed(f"{self.who} streamed a malformed usage: {e!r}") from e


def generation(text: str, usage: Any, finish: str) -> Generation:
    """A Generation from an OpenAI answer's text, usage object and finish reason."""
    if not isinstance(usage, dict):
        raise TypeError(f"usage {usage!r} is not an object")
    return Generation(
        text=text,
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        completion_tokens=int(usage.get("completion_tokens", 0)),
        finish_reason=finish,
    )


async def _head(response: Any, cap: int = 4096) -> bytes:
    """The first bytes of an error body (enough for its message)."""
    out = b""
    async for chunk in response.aiter_bytes():
        out += chunk
        if len(out) >= cap:
            break
    return out[:cap]


async def read_body(response: Any, cap: int, who: str) -> bytes:
    """A response's whole body; ExpertFailed, the rest unread, once it passes `cap` bytes."""
    out, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > cap:
            raise ExpertFailed(f"{who} sent a body over {cap} bytes")
        out.append(chunk)
    return b"".join(out)
