"""Picks and orders: ``POST /api/v1/picks`` (Idempotency-Key), order tracking, pack and ship.

The semantics (docs/picking.md):

* ``Idempotency-Key`` is required (400 without). The first answer is 201; the same key with the
  same body again is a replay: 200 with ``Idempotent-Replayed: true`` and the order as it
  stands now. The same key with another body, or by another caller, is 422. Concurrent
  duplicates cannot both execute: the check and the journal commit of the order run with no
  await in between.
* An order id is unique per channel: the same caller's (channel, order id) with the same lines
  is the same order (200, replayed), with other lines 409; another caller's is 409 without any
  of that order's data (nor its id).
* A second ``ship`` with the same carrier and tracking number answers the order unchanged
  (200); with others 409 ``already_shipped``.
* 409 when the stock is not there (nothing reserved), 503 with ``Retry-After`` when a device on
  the route is down (nothing reserved, safe to retry with the same key).
* ``floor`` callers see only the orders they created; supervisors and engineers see all.
* ``cancel``: an order none of whose commands was handed to a sorter yet; a floor caller only
  its own (another's answers 404, as an unknown order does); again: 200, unchanged; 409
  ``not_cancellable`` once a command went to the sorter or the order is closed.
* ``resolve`` (supervisors): an UNKNOWN task's outcome, CONFIRMED or FAILED, with a reason;
  409 ``task_not_unknown`` for any other task.

The desk refuses with `PickRefused` subclasses (no status codes); every route of this router
answers one as problem+json through `_PickRoute` with the status `pick_wire.status_of` gives
(the MQTT channel answers with the same statuses). The request body is the shared `PickIn`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field

from controller.api.auth import Principal, Role, require
from controller.api.deps import RuntimeDep
from controller.api.loops import on_http_loop
from controller.api.schemas import PROBLEM
from controller.domain.orders import OrderState, Resolution
from controller.services.order_desk import OrderNotFound, PickRefused
from controller.services.pick_wire import PickIn, PickLineIn, status_of

__all__ = ["OrderOut", "PickIn", "PickLineIn", "problem", "router", "wire"]


def problem(
    status: int,
    code: str,
    detail: str,
    *,
    extra: dict[str, Any] | None = None,
    retry_after_s: float | None = None,
) -> JSONResponse:
    """An ``application/problem+json`` answer of the pick routes."""
    body: dict[str, Any] = {
        "type": f"urn:floorhand:problem:{code}",
        "title": code.replace("_", " "),
        "status": status,
        "detail": detail,
        **(extra or {}),
    }
    headers = {}
    if retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


@on_http_loop
class _PickRoute(APIRoute):
    """The one place a desk refusal becomes an HTTP answer (status: `pick_wire.status_of`).
    These routes run on the HTTP loop (`controller.api.loops`): they reach the desk only
    through the picking facade's crossings to the control loop, never ingest's state."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except PickRefused as exc:
                return problem(
                    status_of(exc),
                    exc.code,
                    exc.detail,
                    extra=exc.extra,
                    retry_after_s=exc.retry_after_s,
                )

        return answer


router = APIRouter(tags=["orders"], route_class=_PickRoute)


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "qty": "2" is refused


class PickTaskOut(BaseModel):
    task_no: int
    line_no: int
    sku: str
    qty: int
    shelf: str
    zone: str
    conveyors: list[str]
    sorter: str
    lane: int
    tote: int
    cmd_id: int
    state: Literal[
        "DISPATCHED", "ACCEPTED", "DIVERTED", "CONFIRMED", "SHORT", "FAILED", "UNKNOWN", "CANCELLED"
    ]
    result: str | None
    reason: str | None
    picked_qty: int | None
    scale_confirmed: bool
    resolved_by: str | None = Field(
        default=None, description="who resolved the task from UNKNOWN (null: nobody)"
    )
    resolved_ts: float | None = Field(default=None, description="Unix time of the resolution")


class OrderTransitionOut(BaseModel):
    ts: float
    state: str
    reason: str | None


class OrderOut(BaseModel):
    order_id: str
    channel: str
    external_id: str
    pack_station: str
    state: OrderState
    lines: list[PickLineIn]
    created_ts: float
    updated_ts: float
    reason: str | None
    tasks: list[PickTaskOut]
    history: list[OrderTransitionOut]
    carrier: str | None
    tracking: str | None
    packed_by: str | None
    shipped_by: str | None


