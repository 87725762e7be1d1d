"""The dependencies every route module shares, as ``Annotated`` aliases: the runtime, the read
model (stock queries; devices, alerts, health), the calling principal by role, and the role
guards of routes that do not use the caller. Route modules import from here; this module
imports no route module and not the app, so there is no import cycle between the app and its
routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, FastAPI, Request

from controller.api.auth import Principal, PublicDep, Role, require
from controller.runtime import Runtime
from controller.services.queries import AlertQueries, DeviceQueries, ReadModel, StockQueries


def get_runtime(request: Request) -> Runtime:
    """The runtime the app's lifespan owns."""
    rt: Runtime = request.app.state.runtime
    return rt


def get_queries(request: Request) -> StockQueries:
    """The stock read model (built once by ``install_queries``)."""
    queries: StockQueries = request.app.state.queries
    return queries


def get_reads(request: Request) -> ReadModel:
    """The whole read model (built once by ``install_queries``)."""
    reads: ReadModel = request.app.state.reads
    return reads


def install_queries(app: FastAPI, rt: Runtime) -> ReadModel:
    """Build the read model over ``rt``'s services once and keep it on the app."""
    stock = StockQueries(rt.site, rt.specs, rt.ingest.states, rt.ingest.calibrations, rt.alerts)
    reads = ReadModel(
        stock=stock,
        devices=DeviceQueries(
            rt.site,
            rt.specs,
            rt.ingest.devices,
            rt.ingest.cursors,
            rt.ingest.states,
            rt.ingest.calibrations,
            rt.clock,
        ),
        alerts=AlertQueries(rt.alerts, rt.specs),
        health=rt.supervision.report,
        plcs=rt.supervision.plc_views,
    )
    # After the alert service's listener (added by the runtime): the indexes read its states.
    rt.bus.add_listener(stock.on_events, name="read model: stock")
    rt.bus.add_listener(reads.alerts.on_events, name="read model: alerts")
    app.state.queries = stock
    app.state.reads = reads
    return reads


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
QueriesDep = Annotated[StockQueries, Depends(get_queries)]
ReadsDep = Annotated[ReadModel, Depends(get_reads)]

Supervisor = Annotated[Principal, Depends(require(Role.SUPERVISOR))]
"""The caller, who must be a supervisor."""
Engineer = Annotated[Principal, Depends(require(Role.ENGINEER))]
"""The caller, who must be an engineer."""

# Route guards when the handler does not use the caller (docs/api.md has the whole matrix).
ANY_ROLE = [Depends(require(Role.FLOOR, Role.SUPERVISOR, Role.ENGINEER))]
READ_ALL = [Depends(require(Role.SUPERVISOR, Role.ENGINEER))]
ENGINEER = [Depends(require(Role.ENGINEER))]
PUBLIC = [PublicDep]
