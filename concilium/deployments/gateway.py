"""Gateway: the FastAPI ingress on Ray Serve, dispatching local models to ExpertServer replicas."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from concilium.config import ServiceConfig
from concilium.experts.base import Generation, GenParams, Message, Target
from concilium.experts.pool import ExpertPool


class RayBackend:
    """ExpertBackend over Serve handles; remote and embedding experts run in the gateway."""

    def __init__(self, handles: dict[str, DeploymentHandle], local: ExpertPool) -> None:
        self.handles = handles  # model path -> ExpertServer handle
        self.local = local

    def model(self, path: Any) -> Any:  # the registration-time latency profiler loads here
        return self.local.model(path)

    async def chat(
        self, target: Target, messages: Sequence[Message], params: GenParams
    ) -> Generation:
        handle = self.handles.get(target.model_path or "")
        if handle is None:  # remote experts, or a model registered after this app was built
            return await self.local.chat(target, messages, params)
        gen: Generation = await handle.chat.remote(target, list(messages), params)
        return gen

    async def embed(self, target: Target, texts: Sequence[str]) -> list[list[float]]:
        return await self.local.embed(target, texts)

    async def aclose(self) -> None:
        await self.local.aclose()


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256)
@serve.ingress()
class Gateway:
    """OpenAI-compatible ingress. Reads the shared registry; never owns a model itself."""

    def __init__(self, config: dict[str, Any], experts: dict[str, DeploymentHandle]) -> None:
        from concilium.orchestrator.service import build_service

        cfg = ServiceConfig.model_validate(config)
        local = ExpertPool(max_adapters=cfg.max_adapters, batch_window_ms=cfg.batch_window_ms)
        self.service = build_service(cfg, backend=RayBackend(experts, local), seed=False)

    def __serve_build_asgi_app__(self) -> Any:
        from concilium.orchestrator.http import create_app

        return create_app(self.service)
