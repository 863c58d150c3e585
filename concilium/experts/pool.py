"""In-process expert backend: loads local models lazily, batches concurrent requests per model.

Requests for one base model that arrive within `batch_window_ms` of each other are decoded in one
mixed-adapter batch (a different adapter per row, or a per-token mixture of adapters for a request
with ``params.token_routing``: its candidates are loaded before it joins a batch). Remote experts
share one httpx client.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from pathlib import Path

import httpx

from concilium.errors import ExpertFailed
from concilium.experts.base import Delta, Generation, GenParams, Message, StreamItem, Target
from concilium.experts.batching import MicroBatcher
from concilium.experts.breaker import CircuitBreaker
from concilium.experts.embedder import SentenceEncoder
from concilium.experts.guard import guarded_client
from concilium.experts.local import GenRequest, LocalCausalLM
from concilium.experts.remote import RemoteExpert


async def stream_local(lm: LocalCausalLM, request: GenRequest) -> AsyncGenerator[StreamItem, None]:
    """Decode one request in a worker thread, yielding Deltas as they settle, then the Generation.

    Closing the iterator (the client went away) stops the decode at its next token.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[StreamItem | BaseException] = asyncio.Queue()
    cancelled = threading.Event()

    def emit(text: str) -> bool:
        if text:  # "" only asks whether the consumer is still there
            loop.call_soon_threadsafe(queue.put_nowait, Delta(text))
        return not cancelled.is_set()

    def work() -> None:
        try:
            item: StreamItem | BaseException = lm.generate_stream(request, emit)
        except BaseException as e:  # delivered to the consumer, raised there
            item = e
        loop.call_soon_threadsafe(queue.put_nowait, item)

    task = loop.run_in_executor(None, work)
    try:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, Generation):
                return
    finally:
        cancelled.set()
        await asyncio.shield(task)


def needed_adapters(target: Target, params: GenParams) -> list[tuple[str, str]]:
    """(name, dir) of the adapters a request runs on: a mixture's candidates, a logit-level
    ensemble's members, else its adapter."""
    if params.token_routing is not None:
        return list(params.token_routing.adapters)
    if params.fusion is not None:
        return params.fusion.adapters()
    if target.adapter is None:
        return []
    if target.adapter_path is None:
        raise ExpertFailed(f"adapter {target.adapter!r} came without its path")
    return [(target.adapter, target.adapter_path)]


def decode_rows(lm: LocalCausalLM) -> Callable[[list[GenRequest]], list[Generation | Exception]]:
    """`lm.generate_batch`, except that a batch that fails is decoded again row by row: one bad
    request (a prompt past the context, a mixture it cannot run) fails only itself."""

    def run(requests: list[GenRequest]) -> list[Generation | Exception]:
        try:
            return list(lm.generate_batch(requests))
        except Exception as e:
            if len(requests) == 1:
                return [e]
        return [run([r])[0] for r in requests]

    return run


class ExpertPool:
    """The in-process ExpertBackend."""

    def __init__(
        self,
        *,
        client: httpx.AsyncClient | None = None,
        max_adapters: int = 64,
        max_batch: int = 16,
        batch_window_ms: float = 2.0,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.client = client or guarded_client()
        self.breaker = breaker or CircuitBreaker()
        self.max_adapters = max_adapters
        self.max_batch = max_batch
        self.window_s = batch_window_ms / 1000
        self._models: dict[str, LocalCausalLM] = {}
        self._encoders: dict[tuple[str, str | None], SentenceEncoder] = {}
        self._batchers: dict[str, MicroBatcher[GenRequest, Generation | Exception]] = {}
        self._lock = threading.Lock()

    def model(self, path: str | Path) -> LocalCausalLM:
        """The loaded model for a directory (loaded on first use)."""
        key = str(path)
        with self._lock:
            if key not in self._models:
                self._models[key] = LocalCausalLM(Path(path), max_adapters=self.max_adapters)
            return self._models[key]

    async def chat(
        self, target: Target, messages: Sequence[Message], params: GenParams
    ) -> Generation:
        if target.remote is not None:
            return await self._remote_chat(target, messages, params)
        if target.model_path is None:
            raise ExpertFailed(f"expert {target.expert!r} has no runnable model")
        lm = await self._ready(target, params)
        key = target.model_path
        if key not in self._batchers:
            self._batchers[key] = MicroBatcher(decode_rows(lm), self.max_batch, self.window_s)
        out = await self._batchers[key].submit(
            GenRequest(messages, params, target.adapter, target.adapter_path)
        )
        if isinstance(out, Exception):
            raise out
        return out

    async def _remote_chat(
        self, target: Target, messages: Sequence[Message], params: GenParams
    ) -> Generation:
        assert target.remote is not None
        with self.breaker.attempt(target.expert):
            return await RemoteExpert(target.remote, self.client).chat(messages, params)

    async def chat_stream(
        self, target: Target, messages: Sequence[Message], params: GenParams
    ) -> AsyncGenerator[StreamItem, None]:
        """Local experts stream token by token, remote ones as their endpoint streams."""
        if target.remote is not None:
            answer = RemoteExpert(target.remote, self.client).chat_stream(messages, params)
            async with aclosing(self.breaker.stream(target.expert, answer)) as remote:
                async for item in remote:
                    yield item
            return
        if target.model_path is None:
            raise ExpertFailed(f"expert {target.expert!r} has no runnable model")
        lm = await self._ready(target, params)
        request = GenRequest(messages, params, target.adapter, target.adapter_path)
        async with aclosing(stream_local(lm, request)) as local:  # closed: the decode stops
            async for item in local:
                yield item

    async def _ready(self, target: Target, params: GenParams) -> LocalCausalLM:
        """The target's model with its adapter, or all its mixture's candidates, loaded."""
        assert target.model_path is not None
        lm = await asyncio.to_thread(self.model, target.model_path)
        for name, path in needed_adapters(target, params):
            await asyncio.to_thread(lm.ensure_adapter, name, path)
        return lm

    async def embed(self, target: Target, texts: Sequence[str]) -> list[list[float]]:
        if target.remote is not None:
            with self.breaker.attempt(target.expert):
                return await RemoteExpert(target.remote, self.client).embed(texts)
        if target.model_path is None:
            raise ExpertFailed(f"expert {target.expert!r} has no runnable model")
        enc = await asyncio.to_thread(self.encoder, target.model_path, target.adapter_path)
        vecs = await asyncio.to_thread(enc.encode, list(texts))
        return [[float(x) for x in row] for row in vecs]

    def encoder(self, model_path: str, adapter_path: str | None) -> SentenceEncoder:
        key = (model_path, adapter_path)
        with self._lock:
            if key not in self._encoders:
                self._encoders[key] = SentenceEncoder(
                    Path(model_path), adapter_dir=Path(adapter_path) if adapter_path else None
                )
            return self._encoders[key]

    async def aclose(self) -> None:
        for b in self._batchers.values():
            b.cancel()
        await self.client.aclose()
