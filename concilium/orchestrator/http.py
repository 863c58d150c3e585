"""The OpenAI-compatible FastAPI app. HTTP status codes for the exception tree live here only."""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from concilium import errors as E
from concilium.experts.base import backend_stats
from concilium.orchestrator.metrics import Metrics
from concilium.orchestrator.schemas import (
    ChatCompletionRequest,
    EmbeddingRequest,
    FeedbackRequest,
    model_card,
)
from concilium.orchestrator.service import Service
from concilium.registry.mirror import MirrorStore
from concilium.registry.store import ExpertRecord

log = logging.getLogger(__name__)

# most specific first: the first isinstance match wins
STATUS: list[tuple[type[E.ConciliumError], int]] = [
    (E.UnknownModel, 404),
    (E.InvalidInput, 400),
    (E.NotFound, 404),
    (E.Conflict, 409),
    (E.ObjectiveUnsatisfiable, 422),
    (E.Unauthorized, 401),
    (E.ExpertTimeout, 504),
    (E.ExpertUnavailable, 503),
    (E.ExpertFailed, 502),
    (E.ConfigError, 500),
    (E.RegistryUnavailable, 503),
    (E.RegistryError, 500),
]


def status_of(err: E.ConciliumError) -> int:
    return next((code for cls, code in STATUS if isinstance(err, cls)), 500)


def error_body(message: str, err_type: str, field: str | None = None) -> dict[str, Any]:
    """OpenAI's error envelope; `param` names the offending field."""
    return {"error": {"message": message, "type": err_type, "param": field, "code": None}}


class _JSON(JSONResponse):
    """An answer's JSON with non-ASCII escaped, as in the SSE chunks: an expert's text may hold
    a lone surrogate (a remote's `\\ud83d` escape), which has no UTF-8 encoding."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode()


_DONE = b"data: [DONE]\n\n"


async def _observed(events: AsyncIterator[bytes], metrics: Metrics) -> AsyncIterator[bytes]:
    """The SSE stream; the routing object of its last chunk (the one before [DONE]) is counted
    in the metrics as a whole answer's is."""
    last = b""
    try:
        async for chunk in events:
            if chunk == _DONE and last.startswith(b"data: "):
                routing = json.loads(last.removeprefix(b"data: ")).get("routing")
                if routing is not None:
                    metrics.observe_routing(routing)
            last = chunk
            yield chunk
    finally:
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()


def create_app(service: Service, instance: str = "local") -> FastAPI:
    """The app over one Service; `instance` names this replica in /health."""
    app = FastAPI(title="concilium", version="0.1.0")
    app.state.service = service
    app.state.instance = instance
    _install_error_handlers(app)
    _install_metrics(app, service)
    _inference_routes(app, service)
    _feedback_routes(app, service)
    _registry_routes(app, service)
    return app


def _bearer(request: Request) -> bytes:
    """The bearer token of the request ('' without one); the scheme is case-insensitive."""
    scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
    return token.strip().encode() if scheme.lower() == "bearer" else b""


def _user_guard(service: Service) -> Any:
    """The dependency of inference endpoints: with user keys configured, one of them (or the
    admin key) is required."""
    admin_key = service.config.admin_key()
    keys = [k.encode() for k in service.config.user_keys() + ([admin_key] if admin_key else [])]

    async def user(request: Request) -> None:  # async: no worker-thread hop per request
        if not service.config.user_keys():
            return
        given = _bearer(request)
        if not any(hmac.compare_digest(given, k) for k in keys):
            raise E.Unauthorized("this endpoint needs an API key (Authorization: Bearer)")

    return user


def _inference_routes(app: FastAPI, service: Service) -> None:
    orch = service.orchestrator
    metrics: Metrics = app.state.metrics
    user = _user_guard(service)

    @app.get("/health")
    def health() -> dict[str, Any]:
        cat = orch.catalogs.get()
        return {
            "status": "ok",
            "instance": app.state.instance,
            "registry_version": cat.version,
            # "mirror": fed by the RegistryService (registry_reads: service); "store": the file
            "registry_source": "mirror"
            if isinstance(service.registry.store, MirrorStore)
            else "store",
            "experts": len(cat.entries),
        }

    @app.get("/v1/models", dependencies=[Depends(user)])
    def models() -> dict[str, Any]:
        cat = orch.catalogs.get()
        data = [model_card("auto", "concilium", router=orch.default_router)]
        data += [model_card(f"router-{n}", "concilium") for n in sorted(orch.routers)]
        for e in cat.entries.values():
            data.append(model_card(e.spec.name, "concilium", kind=e.spec.kind, task=e.spec.task))
            if e.candidate.base:
                data.append(
                    model_card(
                        f"{e.candidate.base}:{e.spec.name}",
                        "concilium",
                        kind="lora",
                        task=e.spec.task,
                    )
                )
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions", response_model=None, dependencies=[Depends(user)])
    async def chat(req: ChatCompletionRequest) -> JSONResponse | StreamingResponse:
        if req.stream:
            headers, events = await orch.chat_stream(req)
            stream = _observed(events, metrics)
            return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
        out = await orch.chat(req)
        metrics.observe_routing(out.body["routing"])
        return _JSON(out.body, headers=out.headers)

    @app.post("/v1/embeddings", dependencies=[Depends(user)])
    async def embeddings(req: EmbeddingRequest) -> JSONResponse:
        out = await orch.embeddings(req)
        metrics.observe_routing(out.body["routing"])
        return _JSON(out.body, headers=out.headers)