class ShipIn(_Wire):
    carrier: Annotated[str, Field(min_length=1, max_length=64)]
    tracking: Annotated[str, Field(min_length=1, max_length=128)]


Reason = Annotated[str, Field(min_length=1, max_length=500, pattern=r"\S")]


class CancelIn(_Wire):
    """Why the order is cancelled (optional; kept in the order's history)."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"reason": "customer withdrew the order"}]},
    )
    reason: Reason | None = None


class ResolveIn(_Wire):
    """A person's finding for an UNKNOWN task: CONFIRMED (the units are in the pack station's
    tote) or FAILED (they are not), and why."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [{"outcome": "CONFIRMED", "reason": "tote 17 found in lane 3, 2 units"}]
        },
    )
    outcome: Literal["CONFIRMED", "FAILED"]
    reason: Reason


_TASK_FIELDS = tuple(PickTaskOut.model_fields)


def wire(body: dict[str, Any]) -> dict[str, Any]:
    """An order body (``Order.as_dict()``) in the `OrderOut` shape, built directly: the pick
    path answers without a pydantic round trip (tests check the shape against `OrderOut`)."""
    return {
        "order_id": body["order_id"],
        "channel": body["channel"],
        "external_id": body["external_id"],
        "pack_station": body["pack_station"],
        "state": body["state"],
        "lines": [{"sku": s, "qty": q} for s, q in body["lines"]],
        "created_ts": body["created_ts"],
        "updated_ts": body["updated_ts"],
        "reason": body.get("reason"),
        "tasks": [{k: t.get(k) for k in _TASK_FIELDS} for t in body["tasks"]],
        "history": [{"ts": ts, "state": st, "reason": r} for ts, st, r in body["history"]],
        "carrier": body.get("carrier"),
        "tracking": body.get("tracking"),
        "packed_by": body.get("packed_by"),
        "shipped_by": body.get("shipped_by"),
    }


def _json(body: Any, status: int = 200, **headers: str) -> Response:
    return Response(
        orjson.dumps(body), status_code=status, media_type="application/json", headers=headers
    )


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"content": {PROBLEM: {}}, "description": text}
    for code, text in {
        400: "Idempotency-Key missing or malformed",
        404: "No such order (or not yours), or no such task",
        409: "Not enough stock, a conflicting order, a lifecycle step out of order, the "
        "order already shipped with another tracking number, an order that cannot be "
        "cancelled any more, or a task that is not UNKNOWN",
        422: "Invalid request, or the Idempotency-Key was used for another request",
        503: "A device on the route is down (Retry-After); nothing was reserved",
    }.items()
}


@router.post(
    "/api/v1/picks",
    status_code=201,
    response_model=OrderOut,
    responses={
        201: {"description": "Created: the new order"},
        200: {
            "model": OrderOut,
            "description": "Replayed (the same key and body, or the same caller's order id): "
            "the order as it stands now",
            "headers": {
                "Idempotent-Replayed": {
                    "description": "Always `true` on a replay",
                    "schema": {"type": "string", "enum": ["true"]},
                }
            },
        },
        **_ERRORS,
    },
    summary="Submit a pick request (creates an order)",
)
async def create_pick(
    body: PickIn,
    rt: RuntimeDep,
    principal: Annotated[Principal, Depends(require(Role.FLOOR, Role.ENGINEER))],
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="Unique per request (1..255 characters); retries reuse it.",
        ),
    ] = None,
) -> Response:
    # The submission runs on the control loop (services/picking.py: no await between the
    # idempotency check and the journal commit there); this loop only awaits its answer.
    if idempotency_key is None or not 1 <= len(idempotency_key) <= 255:
        return problem(
            400,
            "idempotency_key_required",
            "the Idempotency-Key header (1..255 characters) is required",
        )
    # At start-up it waits (bounded) until the PLC links had their first chance to connect.
    done = await rt.picking.submit_async(
        body.request(), key=idempotency_key, principal=principal.name
    )
    headers = {"Location": f"/api/v1/orders/{done.order['order_id']}"}
    if done.replayed:
        headers["Idempotent-Replayed"] = "true"
    return _json(wire(done.order), done.status, **headers)


