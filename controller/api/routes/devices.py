"""Devices: the scales ingest hears from and the PLCs' links, from the read model."""

from __future__ import annotations

from fastapi import APIRouter

from controller.api.deps import READ_ALL, ReadsDep
from controller.api.schemas import DevicePublic, PlcPublic

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