def _feedback_routes(app: FastAPI, service: Service) -> None:
    orch = service.orchestrator
    user = _user_guard(service)

    @app.post("/v1/feedback", dependencies=[Depends(user)])
    async def feedback(req: FeedbackRequest) -> dict[str, Any]:
        store = orch.outcomes
        if store is None:
            raise E.InvalidInput(
                "feedback needs the outcome store (config outcomes.enabled: true)",
                field="decision_id",
            )
        found = await run_in_threadpool(store.feedback, req.decision_id, req.score)
        if not found:
            raise E.NotFound(
                f"decision_id {req.decision_id!r} is not a logged decision", field="decision_id"
            )
        return {"object": "feedback", "decision_id": req.decision_id, "score": req.score}


def _registry_routes(app: FastAPI, service: Service) -> None:
    orch, registry = service.orchestrator, service.registry

    async def admin(request: Request) -> None:
        key = service.config.admin_key()
        if key is None:
            return
        if not hmac.compare_digest(_bearer(request), key.encode()):
            raise E.Unauthorized("this endpoint needs the admin API key (Authorization: Bearer)")

    @app.post("/v1/experts", status_code=201, dependencies=[Depends(admin)])
    async def add_expert(request: Request) -> JSONResponse:
        try:
            data = await request.json()
        except ValueError:
            raise E.InvalidInput("request body must be a JSON expert spec") from None
        t0 = time.perf_counter()
        rec = await service.registrar.register(data)
        orch.catalogs.invalidate()
        body = record_json(rec) | {"registration_ms": round((time.perf_counter() - t0) * 1e3, 1)}
        return JSONResponse(body, status_code=201)

    @app.get("/v1/experts")
    def list_experts() -> dict[str, Any]:
        return {
            "object": "list",
            "version": registry.version(),
            "data": [record_json(r) for r in registry.list()],
        }

    @app.get("/v1/experts/{name}")
    def get_expert(name: str) -> dict[str, Any]:
        return record_json(registry.get(name))

    @app.delete("/v1/experts/{name}", dependencies=[Depends(admin)])
    async def delete_expert(name: str) -> dict[str, Any]:
        version = await service.registrar.remove(name)
        orch.catalogs.invalidate()
        return {"deleted": name, "version": version}


def record_json(rec: ExpertRecord) -> dict[str, Any]:
    spec = rec.spec.model_dump(mode="json", exclude={"train_examples"})
    return {
        "name": rec.name,
        "kind": rec.spec.kind,
        "version": rec.version,
        "created_at": rec.created_at,
        "spec": spec,
        "artifacts": rec.artifacts,
    }


class _RequestMetrics:
    """Pure ASGI middleware timing every HTTP request (BaseHTTPMiddleware costs ~0.3 ms each)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), [500]

        async def send_status(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe_request(endpoint, status[0], time.perf_counter() - t0)


class _BodyLimit:
    """Pure ASGI middleware: a request body past `max_bytes` (declared or as it arrives) is a
    413 before it is held in memory."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        too_big = declared.isdigit() and int(declared) > self.max_bytes  # refused unread
        seen = [0]  # what arrived: a declared length is no byte of the body

        async def limited() -> Any:
            if too_big:
                raise StarletteHTTPException(413, f"request body over {self.max_bytes} bytes")
            message = await receive()
            seen[0] += len(message.get("body", b"")) if message["type"] == "http.request" else 0
            if seen[0] > self.max_bytes:
                raise StarletteHTTPException(413, f"request body over {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)


def _install_metrics(app: FastAPI, service: Service) -> None:
    app.state.metrics = metrics = Metrics()
    metrics.watch_backend(lambda: backend_stats(service.backend))
    app.add_middleware(_BodyLimit, max_bytes=int(service.config.max_request_mb * 1024**2))
    app.add_middleware(_RequestMetrics, metrics=metrics)

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


_MEMBER_TAGS = {"str", "int", "float", "bool", "dict", "list"}


def _loc(err: Any) -> str:
    """The dotted request field of one validation error; '' for the body as a whole (a JSON
    decode error's `loc` ends in a character position, which names no field). The union
    member tags pydantic puts in `loc` ('str', 'list[str]') are no field and are left out."""
    if err["type"] == "json_invalid":
        return ""
    return ".".join(str(p) for p in err["loc"] if p != "body" and not _member_tag(p))


def _member_tag(part: Any) -> bool:
    return isinstance(part, str) and (part in _MEMBER_TAGS or "[" in part)


def _msg(err: Any) -> str:
    if err["type"] == "json_invalid":
        pos = err["loc"][-1] if len(err["loc"]) > 1 else "?"
        why = (err.get("ctx") or {}).get("error", "")
        return f"not valid JSON ({why} at character {pos})"
    return str(err["msg"])


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(E.ConciliumError)
    async def concilium_error(request: Request, exc: E.ConciliumError) -> JSONResponse:
        code = status_of(exc)
        if code >= 500:
            log.error("%s %s failed: %s", request.method, request.url.path, exc)
        retry = getattr(exc, "retry_after_s", None)
        headers = {"Retry-After": str(max(1, round(retry)))} if retry is not None else None
        return JSONResponse(
            error_body(exc.message, type(exc).__name__, exc.field),
            status_code=code,
            headers=headers,
        )

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        msg = "; ".join(f"{_loc(e) or 'body'}: {_msg(e)}" for e in errs)
        return JSONResponse(
            error_body(
                f"invalid request: {msg}",
                "invalid_request_error",
                (_loc(errs[0]) or None) if errs else None,
            ),
            status_code=400,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's own errors (no such route, wrong method, unreadable body) in the same
        envelope as ours."""
        body = error_body(str(exc.detail), "invalid_request_error")
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal error", "internal_error"), status_code=500)
