"""A remote OpenAI-compatible expert, called over an injected `httpx.AsyncClient`.

Transport failures map onto the exception tree: timeouts (of the whole exchange, not of each read)
→ ExpertTimeout, connection errors and 5xx/429 → ExpertUnavailable, other non-2xx, a body over
`MAX_BODY_BYTES` or a malformed one → ExpertFailed. The API key is read
from the environment variable the spec names, at call time (never stored in the registry).
`chat_stream` passes the endpoint's SSE stream on as it arrives (`remote_stream`).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from collections.abc import AsyncGenerator, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import httpx

from concilium.errors import ExpertFailed, ExpertTimeout, ExpertUnavailable
from concilium.experts.base import Generation, GenParams, Message, StreamItem
from concilium.experts.remote_stream import generation, read_body, stream_chat
from concilium.registry.specs import RemoteSpec

MAX_BODY_BYTES = 64 * 2**20  # a response body (or a whole stream) larger than this is refused


class RemoteExpert:
    """Chat completions and embeddings against one remote endpoint."""

    def __init__(self, spec: RemoteSpec, client: httpx.AsyncClient) -> None:
        self.spec = spec
        self.client = client

    def headers(self) -> dict[str, str]:
        env = self.spec.api_key_env
        key = os.environ.get(env) if env else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def chat(
        self, messages: Sequence[Message], params: GenParams, timeout: float | None = None
    ) -> Generation:
        content = await self._post(
            "/chat/completions", _chat_body(self.spec, params, messages), timeout
        )
        return self.parse_completion(content)

    def chat_stream(
        self, messages: Sequence[Message], params: GenParams, timeout: float | None = None
    ) -> AsyncGenerator[StreamItem, None]:
        """The answer as it is generated (``stream: true``): each content delta of the endpoint's
        SSE chunks a Delta, then the Generation (usage from the final chunk, asked for with
        ``stream_options.include_usage``; without one, each content chunk counts as a token).
        The whole stream is bounded by the timeout, as a plain call is."""
        body = _chat_body(self.spec, params, messages) | {
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        return stream_chat(self, body, timeout or self.spec.timeout_s, MAX_BODY_BYTES)

    async def embed(self, texts: Sequence[str], timeout: float | None = None) -> list[list[float]]:
        body = {"model": self.spec.model_name, "input": list(texts)}
        data = self._object(await self._post("/embeddings", body, timeout))
        try:
            rows = sorted(data["data"], key=lambda d: d["index"])
            if [d["index"] for d in rows] != list(range(len(texts))):
                raise ValueError(f"indices {[d['index'] for d in rows]} for {len(texts)} inputs")
            vecs = [[float(x) for x in _array(d["embedding"])] for d in rows]
            if not all(math.isfinite(x) for v in vecs for x in v):
                raise ValueError("an embedding holds a non-finite value")
            return vecs
        except (KeyError, TypeError, ValueError) as e:
            raise ExpertFailed(
                f"remote expert {self.spec.name!r} returned malformed embeddings: {e!r}"
            ) from e

    def parse_completion(self, content: bytes) -> Generation:
        """A non-streamed chat completion body as a Generation, or ExpertFailed."""
        data = self._object(content)
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
            finish = choice.get("finish_reason") or "stop"
            if not isinstance(text, str) or not isinstance(finish, str):
                raise TypeError(f"content {text!r} / finish_reason {finish!r} is not a string")
            return generation(text, data.get("usage") or {}, finish)
        except (KeyError, IndexError, TypeError, ValueError, OverflowError) as e:
            raise ExpertFailed(
                f"remote expert {self.spec.name!r} returned a malformed completion: {e!r}"
            ) from e

    @contextmanager
    def transport_errors(self, url: str, limit: float) -> Iterator[None]:
        """httpx's and asyncio's timeouts → ExpertTimeout, other transport errors →
        ExpertUnavailable."""
        name = self.spec.name
        try:
            yield
        except (httpx.TimeoutException, TimeoutError) as e:
            raise ExpertTimeout(f"remote expert {name!r} timed out after {limit} s ({url})") from e
        except httpx.HTTPError as e:
            raise ExpertUnavailable(f"remote expert {name!r} unreachable ({url}): {e!s}") from e

    def check_status(self, status: int, content: bytes) -> None:
        """429 and 5xx → ExpertUnavailable (another expert may answer), other non-2xx →
        ExpertFailed with the start of the body."""
        name = self.spec.name
        if status == 429 or status >= 500:
            raise ExpertUnavailable(f"remote expert {name!r} answered HTTP {status}")
        if status >= 300:
            text = content[:200].decode(errors="replace")
            raise ExpertFailed(f"remote expert {name!r} answered HTTP {status}: {text}")

    async def _post(self, path: str, body: dict[str, Any], timeout: float | None) -> bytes:
        url = self.spec.url.rstrip("/") + path
        limit = timeout or self.spec.timeout_s
        with self.transport_errors(url, limit):
            async with asyncio.timeout(limit):  # httpx bounds each read, not the whole exchange
                status, content = await self._exchange(url, body, limit)
        self.check_status(status, content)
        return content

    async def _exchange(self, url: str, body: dict[str, Any], limit: float) -> tuple[int, bytes]:
        """(status, body) of one POST; a body past MAX_BODY_BYTES is refused unread."""
        async with self.client.stream(
            "POST", url, json=body, headers=self.headers(), timeout=limit
        ) as r:
            who = f"remote expert {self.spec.name!r}"
            return r.status_code, await read_body(r, MAX_BODY_BYTES, who)

    def _object(self, content: bytes) -> dict[str, Any]:
        try:
            data = json.loads(content)
        except ValueError as e:
            raise ExpertFailed(f"remote expert {self.spec.name!r} returned a non-JSON body") from e
        if not isinstance(data, dict):
            raise ExpertFailed(f"remote expert {self.spec.name!r} returned a non-object body")
        return data


def _chat_body(spec: RemoteSpec, params: GenParams, messages: Sequence[Message]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": spec.model_name,
        "messages": list(messages),
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
    }
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    return body


def _array(value: Any) -> list[Any]:
    """A JSON array, or TypeError (a string would pass as a vector of its characters)."""
    if not isinstance(value, list):
        raise TypeError(f"an embedding is a {type(value).__name__}, not an array")
    return value
