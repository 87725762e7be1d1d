"""Stock history: downsampled by the configured history backend (docs/api.md, "History")."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from fastapi.exceptions import RequestValidationError

from controller.api.deps import READ_ALL, QueriesDep, RuntimeDep
from controller.api.schemas import (
    HistoryBucketPublic,
    HistoryPublic,
    HistorySeriesPublic,
    Problem,
)
from controller.ports import HistoryError, HistoryQuery, SinkUnavailable

router = APIRouter()

MAX_HISTORY_BUCKETS = 10_000
"""Upper bound of buckets one history request may ask for."""

MAX_HISTORY_EVERY_S = 1e9
"""Widest history bucket (~31 years; Flux durations are int64 nanoseconds)."""


@router.get(
    "/api/v1/history",
    response_model=HistoryPublic,
    tags=["history"],
    responses={404: {"model": Problem}, 502: {"model": Problem}, 503: {"model": Problem}},
    dependencies=READ_ALL,
)
async def history(
    rt: RuntimeDep,
    queries: QueriesDep,
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
    if shelf is not None and not queries.has_shelf(shelf):
        raise HTTPException(404, f"unknown shelf {shelf!r}")
    if sku is not None and not queries.has_sku(sku):
        raise HTTPException(404, f"unknown SKU {sku!r}")
    to_s = rt.clock() if to is None else to
    from_s = to_s - 3600.0 if from_ is None else from_
    if from_s >= to_s:
        raise RequestValidationError([{"loc": ("query", "from"), "msg": "from must be before to"}])
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
