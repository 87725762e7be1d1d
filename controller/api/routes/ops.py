"""Operations: manual PLC commands, tare/calibration (alert ack/snooze: routes/alerts.py;
scales: routes/devices.py).

Role guards (docs/api.md, "Operations"): engineers run belt commands and calibrate shelves;
zones are in routes/stock.py. Every change is committed to the journal before the
answer and evented on the bus; errors are problem+json.

Handlers that change state are ``async def``: they run on the event loop, like ingest and the
supervision tick, so a change never interleaves with a commit of theirs.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, Path, Request
from fastapi.routing import APIRoute

from controller.api.auth import Principal
from controller.api.deps import Engineer, QueriesDep, RuntimeDep
from controller.api.loops import on_home, on_http_loop
from controller.api.routes.stock import shelf_public
from controller.api.schemas import (
    PlcCommandPublic,
    PlcStatusPublic,
    ShelfCalibrationCreate,
    ShelfCalibrationResult,
    ShelfTareCreate,
    problem_responses,
)
from controller.domain.calibration import CalibrationError, NotSettled
from controller.ports import JournalError
from controller.runtime import Runtime
from controller.services.plc_commands import Command, CommandOutcome, PlcCommandService
from controller.services.queries import StockQueries

log = logging.getLogger("floorhand.api.ops")

router = APIRouter()


@on_http_loop
class _PlcRoute(APIRoute):
    """START, STOP and RESET run on the HTTP loop (`controller.api.loops`): the command goes
    to the PLC through the control loop at once, never behind an ingest group; only its
    record (journal, bus) is written on the home loop, after the PLC answered."""


plc_router = APIRouter(route_class=_PlcRoute)
"""The PLC command routes (included by the app beside ``router``)."""
_problems = problem_responses


def journal_failed(exc: Exception) -> HTTPException:
    """The 503 of a change the journal could not store."""
    log.error("ops change not committed: %s", exc)
    return HTTPException(503, f"the journal could not store the change, nothing changed: {exc}")


# -- PLC commands ---------------------------------------------------------------------------------

_COMMAND_STATUS = {
    "refused": 409,
    "unavailable": 503,
    "busy": 503,
    "no_reply": 504,
    "faulty": 502,
    "error": 502,
}


def _plc_commands(request: Request, rt: Runtime) -> PlcCommandService:
    svc: PlcCommandService | None = getattr(request.app.state, "plc_commands", None)
    if svc is None:
        # The drivers run on the control loop; the record stays on this one.
        svc = PlcCommandService(
            rt.journal, rt.bus.publish, rt.clock, device_call=rt.control.call_async
        )
        request.app.state.plc_commands = svc
    return svc


def _command_answer(o: CommandOutcome) -> PlcCommandPublic:
    if o.result != "ok" or o.status is None:
        hint = ""
        if o.result == "unavailable" and o.command == "stop":
            hint = " (with the link down the PLC gets no heartbeat: its watchdog stops the belt)"
        elif o.result == "no_reply":
            hint = " (the command may have run: check GET /api/v1/plcs)"
        headers = {"Retry-After": "1"} if o.result in ("unavailable", "busy") else None
        raise HTTPException(_COMMAND_STATUS.get(o.result, 502), o.detail + hint, headers=headers)
    s = o.status
    return PlcCommandPublic(
        plc=o.plc,
        command=o.command,
        by=o.by,
        at=o.at_s,
        result="ok",
        status=PlcStatusPublic(
            state=s.state.value,
            fault=s.fault.value,
            running=s.running,
            flags=sorted(s.flags),
            speed_actual_mm_s=s.speed_actual_mm_s,
            epoch=s.epoch,
            command_count=s.command_count,
            uptime_s=s.uptime_s,
        ),
    )


async def _run_command(
    request: Request, rt: Runtime, principal: Principal, plc_id: str, command: Command
) -> PlcCommandPublic:
    plc = rt.plcs.get(plc_id)
    if plc is None:
        raise HTTPException(404, f"unknown PLC {plc_id!r}")
    svc = _plc_commands(request, rt)
    outcome = await svc.execute(plc_id, plc.driver, command, by=principal.name)
    await on_home(request.app, svc.record, outcome, principal.role.value)
    return _command_answer(outcome)


_PLC_ERRORS = _problems(
    e404="unknown PLC",
    e409="the PLC refused (e-stop, jam, no heartbeat)",
    e502="the PLC answered wrongly or did not take the command",
    e503="the PLC link is down (answered at once, nothing sent)",
    e504="no reply: the command may have run",
)
PlcId = Annotated[str, Path(description="a [[plcs]] id")]


@plc_router.post(
    "/api/v1/plcs/{plc_id}/start",
    response_model=PlcCommandPublic,
    tags=["devices"],
    responses=_PLC_ERRORS,
)
async def start_plc(
    request: Request, rt: RuntimeDep, principal: Engineer, plc_id: PlcId
) -> PlcCommandPublic:
    """START the belt. Needs the link UP: 503 at once when it is not (nothing is sent). 409 when
    the PLC does not start (e-stop, jam, fault: see the detail)."""
    return await _run_command(request, rt, principal, plc_id, "start")


@plc_router.post(
    "/api/v1/plcs/{plc_id}/stop",
    response_model=PlcCommandPublic,
    tags=["devices"],
    responses=_PLC_ERRORS,
)
async def stop_plc(
    request: Request, rt: RuntimeDep, principal: Engineer, plc_id: PlcId
) -> PlcCommandPublic:
    """STOP the belt through the link's priority lane (overtakes queued requests), repeated once
    if the read-back still shows it moving. Never rate-limited, allowed in any belt state."""
    return await _run_command(request, rt, principal, plc_id, "stop")


@plc_router.post(
    "/api/v1/plcs/{plc_id}/reset",
    response_model=PlcCommandPublic,
    tags=["devices"],
    responses=_PLC_ERRORS,
)
async def reset_plc(
    request: Request, rt: RuntimeDep, principal: Engineer, plc_id: PlcId
) -> PlcCommandPublic:
    """RESET: clears a jam, a released e-stop or a watchdog trip; the belt stays stopped."""
    return await _run_command(request, rt, principal, plc_id, "reset")


# -- tare and calibration -----------------------------------------------------------------


_CAL_ERRORS = _problems(
    e404="unknown shelf",
    e503="the journal could not store it",
)
ShelfId = Annotated[str, Path(description="a [[shelves]] id")]


def _shelf_id(queries: StockQueries, shelf_id: str) -> str:
    if not queries.has_shelf(shelf_id):
        raise HTTPException(404, f"unknown shelf {shelf_id!r}")
    return shelf_id


def _calibration_result(queries: StockQueries, shelf_id: str, events: list[dict[str, Any]]) -> Any:
    return ShelfCalibrationResult(shelf=shelf_public(queries.shelf(shelf_id)), events=events)


def _invalid(exc: Exception) -> HTTPException:
    return HTTPException(422, str(exc))


@router.post(
    "/api/v1/shelves/{shelf_id}/tare",
    response_model=ShelfCalibrationResult,
    tags=["stock"],
    responses={
        **_CAL_ERRORS,
        **_problems(e409="not settled: no gross weight to tare to", e422="tare out of range"),
    },
)
async def tare_shelf(
    rt: RuntimeDep,
    queries: QueriesDep,
    principal: Engineer,
    shelf_id: ShelfId,
    body: Annotated[ShelfTareCreate | None, Body()] = None,
) -> Any:
    """Set the shelf's tare to its current settled gross weight (no body, or ``{}``: empty the
    shelf of product first), or to ``tare_g``. The count is recomputed at once; the override is
    kept in the journal (applied again after a restart) and evented (``shelf_calibrated``)."""
    _shelf_id(queries, shelf_id)
    tare_g = body.tare_g if body is not None else None
    try:
        events = rt.ingest.set_tare(shelf_id, tare_g, principal.name, rt.clock())
    except NotSettled as exc:
        raise HTTPException(409, str(exc)) from None
    except CalibrationError as exc:
        raise _invalid(exc) from None
    except JournalError as exc:
        raise journal_failed(exc) from None
    return _calibration_result(queries, shelf_id, events)


@router.post(
    "/api/v1/shelves/{shelf_id}/calibration",
    response_model=ShelfCalibrationResult,
    tags=["stock"],
    responses={**_CAL_ERRORS, **_problems(e422="value out of bounds")},
)
async def calibrate_shelf(
    rt: RuntimeDep,
    queries: QueriesDep,
    principal: Engineer,
    shelf_id: ShelfId,
    body: ShelfCalibrationCreate,
) -> Any:
    """Override the unit weight (0.1..100000 g, one unit must fit on the scale) and/or the
    scale factor of the shelf's channel (0.5..2: grams = raw grams × factor). The count is
    recomputed from the settled weight at once; kept in the journal, evented."""
    _shelf_id(queries, shelf_id)
    try:
        events = rt.ingest.calibrate(
            shelf_id,
            unit_weight_g=body.unit_weight_g,
            scale_factor=body.scale_factor,
            by=principal.name,
            now_s=rt.clock(),
        )
    except CalibrationError as exc:
        raise _invalid(exc) from None
    except JournalError as exc:
        raise journal_failed(exc) from None
    return _calibration_result(queries, shelf_id, events)


@router.delete(
    "/api/v1/shelves/{shelf_id}/calibration",
    response_model=ShelfCalibrationResult,
    tags=["stock"],
    responses=_CAL_ERRORS,
)
async def reset_calibration(
    rt: RuntimeDep, queries: QueriesDep, principal: Engineer, shelf_id: ShelfId
) -> Any:
    """Drop the shelf's overrides (tare, unit weight, scale factor): back to the site file."""
    _shelf_id(queries, shelf_id)
    try:
        events = rt.ingest.clear_calibration(shelf_id, principal.name, rt.clock())
    except JournalError as exc:
        raise journal_failed(exc) from None
    return _calibration_result(queries, shelf_id, events)
