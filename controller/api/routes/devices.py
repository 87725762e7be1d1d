"""Devices: the scales ingest hears from and the PLCs' links, from the read model. Readable by
supervisors and engineers (docs/api.md)."""

from __future__ import annotations

from fastapi import APIRouter

from controller.api.deps import READ_ALL, ReadsDep
from controller.api.schemas import DevicePublic, PlcPublic, ScaleChannelPublic, ScalePublic

router = APIRouter()


@router.get(
    "/api/v1/devices",
    response_model=list[DevicePublic],
    tags=["devices"],
    dependencies=READ_ALL,
)
def list_devices(reads: ReadsDep) -> list[DevicePublic]:
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
        for d in reads.devices.devices()
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
    "/api/v1/scales", response_model=list[ScalePublic], tags=["devices"], dependencies=READ_ALL
)
async def list_scales(reads: ReadsDep) -> list[ScalePublic]:
    """Every scale: status, last seen, and per channel its shelf and scale factor."""
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
        for sc in reads.devices.scales()
    ]
