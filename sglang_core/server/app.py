"""The HTTP server: a FastAPI app whose APIs are serving-frontend plugins.

The server process tokenizes, validates and detokenizes; the engine core (scheduler + model) runs
in a process of its own, so the event loop never waits on a forward pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sglang_core.config import EngineSettings
from sglang_core.engine import Engine
from sglang_core.plugins import PluginManager
from sglang_core.router.data_parallel import DataParallelEngine
from sglang_core.server.context import ClientGone, Overloaded, ServerContext
from sglang_core.server.errors import error_response, param_of
from sglang_core.server.metrics import ServerMetrics
from sglang_core.server.middleware import ServerMiddleware
from sglang_core.server.openapi import ApiDocs
from sglang_core.server.settings import ServerSettings

logger = logging.getLogger("sglang_core.server")


def build_app(settings: ServerSettings) -> FastAPI:
    metrics = ServerMetrics()
    ctx = ServerContext(settings, metrics)
    engine_fields = {k: v for k, v in settings.model_dump(exclude_unset=True).items()
                     if k in EngineSettings.model_fields}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        ctx.engine = await asyncio.to_thread(start_engine, settings, engine_fields)
        try:
            yield
        finally:
            await asyncio.to_thread(ctx.engine.shutdown)

    app = FastAPI(title="sglang-core", lifespan=lifespan)
    app.state.ctx = ctx
    _install_error_handlers(app, ctx)
    docs = ApiDocs.for_app(app)

    @app.get("/health", **docs.route(summary="200 while the engine runs, else 503"))
    async def health() -> Response:
        if ctx.engine is not None and ctx.engine.alive:
            return Response(status_code=200)
        return error_response(503, "the engine is not running")

    @app.get("/metrics", **docs.route(text="Prometheus metrics, text format", summary="Prometheus metrics"))
    async def prometheus() -> Response:
        if ctx.engine is not None:
            with contextlib.suppress(Exception):
                metrics.update_engine_gauges(await asyncio.to_thread(ctx.engine.memory_reports))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    frontends = PluginManager(settings.plugins).registry("frontends")
    for name in settings.frontends or frontends.names():
        frontends.get(name).load()(app, ctx)

    app.add_middleware(ServerMiddleware, api_key=settings.api_key, max_body=settings.max_request_bytes,
                       metrics=metrics, log=settings.enable_request_log, error_body=ctx.error_body_for)
    return app


def start_engine(settings: ServerSettings, engine_fields: dict) -> Engine | DataParallelEngine:
    """One engine, or with ``dp_size`` > 1 that many replicas behind a router."""
    if settings.dp_size > 1:
        return DataParallelEngine(engine_fields, settings.dp_size, settings)
    return Engine(**{**engine_fields, "engine_in_subprocess": settings.engine_in_subprocess})


def _install_error_handlers(app: FastAPI, ctx: ServerContext) -> None:
    """Every error leaves in the envelope of the API its path belongs to (OpenAI's unless a
    frontend set another in ``ctx.error_shapes``); bad input is a 4xx naming the field. Any other
    exception is answered by ``ServerMiddleware`` (not by a handler here: Starlette re-raises
    after a catch-all handler, and uvicorn then drops the keep-alive connection)."""

    def error_reply(request: Request, status: int, message: str, param: str | None = None,
                    headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(ctx.error_body_for(request.scope["path"], status, message, param), status_code=status,
                            headers=headers)

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, exc: ValueError) -> JSONResponse:
        return error_reply(request, 400, str(exc), param_of(str(exc)))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        return error_reply(request, 400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_reply(request, exc.status_code, str(exc.detail), headers=exc.headers)  # 405's Allow

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        return error_reply(request, 503, str(exc))

    @app.exception_handler(ClientGone)
    async def gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody is listening; the request was aborted

    @app.exception_handler(RuntimeError)
    async def engine_down(request: Request, exc: RuntimeError) -> JSONResponse:
        if ctx_engine_dead(request):
            return error_reply(request, 503, f"the engine is not running: {exc}")
        logger.exception("request failed")
        return error_reply(request, 500, f"internal error: {exc}")


def ctx_engine_dead(request: Request) -> bool:
    engine = request.app.state.ctx.engine
    return engine is None or not engine.alive
