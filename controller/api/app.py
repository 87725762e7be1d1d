"""The HTTP API: an adapter over the runtime. The app's lifespan owns the runtime."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from controller.api.api_docs import install_api_docs
from controller.api.deps import install_queries
from controller.api.limits import allowed_methods, install_security
from controller.api.loops import LoopRouter
from controller.api.routes import alerts as alerts_routes
from controller.api.routes import catalog as catalog_routes
from controller.api.routes import devices as devices_routes
from controller.api.routes import health as health_routes
from controller.api.routes import history as history_routes
from controller.api.routes import ingest as ingest_routes
from controller.api.routes import ops as ops_routes
from controller.api.routes import orders as orders_routes
from controller.api.routes import stock as stock_routes
from controller.api.schemas import PROBLEM, Problem
from controller.api.web import install_web
from controller.config import SiteConfig
from controller.owner import refusal
from controller.runtime import Runtime

log = logging.getLogger("floorhand.api")


def create_app(
    site: SiteConfig,
    *,
    runtime: Runtime | None = None,
    on_runtime_exit: Callable[[BaseException | None], None] | None = None,
) -> FastAPI:
    """Build the app. The lifespan starts the runtime and stops it on shutdown; if the runtime
    dies (fatal MQTT error, journal locked) ``on_runtime_exit`` is told, so the server can exit."""

    rt = runtime or Runtime(site)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started = asyncio.Event()
        task = asyncio.create_task(rt.run(on_started=started.set), name="runtime")

        def _done(t: asyncio.Task[None]) -> None:
            exc = None if t.cancelled() else t.exception()
            if exc is not None:
                refused = refusal(exc)  # another controller owns the site: no traceback
                if refused is not None:
                    log.error("runtime stopped: %s", refused)
                else:
                    log.critical("runtime stopped: %s", exc, exc_info=exc)
            if on_runtime_exit is not None:
                on_runtime_exit(exc)

        task.add_done_callback(_done)
        waiter = asyncio.ensure_future(started.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if task.done():
            task.result()  # raises the startup error (journal locked, bad TLS files…)
        try:
            yield
        finally:
            if not task.done():  # a runtime that died was reported by _done already
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app = FastAPI(
        title="Floorhand",
        version="0.1.0",
        summary="Warehouse stock monitoring and automation controller",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's pages load from a CDN; ours are served locally (api_docs)
        redoc_url=None,
        responses={422: {"model": Problem, "content": {PROBLEM: {}}}},
    )
    app.state.runtime = rt
    install_queries(app, rt)
    _install_problem_handlers(app)
    # Inside the security middleware (added next, so outside): each request's route runs on
    # the loop that owns its state; the security middleware always on the HTTP loop.
    app.add_middleware(LoopRouter, http_loop_ok=lambda: rt.control.running)
    install_security(app, site.api, rt)
    app.include_router(stock_routes.router)  # stock, shelves, zones (read model)
    app.include_router(alerts_routes.router)  # alert states (read model), ack/snooze
    app.include_router(devices_routes.router)  # scales' figures, PLC links (read model)
    app.include_router(ingest_routes.router)  # dead letters
    app.include_router(history_routes.router)  # downsampled stock history
    app.include_router(health_routes.router)  # health, ready (supervision's HealthReport)
    app.include_router(orders_routes.router)  # picks and orders (docs/picking.md)
    app.include_router(ops_routes.router)  # scales, tare, calibration
    app.include_router(ops_routes.plc_router)  # PLC commands (on the HTTP loop)
    app.include_router(catalog_routes.router)  # the catalogue: export, versions, live changes
    install_web(app, rt)  # dashboard assets and /api/v1/live (docs/dashboard.md)
    install_api_docs(app)  # /docs and /redoc, every asset local
    return app


def _install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(Exception)
    async def internal_problem(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not bad input: the traceback goes to our log, never to the caller.
        log.error(
            "unhandled error in %s %s: %s: %s",
            request.method,
            request.url.path,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
        body = Problem(
            title="Internal Server Error",
            status=500,
            detail="internal error; the controller's log has the cause",
        )
        return JSONResponse(body.model_dump(), status_code=500, media_type=PROBLEM)

    @app.exception_handler(StarletteHTTPException)
    async def http_problem(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = Problem(
            title=_title(exc.status_code), status=exc.status_code, detail=str(exc.detail)
        )
        headers = dict(exc.headers or {})  # WWW-Authenticate on 401
        if exc.status_code == 405:
            headers["Allow"] = allowed_methods(request.app, request.scope)
        return JSONResponse(
            body.model_dump(), status_code=exc.status_code, media_type=PROBLEM, headers=headers
        )

    @app.exception_handler(RequestValidationError)
    async def validation_problem(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()))
            parts.append(f"{loc}: {err.get('msg')}")
        body = Problem(title="Invalid request", status=422, detail="; ".join(parts))
        return JSONResponse(body.model_dump(), status_code=422, media_type=PROBLEM)


def _title(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
