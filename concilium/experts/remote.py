"""A remote OpenAI-compatible expert, called over an injected `httpx.AsyncClient`.

Transport failures map onto the exception tree: timeouts → ExpertTimeout, connection errors and
5xx/429 → ExpertUnavailable, other non-2xx or a malformed body → ExpertFailed. The API key is read
from the environment variable the spec names, at call time (never stored in the registry).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import httpx

from concilium.errors import ExpertFailed, ExpertTimeout, ExpertUnavailable
from concilium.experts.base import Generation, GenParams, Message
from concilium.registry.specs import RemoteSpec


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
        try:
            r = await self.client.post(
                url, json=body, headers=self._headers(), timeout=timeout or self.spec.timeout_s
            )
        except httpx.TimeoutException as e:
            raise ExpertTimeout(f"remote expert {name!r} timed out ({url})") from e
        except httpx.HTTPError as e:
            raise ExpertUnavailable(f"remote expert {name!r} unreachable ({url}): {e!s}") from e
        if r.status_code == 429 or r.status_code >= 500:
            raise ExpertUnavailable(f"remote expert {name!r} answered HTTP {r.status_code}")
        if r.status_code >= 300:
            raise ExpertFailed(
                f"remote expert {name!r} answered HTTP {r.status_code}: {r.text[:200]}"
            )
        try:
            data = r.json()
        except ValueError as e:
            raise ExpertFailed(f"remote expert {name!r} returned a non-JSON body") from e
        if not isinstance(data, dict):
            raise ExpertFailed(f"remote expert {name!r} returned a non-object body")
        return data

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
            return Generation(
                text=str(text),
                prompt_tokens=int(usage.get("prompt_tokens", 0)),
                completion_tokens=int(usage.get("completion_tokens", 0)),
                finish_reason=str(choice.get("finish_reason") or "stop"),
            )
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise ExpertFailed(
                f"remote expert {self.spec.name!r} returned a malformed completion: {e!r}"
            ) from e

    async def embed(self, texts: Sequence[str], timeout: float | None = None) -> list[list[float]]:
        data = await self._post(
            "/embeddings", {"model": self.spec.model_name, "input": list(texts)}, timeout
        )
        try:
            rows = sorted(data["data"], key=lambda d: d["index"])
            return [[float(x) for x in d["embedding"]] for d in rows]
        except (KeyError, TypeError, ValueError) as e:
            raise ExpertFailed(
                f"remote expert {self.spec.name!r} returned malformed embeddings: {e!r}"
            ) from e
