"""A remote OpenAI-compatible expert, called over an injected `httpx.AsyncClient`.

Transport failures map onto the exception tree: timeouts (of the whole exchange, not of each read)
→ ExpertTimeout, connection errors and 5xx/429 → ExpertUnavailable, other non-2xx, a body over
`MAX_BODY_BYTES` or a malformed one → ExpertFailed. The API key is read
from the environment variable the spec names, at call time (never stored in the registry).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import httpx

from concilium.errors import ExpertFailed, ExpertTimeout, ExpertUnavailable
from concilium.experts.base import Generation, GenParams, Message
from concilium.registry.specs import RemoteSpec

MAX_BODY_BYTES = 64 * 2**20  # a response body larger than this is refused, not buffered


class RemoteExpert:
    """Chat completions and embeddings against one remote endpoint."""

    def __init__(self, spec: RemoteSpec, client: httpx.AsyncClient) -> None:
        self.spec = spec
        self.client = client

    def _headers(self) -> dict[str, str]:
        env = self.spec.api_key_env
        key = os.environ.get(env) if env else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def _post(self, path: str, body: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        url = self.spec.url.rstrip("/") + path
        name = self.spec.name
        limit = timeout or self.spec.timeout_s
        try:  # httpx's timeout bounds each read, not the whole exchange: a trickle never ends
            async with asyncio.timeout(limit):
                status, content = await self._exchange(url, body, limit)
        except (httpx.TimeoutException, TimeoutError) as e:
            raise ExpertTimeout(f"remote expert {name!r} timed out after {limit} s ({url})") from e
        except httpx.HTTPError as e:
            raise ExpertUnavailable(f"remote expert {name!r} unreachable ({url}): {e!s}") from e
        if status == 429 or status >= 500:
            raise ExpertUnavailable(f"remote expert {name!r} answered HTTP {status}")
        if status >= 300:
            text = content[:200].decode(errors="replace")
            raise ExpertFailed(f"remote expert {name!r} answered HTTP {status}: {text}")
        try:
            data = json.loads(content)
        except ValueError as e:
            raise ExpertFailed(f"remote expert {name!r} returned a non-JSON body") from e
        if not isinstance(data, dict):
            raise ExpertFailed(f"remote expert {name!r} returned a non-object body")
        return data

    async def _exchange(self, url: str, body: dict[str, Any], limit: float) -> tuple[int, bytes]:
        """(status, body) of one POST; a body past MAX_BODY_BYTES is refused unread."""
        headers = self._headers()
        async with self.client.stream("POST", url, json=body, headers=headers, timeout=limit) as r:
            chunks, size = [], 0
            async for chunk in r.aiter_bytes():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise ExpertFailed(
                        f"remote expert {self.spec.name!r} sent a body over {MAX_BODY_BYTES} bytes"
                    )
                chunks.append(chunk)
            return r.status_code, b"".join(chunks)

    async def chat(
        self, messages: Sequence[Message], params: GenParams, timeout: float | None = None
    ) -> Generation:
        body: dict[str, Any] = {
            "model": self.spec.model_name,
            "messages": list(messages),
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        data = await self._post("/chat/completions", body, timeout)
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
            usage = data.get("usage") or {}
            finish = choice.get("finish_reason") or "stop"
            if not isinstance(text, str) or not isinstance(finish, str):
                raise TypeError(f"content {text!r} / finish_reason {finish!r} is not a string")
            if not isinstance(usage, dict):
                raise TypeError(f"usage {usage!r} is not an object")
            return Generation(
                text=text,
                prompt_tokens=int(usage.get("prompt_tokens", 0)),
                completion_tokens=int(usage.get("completion_tokens", 0)),
                finish_reason=finish,
            )
        except (KeyError, IndexError, TypeError, ValueError, OverflowError) as e:
            raise ExpertFailed(
                f"remote expert {self.spec.name!r} returned a malformed completion: {e!r}"
            ) from e

    async def embed(self, texts: Sequence[str], timeout: float | None = None) -> list[list[float]]:
        data = await self._post(
            "/embeddings", {"model": self.spec.model_name, "input": list(texts)}, timeout
        )
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


def _array(value: Any) -> list[Any]:
    """A JSON array, or TypeError (a string would pass as a vector of its characters)."""
    if not isinstance(value, list):
        raise TypeError(f"an embedding is a {type(value).__name__}, not an array")
    return value
