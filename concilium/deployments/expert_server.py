"""ExpertServer: one Ray Serve deployment per local base model; runs mixed-adapter batches."""

from __future__ import annotations

from collections.abc import Sequence

from ray import serve

from concilium.experts.base import Generation, GenParams, Message, Target
from concilium.experts.pool import ExpertPool


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
class ExpertServer:
    """Hosts one base model and loads its adapters on demand (per-replica LRU)."""

    def __init__(self, model_path: str, max_adapters: int = 64, batch_window_ms: float = 2.0):
        self.model_path = model_path
        self.pool = ExpertPool(max_adapters=max_adapters, batch_window_ms=batch_window_ms)
        self.pool.model(model_path)  # load now, not on the first request

    async def chat(
        self, target: Target, messages: Sequence[Message], params: GenParams
    ) -> Generation:
        return await self.pool.chat(target, messages, params)

    def check_health(self) -> None:
        self.pool.model(self.model_path)
