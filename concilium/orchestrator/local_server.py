"""`concilium serve --no-ray`: the same app in one process under uvicorn (development, tests)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from concilium.config import ServiceConfig


def run_local(
    cfg: ServiceConfig, *, announce: Callable[[ServiceConfig], None] | None = None
) -> None:
    import uvicorn

    from concilium.orchestrator.http import create_app
    from concilium.orchestrator.service import build_service

    svc = build_service(cfg)
    svc.registry.train_pending_gates()  # gates a previous run left unfinished
    app = create_app(svc)
    server = uvicorn.Server(
        uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False)
    )
    if announce is not None:
        threading.Thread(
            target=_announce_when_up, args=(server, cfg, announce), daemon=True
        ).start()
    server.run()


def _announce_when_up(
    server: Any, cfg: ServiceConfig, announce: Callable[[ServiceConfig], None]
) -> None:
    while not server.started and not server.should_exit:
        time.sleep(0.05)
    if server.started:
        announce(cfg)