def _visible(body: dict[str, Any] | None, principal: Principal) -> bool:
    if body is None:
        return False
    return principal.role is not Role.FLOOR or body.get("principal") == principal.name


@router.get("/api/v1/orders", response_model=list[OrderOut], summary="Recent orders")
async def list_orders(
    rt: RuntimeDep,
    principal: Annotated[Principal, Depends(require(Role.FLOOR, Role.SUPERVISOR, Role.ENGINEER))],
    state: OrderState | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[OrderOut]:
    desk = rt.picking.desk
    bodies = await rt.picking.on_control(lambda: desk.recent(limit=limit, state=state))
    return [OrderOut.model_validate(wire(b)) for b in bodies if _visible(b, principal)]


@router.get(
    "/api/v1/orders/{order_id}", response_model=OrderOut, responses=_ERRORS, summary="One order"
)
async def get_order(
    order_id: str,
    rt: RuntimeDep,
    principal: Annotated[Principal, Depends(require(Role.FLOOR, Role.SUPERVISOR, Role.ENGINEER))],
) -> Response:
    body = await rt.picking.on_control(rt.picking.desk.get, order_id)
    if body is None or not _visible(body, principal):
        raise OrderNotFound("order_not_found", f"no order {order_id!r}")
    return _json(wire(body))


@router.post(
    "/api/v1/orders/{order_id}/pack",
    response_model=OrderOut,
    responses=_ERRORS,
    summary="Confirm an order packed (SORTED → PACKED)",
)
async def pack_order(
    order_id: str,
    rt: RuntimeDep,
    principal: Annotated[Principal, Depends(require(Role.SUPERVISOR, Role.ENGINEER))],
) -> Response:
    desk = rt.picking.desk
    return _json(wire(await rt.picking.on_control(lambda: desk.pack(order_id, by=principal.name))))


@router.post(
    "/api/v1/orders/{order_id}/ship",
    response_model=OrderOut,
    responses=_ERRORS,
    summary="Confirm an order shipped with carrier and tracking number (PACKED → SHIPPED)",
)
async def ship_order(
    order_id: str,
    body: ShipIn,
    rt: RuntimeDep,
    principal: Annotated[Principal, Depends(require(Role.SUPERVISOR, Role.ENGINEER))],
) -> Response:
    desk = rt.picking.desk
    out = await rt.picking.on_control(
        lambda: desk.ship(order_id, by=principal.name, carrier=body.carrier, tracking=body.tracking)
    )
    return _json(wire(out))


@router.post(
    "/api/v1/orders/{order_id}/cancel",
    response_model=OrderOut,
    responses=_ERRORS,
    summary="Cancel an order none of whose commands was sent to the sorter (→ CANCELLED)",
)
async def cancel_order(
    order_id: str,
    rt: RuntimeDep,
    principal: Annotated[Principal, Depends(require(Role.FLOOR, Role.SUPERVISOR))],
    body: CancelIn | None = None,
) -> Response:
    desk = rt.picking.desk
    reason = body.reason if body is not None else None

    def cancel() -> dict[str, Any]:
        # One step on the control loop: the check of whose order it is and the cancel.
        if not _visible(desk.get(order_id), principal):  # another floor caller's: unknown
            raise OrderNotFound("order_not_found", f"no order {order_id!r}")
        return desk.cancel(order_id, by=principal.name, reason=reason)

    return _json(wire(await rt.picking.on_control(cancel)))


@router.post(
    "/api/v1/orders/{order_id}/tasks/{task_no}/resolve",
    response_model=OrderOut,
    responses=_ERRORS,
    summary="Resolve an UNKNOWN task as CONFIRMED or FAILED, with a reason (journaled)",
)
async def resolve_task(
    order_id: str,
    task_no: Annotated[int, Path(ge=0, le=1_000_000)],
    body: ResolveIn,
    rt: RuntimeDep,
    principal: Annotated[Principal, Depends(require(Role.SUPERVISOR))],
) -> Response:
    desk = rt.picking.desk
    out = await rt.picking.on_control(
        lambda: desk.resolve(
            order_id, task_no, Resolution(body.outcome), by=principal.name, reason=body.reason
        )
    )
    return _json(wire(out))
