"""Devices: the scales ingest hears from and the PLCs' links, from the read model. Readable by
supervisors and engineers (docs/api.md)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request, Response

from controller.api.deps import READ_ALL, ReadsDep
from controller.api.paging import (
    DEFAULT_LIMIT,
    PAGE_HEADERS,
    Limit,
    PageCursor,
    Text,
    Zone,
    page_query,
    paged,
)
from controller.api.schemas import DevicePublic, PlcPublic, ScaleChannelPublic, ScalePublic
from controller.services.queries import PageQuery

router = APIRouter()

ScaleState = Annotated[
    Literal["ok", "stale", "offline", "unknown"] | None,
    Query(
        description="only scales in this state (unknown: never reported; offline: ESPHome said "
        "so; stale: silent for longer than its staleness bound; else ok)"
    ),
]


async def _scale_page(
    zone: Zone = None,
    state: ScaleState = None,
    q: Text = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: PageCursor = None,
) -> PageQuery:
    return page_query(limit, cursor, zone=zone, state=state, q=q)


ScalePageQuery = Annotated[PageQuery, Depends(_scale_page)]
"""The page of ``/devices`` and ``/scales`` (docs/api.md, "Pages")."""


@router.get(
    "/api/v1/devices",
    response_model=list[DevicePublic],
    tags=["devices"],
    dependencies=READ_ALL,
    responses={200: {"headers": PAGE_HEADERS}},
)
def list_devices(
    request: Request, response: Response, reads: ReadsDep, query: ScalePageQuery
) -> list[DevicePublic]:
    """Per scale: last seen, stale, applied readings, last seq, gaps. Paginated in site order
    (docs/api.md, "Pages"); ``q`` matches the scale's id."""
    return [
        DevicePublic(
            id=d.id,
            zone=d.zone,
            format=d.format,
            last_seen=d.last_seen_s,
            stale=d.stale,
            online=d.online,
            epoch=d.epoch,
            last_seq=d.last_seq,
            applied=d.applied,
            gaps=d.gaps,
            missing_readings=d.missing_readings,
        )
        for d in paged(request, response, query, reads.devices.devices_page)
    ]


@router.get(
    "/api/v1/plcs",
    response_model=list[PlcPublic],
    tags=["devices"],
    dependencies=READ_ALL,
)
def list_plcs(reads: ReadsDep) -> list[PlcPublic]:
    return [PlcPublic(**plc.as_dict()) for plc in reads.plcs()]


@router.get(
    "/api/v1/scales",
    response_model=list[ScalePublic],
    tags=["devices"],
    dependencies=READ_ALL,
    responses={200: {"headers": PAGE_HEADERS}},
)
def list_scales(
    request: Request, response: Response, reads: ReadsDep, query: ScalePageQuery
) -> list[ScalePublic]:
    """Every scale: status, last seen, and per channel its shelf and scale factor. Paginated
    in site order (docs/api.md, "Pages"); ``state`` filters on ``status``, ``q`` matches the
    scale's id."""
    return [
        ScalePublic(
            id=sc.id,
            zone=sc.zone,
            format=sc.format,
            status=sc.status,
            last_seen=sc.last_seen_s,
            reporting_interval_s=sc.reporting_interval_s,
            max_weight_g=sc.max_weight_g,
            channels=[
                ScaleChannelPublic(
                    channel=ch.channel,
                    shelf=ch.shelf,
                    shelf_status=ch.shelf_status,
                    scale_factor=ch.scale_factor,
                )
                for ch in sc.channels
            ],
        )
        for sc in paged(request, response, query, reads.devices.scales_page)
    ]
