"""The dependencies every route module shares, as ``Annotated`` aliases: the runtime, the read
model (stock queries; devices, alerts, health), the calling principal by role, and the role
guards of routes that do not use the caller. Route modules import from here; this module
imports no route module and not the app, so there is no import cycle between the app and its
routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, FastAPI, Request

from controller.api.auth import Principal, PublicDep, Role, require
from controller.domain.events import BusEvent
from controller.runtime import Runtime
from controller.services.queries import AlertQueries, DeviceQueries, ReadModel, StockQueries


async def get_runtime(request: Request) -> Runtime:
    """The runtime the app's lifespan owns. (``async``, as every dependency here: FastAPI runs
    a plain ``def`` dependency in a worker thread, two thread hops per request; under ingest
    load each waits for the interpreter lock.)"""
    rt: Runtime = request.app.state.runtime
    return rt


async def get_queries(request: Request) -> StockQueries:
    """The stock read model (built once by ``install_queries``)."""
    queries: StockQueries = request.app.state.queries
    return queries


async def get_reads(request: Request) -> ReadModel:
    """The whole read model (built once by ``install_queries``)."""
    reads: ReadModel = request.app.state.reads
    return reads


def install_queries(app: FastAPI, rt: Runtime) -> ReadModel:
    """Build the read model over ``rt``'s services and keep it on the app; one bus listener
    keeps the app's current read model's indexes moving, and builds it anew on a
    ``catalog_changed`` event (by then the runtime's site, specs, states and alert targets are
    the new catalogue's)."""
    reads = reload_queries(app, rt)

    def on_events(events: list[BusEvent]) -> None:
        if any(ev.kind == "catalog_changed" for ev in events):
            reload_queries(app, rt)  # its indexes read the live state when first used
            return
        current: ReadModel = app.state.reads
        current.stock.on_events(events)
        current.alerts.on_events(events)

    # After the alert service's listener (added by the runtime): the indexes read its states.
    rt.bus.add_listener(on_events, name="read model")
    return reads


def reload_queries(app: FastAPI, rt: Runtime) -> ReadModel:
    """A new read model over ``rt``'s current site, in place of the app's (cheap: its indexes
    are built on first use)."""
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
