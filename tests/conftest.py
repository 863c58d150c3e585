"""Shared fixtures: a fast deterministic text encoder, a fake expert backend, the demo pack."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from concilium.experts.base import Delta, Generation, GenParams, Message, StreamItem, Target

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT / "demo_pack"


class HashEncoder:
    """Bag-of-words hashing encoder: texts sharing words are similar. Deterministic, instant."""

    def __init__(self, dim: int = 64) -> None:
        self._dim = dim

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def name(self) -> str:
        return "hash"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"[a-z0-9]+", t.lower()):
                h = int(hashlib.md5(w.encode()).hexdigest(), 16)
                out[i, h % self._dim] += 1.0 if (h >> 64) & 1 else -1.0
            n = np.linalg.norm(out[i])
            out[i] = out[i] / n if n > 0 else out[i]
        return out


class FakeBackend:
    """Records what it was asked; answers '<expert>:<last user text>'; can be told to fail."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[Message], GenParams]] = []
        self.fail: set[str] = set()  # fail before answering
        self.fail_mid_stream: set[str] = set()  # stream two pieces, then fail
        self.delay_s: dict[str, float] = {}  # expert -> seconds before answering
        self.cancelled: list[str] = []  # experts whose work was cancelled mid-call
        self.answers: dict[str, str] = {}  # expert -> fixed answer text
        self.logprobs: dict[str, float] = {}  # expert -> mean_logprob it reports

    async def chat(
        self, target: Target, messages: Sequence[Message], params: GenParams
    ) -> Generation:
        from concilium.errors import ExpertUnavailable

        self.calls.append((target.expert, list(messages), params))
        if target.expert in self.fail:
            raise ExpertUnavailable(f"{target.expert} is down")
        try:
            await asyncio.sleep(self.delay_s.get(target.expert, 0))
        except asyncio.CancelledError:
            self.cancelled.append(target.expert)
            raise
        text = self.answers.get(target.expert, f"{target.expert}:{messages[-1]['content']}")
        return Generation(
            text=text,
            prompt_tokens=10,
            completion_tokens=5,
            finish_reason="stop",
            mean_logprob=self.logprobs.get(target.expert),
        )

    async def chat_stream(
        self, target: Target, messages: Sequence[Message], params: GenParams
    ) -> AsyncIterator[StreamItem]:
        from concilium.errors import ExpertUnavailable

        gen = await self.chat(target, messages, params)
        for i in range(0, len(gen.text), 4):
            if i >= 8 and target.expert in self.fail_mid_stream:
                raise ExpertUnavailable(f"{target.expert} died mid-stream")
            yield Delta(gen.text[i : i + 4])
        yield gen

    async def embed(self, target: Target, texts: Sequence[str]) -> list[list[float]]:
        return [[float(len(t)), 1.0] for t in texts]

    async def aclose(self) -> None:
        return None


@pytest.fixture
def encoder() -> HashEncoder:
    return HashEncoder()


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


def remote_spec(name: str, examples: list[str], **kw: object) -> dict[str, object]:
    """A remote expert spec (no files needed): handy for routing and HTTP tests."""
    return {
        "kind": "remote",
        "name": name,
        "url": "http://127.0.0.1:9/v1",
        "model_name": name,
        "description": f"{name} expert",
        "examples": examples,
        **kw,
    }


@pytest.fixture(scope="session")
def pack_dir() -> Path:
    if not (PACK / "manifest.json").is_file():
        pytest.fail("demo_pack/ is missing: it is committed; rebuild with `make pack`")
    return PACK


def pilot_query(manifest: dict, skill: str) -> tuple[str, str]:  # type: ignore[type-arg]
    """A skill's first pilot query and its exact answer (pilots are what the router indexes)."""
    from concilium.pack.tasks import skill_by_name, split_query

    query = next(e for e in manifest["experts"] if e["name"] == skill)["examples"][0]
    return query, skill_by_name(skill).solve(split_query(query)[1])


@contextmanager
def no_hang(seconds: float, what: str = "the call") -> Iterator[None]:
    """Fail (instead of blocking the run) when the block takes longer than `seconds` (SIGALRM:
    main thread only)."""

    def alarm(signum: int, frame: object) -> None:
        raise TimeoutError(f"{what} hung for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
