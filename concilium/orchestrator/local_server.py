"""`concilium serve --no-ray`: the same app in one process under uvicorn (development, tests)."""

from __future__ import annotations

from collections.abc import Callable

from concilium.config import ServiceConfig


def run_local(
    cfg: ServiceConfig, *, announce: Callable[[ServiceConfig], None] | None = None
) -> None:
    import uvicorn

    from concilium.orchestrator.http import create_app
    from concilium.orchestrator.service import build_service

    app = create_app(build_service(cfg))
    server = uvicorn.Server(
        uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False)
    )
    if announce is not None:
        app.add_event_handler("startup", lambda: announce(cfg))
    server.run()
