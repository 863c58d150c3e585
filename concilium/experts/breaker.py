"""Circuit breaker for remote experts: stop calling an endpoint that keeps failing, for a while.

After `threshold` consecutive failures an endpoint is *open*: calls fail at once with
ExpertUnavailable (so the orchestrator falls back within the caller's allowed set) until
`cooldown_s` has passed; then one trial call is let through (*half-open*) and its outcome closes
the circuit again or re-opens it for another cooldown.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from typing import TypeVar

from concilium.errors import ExpertFailed, ExpertUnavailable

T = TypeVar("T")


@dataclass
class _State:
    failures: int = 0
    open_until: float = 0.0
    trial: bool = False  # a half-open trial call is in flight


class CircuitBreaker:
    def __init__(
        self,
        threshold: int = 3,
        cooldown_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if threshold < 1 or cooldown_s < 0:
            raise ValueError("threshold must be >= 1 and cooldown_s >= 0")
        self.threshold, self.cooldown_s, self.clock = threshold, cooldown_s, clock
        self._states: dict[str, _State] = {}

    def check(self, key: str) -> None:
        """Raise ExpertUnavailable while `key` is open; admit one trial call after the cooldown."""
        st = self._states.get(key)
        if st is None or st.failures < self.threshold:
            return
        wait = st.open_until - self.clock()
        if wait <= 0 and not st.trial:
            st.trial = True
            return
        raise ExpertUnavailable(
            f"remote expert {key!r} is cooling down after {st.failures} consecutive failures",
            retry_after_s=max(wait, 1.0),
        )

    @contextmanager
    def attempt(self, key: str) -> Iterator[None]:
        """One guarded call: refused while open, and its outcome closes or re-opens the circuit.
        A half-open trial that ends any other way (cancelled by a deadline, say) counts as
        failed, so it does not hold the one trial slot for good."""
        self.check(key)
        trial = self.is_open(key)  # admitted while open: the half-open trial call
        try:
            yield
        except ExpertFailed:
            self.failure(key)
            raise
        except BaseException:
            if trial:
                self.failure(key)
            raise
        self.success(key)

    async def stream(self, key: str, items: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
        """`items` (a streamed answer) as one guarded call: a failure at any point counts
        against `key`, a stream that ends for it, and so does one its client stops reading after
        a first piece; cancelled before any piece, a half-open trial counts as failed."""
        self.check(key)
        trial, answered = self.is_open(key), False
        try:
            async with aclosing(items):
                async for item in items:
                    answered = True
                    yield item
        except ExpertFailed:
            self.failure(key)
            raise
        except BaseException:  # cancelled, or the client went away
            if answered:
                self.success(key)
            elif trial:
                self.failure(key)  # never hold the half-open trial slot
            raise
        self.success(key)

    def success(self, key: str) -> None:
        self._states.pop(key, None)

    def failure(self, key: str) -> None:
        st = self._states.setdefault(key, _State())
        st.failures += 1
        st.trial = False
        if st.failures >= self.threshold:
            st.open_until = self.clock() + self.cooldown_s

    def is_open(self, key: str) -> bool:
        st = self._states.get(key)
        return st is not None and st.failures >= self.threshold
