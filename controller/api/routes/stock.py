"""Stock: per SKU, per shelf and per zone (read only; every role may read them).

Answered by the stock read model (``controller.services.queries``), whose indexes are built
once, on first use: each answer costs O(its size), the lists a page at a time (docs/api.md,
"Pages"). The handlers are plain ``def`` (run in a worker thread), so a first read that builds
an index at a large site never holds the event loop. ``shelf_public`` is also the shelf view of
the tare and calibration answers (routes/ops.py)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response

from controller.api.deps import ANY_ROLE, QueriesDep
from controller.api.paging import (
    DEFAULT_LIMIT,
    PAGE_HEADERS,
    Limit,
    PageCursor,
    Text,
    Zone,
    page_query,
    paged_json,
)
from controller.api.schemas import (
    Problem,
    ShelfPublic,
    SkuStockPublic,
    ZonePublic,
    ZoneSkuPublic,
    ZoneStockPublic,
    problem_responses,
)
from controller.domain.model import ShelfStatus, StockState
from controller.services.queries import ShelfView, SkuView

router = APIRouter(tags=["stock"], dependencies=ANY_ROLE)


def _float(value: float | None) -> float | None:
    return None if value is None else float(value)


def shelf_body(view: ShelfView) -> dict[str, Any]:
    """The wire dict of one shelf: ``ShelfPublic``'s fields in its order, calibration
    included."""
    spec, state, cal = view.spec, view.state, view.calibration
    return {
        "id": spec.shelf_id,
        "zone": spec.zone,
        "location": view.location,
        "sku": spec.sku,
        "scale": spec.scale_id,
        "channel": spec.channel,
        "status": state.status.value,
        "units": state.units,
        "weight_g": _float(state.weight_g),
        "last_reading_ts": _float(state.last_ts_s),
        "capacity_units": spec.capacity_units,
        "unit_weight_g": _float(spec.unit_weight_g),
        "tare_g": _float(spec.tare_g),
        "scale_factor": float(cal.scale_factor) if cal is not None else 1.0,
        "calibration": (
            {
                "tare_g": _float(cal.tare_g),
                "unit_weight_g": _float(cal.unit_weight_g),
                "scale_factor": float(cal.scale_factor),
                "updated_at": float(cal.updated_at_s),
                "updated_by": cal.updated_by,
            }
            if cal is not None
            else None
        ),
    }


def shelf_public(view: ShelfView) -> ShelfPublic:
    """The wire view of one shelf, calibration included."""
    return ShelfPublic.model_validate(shelf_body(view))


def _sku_body(view: SkuView) -> dict[str, Any]:
    """The wire dict of one SKU: ``SkuStockPublic``'s fields in its order."""
    sku = view.sku
    return {
        "sku": sku.id,
        "name": sku.name,
        "level": view.level,
        "state": view.state.value,
        "reorder_point": sku.reorder_point,
        "safety_stock": sku.safety_stock,
        "max_stock": sku.max_stock,
        "lead_time_d": float(sku.lead_time_d),
        "pack_multiple": sku.pack_multiple,
        "shelves": [shelf_body(s) for s in view.shelves],
    }


def _sku_public(view: SkuView) -> SkuStockPublic:
    return SkuStockPublic.model_validate(_sku_body(view))


@router.get(
    "/api/v1/stock",
    response_model=list[SkuStockPublic],
    responses={200: {"headers": PAGE_HEADERS}},
)
def list_stock(
    request: Request,
    queries: QueriesDep,
    zone: Annotated[str | None, Query(description="only SKUs with a shelf in this zone")] = None,
    state: Annotated[StockState | None, Query(description="only SKUs in this stock state")] = None,
    q: Text = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: PageCursor = None,
) -> Response:
    """Stock per SKU: the sum of its shelves' unit counts. Paginated in site order
    (docs/api.md, "Pages"); ``q`` matches the SKU's id or name."""
    query = page_query(limit, cursor, zone=zone, state=None if state is None else state.value, q=q)
    return paged_json(request, query, queries.stock_page, _sku_body)


@router.get(
    "/api/v1/stock/{sku}", response_model=SkuStockPublic, responses={404: {"model": Problem}}
)
def get_stock(queries: QueriesDep, sku: str) -> SkuStockPublic:
    if not queries.has_sku(sku):
        raise HTTPException(404, f"unknown SKU {sku!r}")
    return _sku_public(queries.sku(sku))


@router.get(
    "/api/v1/shelves",
    response_model=list[ShelfPublic],
    responses={200: {"headers": PAGE_HEADERS}},
)
def list_shelves(
    request: Request,
    queries: QueriesDep,
    zone: Zone = None,
    status: Annotated[ShelfStatus | None, Query(description="only shelves in this status")] = None,
    q: Text = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: PageCursor = None,
) -> Response:
    """Every shelf: count, weight, status, calibration. Paginated in site order (docs/api.md,
    "Pages"); ``q`` matches the shelf's id, SKU or location."""
    query = page_query(
        limit, cursor, zone=zone, state=None if status is None else status.value, q=q
    )
    return paged_json(request, query, queries.shelves_page, shelf_body)


@router.get("/api/v1/zones", response_model=list[ZonePublic])
def list_zones(queries: QueriesDep) -> list[ZonePublic]:
    """Every zone of the site with its shelf and scale counts, shelf statuses and active
    alerts."""
    return [
        ZonePublic(
            id=z.zone.id,
            name=z.zone.name,
            shelves=z.shelves,
            scales=z.scales,
            skus=z.skus,
            shelf_status=z.shelf_status,
            alerts_active=z.alerts_active,
        )
        for z in queries.zones()
    ]


@router.get(
    "/api/v1/zones/{zone}/stock",
    response_model=ZoneStockPublic,
    responses=problem_responses(e404="unknown zone"),
)
def zone_stock(queries: QueriesDep, zone: str) -> ZoneStockPublic:
    """The zone's shelves, and per SKU stored there: its units in this zone and its level and
    state over the whole site."""
    view = queries.zone_stock(zone)
    if view is None:
        raise HTTPException(404, f"unknown zone {zone!r}")
    return ZoneStockPublic(
        zone=view.zone.id,
        name=view.zone.name,
        shelves=[shelf_public(s) for s in view.shelves],
        skus=[
            ZoneSkuPublic(
                sku=s.sku.id,
                name=s.sku.name,
                shelves=s.shelves,
                units_in_zone=s.units_in_zone,
                level=s.level,
                state=s.state.value,
            )
            for s in view.skus
        ],
    )
