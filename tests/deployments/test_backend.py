"""RayBackend without a cluster: Serve handles and the late-deploy step replaced by fakes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from concilium.config import DeploymentConfig
from concilium.deployments import gateway, topology
from concilium.errors import ExpertUnavailable
from concilium.experts.base import Generation, GenParams, Target
from concilium.experts.pool import ExpertPool


class _Call:
    def __init__(self, gen: Generation) -> None:
        self.gen = gen

    def __await__(self) -> Any:
        async def done() -> Generation:
            return self.gen

        return done().__await__()

    def cancel(self) -> None:
        pass


class _Handle:
    """Enough of a DeploymentHandle for `RayBackend.chat`."""

    def __init__(self) -> None:
        self.chat = self

    def options(self, **_: Any) -> _Handle:
        return self

    def remote(self, *_: Any) -> _Call:
        return _Call(
            Generation(text="ok", prompt_tokens=1, completion_tokens=1, finish_reason="stop")
        )


def test_a_late_model_whose_server_failed_to_start_is_started_again_next_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    starts: list[str] = []

    def deploy(name: str, *_: Any) -> _Handle:
        starts.append(name)
        if len(starts) == 1:
            raise RuntimeError("controller busy")  # what serve.run raises on a failed deploy
        return _Handle()

    monkeypatch.setattr(topology, "deploy_expert_app", deploy)
    backend = gateway.RayBackend({}, ExpertPool(), DeploymentConfig())
    target = Target(expert="late", kind="model", model="late", model_path="/models/late")

    async def twice() -> Generation:
        with pytest.raises(ExpertUnavailable, match=r"did not start.*controller busy"):
            await backend.chat(target, [{"role": "user", "content": "hi"}], GenParams())
        return await backend.chat(target, [{"role": "user", "content": "hi"}], GenParams())

    assert asyncio.run(twice()).text == "ok"
    assert starts == ["late", "late"]  # a failed start is not cached
