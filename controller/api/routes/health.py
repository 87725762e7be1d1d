"""Health and readiness: both render the supervision service's ``HealthReport``
(controller/services/supervision.py), which alone decides ``status`` and ``ready``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from controller.api.deps import PUBLIC, ReadsDep
from controller.api.schemas import (
    CommandLinkPublic,
    HealthPublic,
    HistoryHealth,
    IngestStats,
    LinkPublic,
    PlcLinkSummary,
)
from controller.services.supervision import HealthReport

router = APIRouter()


def health_public(report: HealthReport) -> HealthPublic:
    """The wire form of ``report`` (docs/api.md, ``GET /api/v1/health``)."""
    return HealthPublic(
        status=report.status,
        ready=report.ready,
        site=report.site,
        uptime_s=report.uptime_s,
        mqtt=LinkPublic.model_validate(report.mqtt.as_dict()),
        ingest=IngestStats.model_validate(report.ingest.as_dict()),
        alerts_active=report.alerts.active,
        stale_shelves=report.stale_shelves,
        history=(
            HistoryHealth.model_validate(report.history.as_dict())
            if report.history is not None
            else None
        ),
        plcs={
            pid: PlcLinkSummary.model_validate(plc.as_dict()) for pid, plc in report.plcs.items()
        },
        command_link=(
            CommandLinkPublic.model_validate(report.command_link.as_dict())
            if report.command_link is not None
            else None
        ),
    )


@router.get(
    "/api/v1/health",
    response_model=HealthPublic,
    tags=["health"],
    dependencies=PUBLIC,
)
def health(reads: ReadsDep) -> HealthPublic:
    return health_public(reads.health())


@router.get(
    "/api/v1/ready",
    response_model=HealthPublic,
    tags=["health"],
    responses={503: {"model": HealthPublic}},
    dependencies=PUBLIC,
)
def ready(reads: ReadsDep) -> Any:
    """200 when the journal is open and the broker link is up, else 503."""
    h = health_public(reads.health())
    if not h.ready:
        return JSONResponse(h.model_dump(), status_code=503)
    return h
