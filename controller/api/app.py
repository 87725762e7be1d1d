"""The HTTP API: an adapter over the runtime. The app's lifespan owns the runtime."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from controller.api.deps import ENGINEER, READ_ALL, RuntimeDep, install_queries
from controller.api.limits import allowed_methods, install_security
from controller.api.routes import alerts as alerts_routes
from controller.api.routes import devices as devices_routes
from controller.api.routes import health as health_routes
from controller.api.routes import ops as ops_routes
from controller.api.routes import orders as orders_routes
from controller.api.routes import stock as stock_routes
from controller.api.schemas import (
    PROBLEM,
    DeadLetterPublic,
    HistoryBucketPublic,
    HistoryPublic,
    HistorySeriesPublic,
    Problem,
)
from controller.api.web import install_web
from controller.config import SiteConfig
from controller.owner import refusal
from controller.ports import HistoryError, HistoryQuery, SinkUnavailable
from controller.runtime import Runtime

log = logging.getLogger("floorhand.api")

MAX_HISTORY_BUCKETS = 10_000
"""Upper bound of buckets one history request may ask for."""

MAX_HISTORY_EVERY_S = 1e9
"""Widest history bucket (~31 years; Flux durations are int64 nanoseconds)."""


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
        responses={422: {"model": Problem, "content": {PROBLEM: {}}}},
    )
    app.state.runtime = rt
    install_queries(app, rt)
    _install_problem_handlers(app)
    install_security(app, site.api, rt)
    app.include_router(stock_routes.router)  # stock, shelves, zones (read model)
    app.include_router(alerts_routes.router)  # alert states (read model), ack/snooze
    app.include_router(devices_routes.router)  # scales' figures, PLC links (read model)
    _routes(app)
    app.include_router(health_routes.router)  # health, ready (supervision's HealthReport)
    app.include_router(orders_routes.router)  # picks and orders (docs/picking.md)
    app.include_router(ops_routes.router)  # PLC commands, scales, tare
    install_web(app, rt)  # dashboard assets and /api/v1/live (docs/dashboard.md)
    return app


def _routes(app: FastAPI) -> None:
    @app.get(
        "/api/v1/ingest/dead-letters",
        response_model=list[DeadLetterPublic],
        tags=["ingest"],
        dependencies=ENGINEER,
    )
    def dead_letters(
        rt: RuntimeDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
    ) -> list[DeadLetterPublic]:
        """The most recent rejected messages, kept for inspection."""
        return [DeadLetterPublic(**d) for d in rt.journal.dead_letters(limit)]

    @app.get(
        "/api/v1/history",
        response_model=HistoryPublic,
        tags=["history"],
        responses={404: {"model": Problem}, 502: {"model": Problem}, 503: {"model": Problem}},
        dependencies=READ_ALL,
    )
    async def history(
        rt: RuntimeDep,
        sku: Annotated[str | None, Query(description="every shelf of this SKU")] = None,
        shelf: Annotated[str | None, Query(description="one shelf")] = None,
        from_: Annotated[
            float | None,
            Query(alias="from", description="Unix seconds; default: `to` − 1 h", ge=0, le=1e11),
        ] = None,
        to: Annotated[
            float | None, Query(description="Unix seconds; default: now", ge=0, le=1e11)
        ] = None,
        every: Annotated[
            float | None,
            Query(
                description="bucket width in seconds; default: (to − from) / 300",
                ge=0.001,
                le=MAX_HISTORY_EVERY_S,
            ),
        ] = None,
    ) -> Any:
        """Stock history of one shelf or of every shelf of a SKU, downsampled by the configured
        history backend (SQL, InfluxQL or Flux): weight mean/min/max and reading count per
        bucket, and the unit count carried forward from the last change."""
        if (sku is None) == (shelf is None):
            raise RequestValidationError(
                [{"loc": ("query", "sku|shelf"), "msg": "give exactly one of sku or shelf"}]
            )
        if rt.history is None:
            raise HTTPException(404, 'history is disabled ([history] backend = "none")')
        if shelf is not None and shelf not in rt.specs:
            raise HTTPException(404, f"unknown shelf {shelf!r}")
        if sku is not None and not any(s.id == sku for s in rt.site.skus):
            raise HTTPException(404, f"unknown SKU {sku!r}")
        to_s = rt.clock() if to is None else to
        from_s = to_s - 3600.0 if from_ is None else from_
        if from_s >= to_s:
            raise RequestValidationError(
                [{"loc": ("query", "from"), "msg": "from must be before to"}]
            )
        every_s = every if every is not None else max(0.001, (to_s - from_s) / 300)
        every_ms = max(1, round(every_s * 1000))
        from_ms, to_ms = int(from_s * 1000), int(to_s * 1000)
        if (to_ms - from_ms) / every_ms > MAX_HISTORY_BUCKETS:
            raise RequestValidationError(
                [
                    {
                        "loc": ("query", "every"),
                        "msg": f"more than {MAX_HISTORY_BUCKETS} buckets: widen every",
                    }
                ]
            )
        q = HistoryQuery(shelf, sku, from_ms, to_ms, every_ms)
        try:
            result = await rt.history.query(q)
        except SinkUnavailable as exc:
            raise HTTPException(503, f"history backend unavailable: {exc}") from None
        except HistoryError as exc:  # the server answered, but refused or garbled the query
            raise HTTPException(502, f"history backend refused the query: {exc}") from None
        series = [
            HistorySeriesPublic(
                shelf=r.shelf,
                zone=r.zone,
                sku=r.sku,
                buckets=[
                    HistoryBucketPublic(
                        t=b.t_ms / 1000,
                        weight_g_mean=b.weight_g_mean,
                        weight_g_min=b.weight_g_min,
                        weight_g_max=b.weight_g_max,
                        readings=b.readings,
                        units=b.units,
                    )
                    for b in r.buckets
                ],
            )
            for r in result
        ]
        return HistoryPublic.model_validate(
            {
                "backend": rt.history.sink.backend,
                "shelf": shelf,
                "sku": sku,
                "from": from_ms / 1000,
                "to": to_ms / 1000,
                "every_s": every_ms / 1000,
                "series": series,
            }
        )


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
