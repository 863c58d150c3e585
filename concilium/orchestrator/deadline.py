"""A request's deadline: awaiting past it cancels the expert's work (HTTP 504)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from concilium.errors import ExpertTimeout

if TYPE_CHECKING:
    from concilium.orchestrator.schemas import RoutingOptions


@dataclass(frozen=True, slots=True)
class Deadline:
    """When the caller stops waiting; awaiting past it cancels the expert's work (HTTP 504)."""

    at: float  # time.monotonic()
    budget_ms: float
    field: str | None

    @classmethod
    def of(cls, opts: RoutingOptions | None, default_s: float) -> Deadline:
        if opts is not None and opts.deadline_ms is not None:
            return cls(
                time.monotonic() + opts.deadline_ms / 1000, opts.deadline_ms, "routing.deadline_ms"
            )
        return cls(time.monotonic() + default_s, default_s * 1000, None)

    @property
    def spent(self) -> bool:
        """Whether the caller has stopped waiting (an expert's own timeout before it is not)."""
        return time.monotonic() >= self.at

    async def run(self, awaitable: Any) -> Any:
        left = self.at - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            return await asyncio.wait_for(awaitable, left)
        except TimeoutError:
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            raise ExpertTimeout(
                f"request exceeded its deadline of {self.budget_ms:.0f} ms; the expert's work "
                "was cancelled",
                field=self.field,
            ) from None
