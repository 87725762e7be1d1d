"""Alerts: the reorder alert states (read model), and acknowledging and snoozing an episode.

Supervisors acknowledge and snooze (docs/api.md, "Operations"); each change is committed to the
journal before the answer and evented on the bus. Handlers that change state are ``async
def``: they run on the event loop, like ingest and the supervision tick, so a change never
interleaves with a commit of theirs.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, HTTPException, Path, Query, Request, Response

from controller.api.deps import READ_ALL, ReadsDep, RuntimeDep, Supervisor
from controller.api.paging import (
    DEFAULT_LIMIT,
    PAGE_HEADERS,
    Limit,
    PageCursor,
    Text,
    page_query,
    paged,
)
from controller.api.routes.ops import journal_failed
from controller.api.schemas import AlertAckCreate, AlertPublic, AlertSnoozeCreate, problem_responses
from controller.domain.model import StockState
from controller.domain.reorder import NoActiveEpisode
from controller.ports import JournalError
from controller.services.queries import ReadModel

router = APIRouter()

AlertKey = Annotated[
    str, Path(description="a SKU id, or shelf:<id> for a shelf with its own reorder policy")
]


@router.get(
    "/api/v1/alerts",
    response_model=list[AlertPublic],
    tags=["alerts"],
    dependencies=READ_ALL,
    responses={200: {"headers": PAGE_HEADERS}},
)
def list_alerts(
    request: Request,
    response: Response,
    reads: ReadsDep,
    active: Annotated[bool | None, Query(description="true: only raised episodes")] = None,
    zone: Annotated[
        str | None, Query(description="only keys watching a shelf of this zone")
    ] = None,
    state: Annotated[StockState | None, Query(description="only keys in this stock state")] = None,
    q: Text = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: PageCursor = None,
) -> list[AlertPublic]:
    """Reorder alert state of every SKU (and configured shelf). Paginated in the alert
    service's order (docs/api.md, "Pages"); ``q`` matches the key or the SKU."""
    query = page_query(limit, cursor, zone=zone, state=None if state is None else state.value, q=q)
    page = paged(request, response, query, lambda pq: reads.alerts.alerts_page(pq, active))
    return [AlertPublic(**a) for a in page]


def _alert_key(reads: ReadModel, key: str) -> str:
    if not reads.alerts.has_key(key):
        raise HTTPException(404, f"unknown alert key {key!r}")
    return key


_ERRORS = problem_responses(
    e404="unknown alert key",
    e409="no active episode",
    e503="the journal could not store it",
)


@router.post(
    "/api/v1/alerts/{key}/ack",
    response_model=AlertPublic,
    tags=["alerts"],
    responses=_ERRORS,
)
async def ack_alert(
    rt: RuntimeDep,
    reads: ReadsDep,
    principal: Supervisor,
    key: AlertKey,
    body: Annotated[AlertAckCreate | None, Body()] = None,
) -> AlertPublic:
    """Acknowledge the key's active alert episode. ``by`` is the caller's token name. The ack
    stays on the episode (published on the retained alert topic, kept across restarts) until
    it resolves, or until it escalates to a worse severity, which needs a new ack."""
    _alert_key(reads, key)
    note = body.note if body is not None else ""
    try:
        public = rt.alerts.acknowledge(key, principal.name, note, rt.clock())
    except NoActiveEpisode as exc:
        raise HTTPException(409, str(exc)) from None
    except JournalError as exc:
        raise journal_failed(exc) from None
    return AlertPublic(**public)


@router.post(
    "/api/v1/alerts/{key}/snooze",
    response_model=AlertPublic,
    tags=["alerts"],
    responses=_ERRORS,
)
async def snooze_alert(
    rt: RuntimeDep, reads: ReadsDep, principal: Supervisor, key: AlertKey, body: AlertSnoozeCreate
) -> AlertPublic:
    """Silence re-notification of the key's active episode for ``minutes`` (1..1440), with a
    reason. While snoozed its de-escalation and resolution events carry ``notify: false``; an
    escalation to a worse severity still notifies (and ends the snooze). When the snooze runs
    out with the episode still active, an ``alert_snooze_ended`` event re-notifies."""
    _alert_key(reads, key)
    try:
        public = rt.alerts.snooze(key, principal.name, body.reason, body.minutes * 60.0, rt.clock())
    except NoActiveEpisode as exc:
        raise HTTPException(409, str(exc)) from None
    except JournalError as exc:
        raise journal_failed(exc) from None
    return AlertPublic(**public)
