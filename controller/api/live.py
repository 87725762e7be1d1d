"""The live WebSocket, ``/api/v1/live``: a snapshot on connect, then deltas from the runtime bus.

Fan-out never makes the bus publisher wait. The bus calls ``LiveHub.on_events`` synchronously on
the ingest path; it turns each event into one wire message (once, whatever the number of clients)
and offers it to every client: an append to a bounded per-client queue, O(1) per client per
event. A client's own task serialises (once per message, shared by all clients) and sends. A
client that cannot keep up loses its *oldest* queued messages; the count is reported to it in a
``dropped`` message followed by a fresh ``snapshot`` (at most one every ``RESYNC_MIN_S``), so its
picture is whole again. Shelf updates are coalesced per shelf while queued: a client that is
behind gets the newest state of a shelf once, not every intermediate count.

Snapshots are **cached and shared**: one per scope (the whole site, one zone, or the overview
only), built once and reused by every client that asks within ``SNAPSHOT_REUSE_S`` (a reconnect
storm costs one build), each followed by the state messages (shelf, alert, link) published since
it was built, kept in a short log. A client's **scope** (``?scope=site|overview``, ``?zone=Z``,
or a ``subscribe`` message) limits its snapshot and its ``shelf`` messages to one zone (or none),
plus the site overview (counts per state per zone) every second while it changes. The default is
the whole site up to ``SITE_SCOPE_MAX_SHELVES`` shelves, the overview alone above.

Frames are JSON arrays of messages (docs/dashboard.md lists the message types). Authentication:
a bearer token as the WebSocket subprotocol pair ``["bearer", TOKEN]`` (what browsers can send),
an ``Authorization: Bearer`` header or ``?token=``; any role may read. Origin: requests without
an ``Origin`` header (non-browser clients) pass; a browser's ``Origin`` must be the controller's
own (same host and port as the ``Host`` header) or listed in ``[api] allowed_origins``.
Rejections are sent after the handshake so a browser can read them: close code 4403 for the
origin, 4401 for the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import orjson
from fastapi import APIRouter, Depends, FastAPI, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from controller.api.auth import ALL_ROLES, Principal, authenticate, bearer_token, checked_in_handler
from controller.api.metrics import LiveCollector
from controller.config import ShelfConfig
from controller.domain.events import (
    AlertManualNotice,
    AlertNotice,
    BusEvent,
    OrderStateChanged,
    PickTaskChanged,
    SeqGap,
    ShelfStatusChanged,
    StockChanged,
)
from controller.domain.model import StockState
from controller.domain.reorder import AlertAcknowledged, AlertSnoozed, AlertSnoozeEnded, classify
from controller.ports import DeviceStatusChanged, LinkStateChanged
from controller.runtime import Runtime
from controller.services.queries import ReadModel
from controller.services.supervision import HealthReport

log = logging.getLogger("floorhand.api.live")

CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN_ORIGIN = 4403
CLOSE_BAD_SCOPE = 4400
SUBPROTOCOL = "bearer"

MAX_BATCH = 500
"""Messages per frame at most."""
FLUSH_MIN_S = 0.02
"""At most one frame per client per 20 ms: under load, messages gather into fewer, larger
frames (the cost is per frame) and shelf updates coalesce; a quiet stream sends at once."""
STATS_EVERY_S = 1.0
"""A ``stats`` message this often (ingest counters, drops): the page's heartbeat and charts."""
RESYNC_MIN_S = 5.0
"""After drops, a fresh snapshot at most this often per client."""
MAX_CLIENT_MESSAGE = 4096
"""Client messages are tiny commands; anything longer is refused (counted)."""
SITE_SCOPE_MAX_SHELVES = 5_000
"""Default scope: the whole site (every shelf in the snapshot, every shelf update) up to this
many shelves; above it, the overview only (counts per state per zone) until the client
subscribes to a zone."""
SNAPSHOT_REUSE_S = 1.0
"""A cached snapshot serves joining clients this long (then the state messages since it was
built follow it); the next request after that builds a new one."""
SNAPSHOT_LOG_MAX = 20_000
"""State messages kept after the oldest cached snapshot; beyond this the caches are dropped."""
CELL_STATES = ("ok", "low", "critical", "out", "stale", "unknown")
"""The overview's states: the dashboard's cell colours (docs/dashboard.md, "Cell colour")."""
SCOPE_SITE = "site"
SCOPE_OVERVIEW = "overview"
ZONE_PREFIX = "zone:"


def _frame_type(ev: BusEvent) -> str:
    """The frame ``type`` of an event that is not a shelf delta."""
    match ev:
        case LinkStateChanged():
            return "link"
        case DeviceStatusChanged() | SeqGap():
            return "device"
        case PickTaskChanged():
            return "pick"
        case OrderStateChanged():  # and its OrderException echo
            return "order"
        case AlertNotice() | AlertManualNotice():
            return "alert"
        case _:
            return "event"


def _alert_key(ev: AlertNotice | AlertManualNotice) -> str | None:
    if isinstance(ev, AlertNotice):
        return ev.transition.key
    inner = ev.event
    if isinstance(inner, AlertAcknowledged | AlertSnoozed | AlertSnoozeEnded):
        return inner.key
    return None


"""Other kinds are forwarded as they are, typed by prefix (``pick_task`` → ``pick``,
``order_state`` → ``order``); anything else as ``event``. ``alert_*`` events with a known
``key`` (raised, escalated, ack, snooze…) also carry the alert's current public state."""


def _dumps(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body, default=str, option=orjson.OPT_NON_STR_KEYS)


class Message:
    """One wire message, built once and shared by every client's queue; serialised on first
    send. ``key`` is set for messages that supersede older ones with the same key (shelves)."""

    __slots__ = ("_data", "body", "key", "zone")

    def __init__(
        self, body: dict[str, Any], key: str | None = None, zone: str | None = None
    ) -> None:
        self.body = body
        self.key = key
        self.zone = zone
        """The zone of a shelf message: only clients whose scope holds it get it (None: all)."""
        self._data: bytes | None = None

    @property
    def data(self) -> bytes:
        if self._data is None:
            self._data = _dumps(self.body)
        return self._data


_STATE_TYPES = frozenset({"shelf", "alert", "link"})
"""Messages that change what a snapshot holds: logged after a cached snapshot, replayed after it."""


def in_scope(scope: str, msg: Message) -> bool:
    """Whether a client of ``scope`` gets ``msg``: everything but the shelves of other zones."""
    zone = msg.zone
    if zone is None or scope == SCOPE_SITE:
        return True
    return scope == ZONE_PREFIX + zone


class LiveClient:
    """One connection's bounded queue: drop-oldest, shelf updates coalesced while queued."""

    __slots__ = (
        "coalesced",
        "dropped",
        "hub",
        "id",
        "items",
        "maxsize",
        "overview_seen",
        "pending",
        "principal",
        "ready",
        "scope",
        "sent",
        "unreported",
        "want_snapshot",
    )

    def __init__(
        self, hub: LiveHub, cid: int, principal: Principal, maxsize: int, scope: str = SCOPE_SITE
    ) -> None:
        self.hub = hub
        self.scope = scope
        """``site``, ``overview`` or ``zone:<id>``: what its snapshot and shelf messages cover."""
        self.overview_seen = -1
        self.id = cid
        self.principal = principal
        self.maxsize = maxsize
        self.items: deque[list[Message]] = deque()
        self.pending: dict[str, list[Message]] = {}
        self.ready = asyncio.Event()
        self.dropped = 0
        self.unreported = 0
        self.coalesced = 0
        self.sent = 0
        self.want_snapshot = False

    def wants(self, msg: Message) -> bool:
        """A message for every client, or a shelf message of a zone in this client's scope."""
        return in_scope(self.scope, msg)

    def offer(self, msg: Message) -> None:
        key = msg.key
        if key is not None:
            slot = self.pending.get(key)
            if slot is not None:
                slot[0] = msg  # same place in the queue, newest content
                self.coalesced += 1
                return
        if len(self.items) >= self.maxsize:
            old = self.items.popleft()
            old_key = old[0].key
            if old_key is not None and self.pending.get(old_key) is old:
                del self.pending[old_key]
            self.dropped += 1
            self.unreported += 1
            self.hub.dropped_total += 1
        slot = [msg]
        self.items.append(slot)
        if key is not None:
            self.pending[key] = slot
        self.ready.set()

    def take(self, limit: int) -> list[Message]:
        out: list[Message] = []
        items, pending = self.items, self.pending
        while items and len(out) < limit:
            slot = items.popleft()
            msg = slot[0]
            if msg.key is not None and pending.get(msg.key) is slot:
                del pending[msg.key]
            out.append(msg)
        return out

    def __len__(self) -> int:
        return len(self.items)


def origin_allowed(origin: str | None, host: str | None, allowed: Iterable[str]) -> bool:
    """No ``Origin`` (not a browser) passes; else same scheme-less host:port as ``Host``, or an
    exact entry of ``allowed`` (``scheme://host[:port]``), or ``*`` in ``allowed``."""
    if origin is None:
        return True
    o = origin.strip().lower().rstrip("/")
    allowed_set = {a.lower().rstrip("/") for a in allowed}
    if "*" in allowed_set or o in allowed_set:
        return True
    parts = urlsplit(o)
    if parts.scheme not in ("http", "https") or not parts.netloc or host is None:
        return False
    netloc = parts.netloc
    default = ":443" if parts.scheme == "https" else ":80"
    h = host.strip().lower()
    return netloc == h or netloc + default == h or netloc == h.removesuffix(default)


def offered_token(ws: WebSocket) -> tuple[str | None, str | None]:
    """``(token, subprotocol to answer)``: the subprotocol pair ``bearer, TOKEN`` first, then the
    ``Authorization`` header or ``?token=``."""
    protocols = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",")]
    protocols = [p for p in protocols if p]
    if SUBPROTOCOL in protocols:
        i = protocols.index(SUBPROTOCOL)
        token = protocols[i + 1] if i + 1 < len(protocols) else None
        return token, SUBPROTOCOL
    return bearer_token(ws), None


class LiveHub:
    """Bus listener and registry of live clients (``app.state.live``)."""

    def __init__(
        self,
        rt: Runtime,
        reads: ReadModel,
        *,
        queue_size: int = 2_000,
        allowed_origins: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.rt = rt
        self.reads = reads
        self.queue_size = queue_size
        self.allowed_origins = tuple(allowed_origins)
        self.clock = clock
        self.clients: dict[int, LiveClient] = {}
        self._next_id = 0
        self.dropped_total = 0
        self.connections = 0
        self.refused: dict[str, int] = {"origin": 0, "token": 0}
        self.bad_client_messages = 0
        self._sku_of = {sid: spec.sku for sid, spec in rt.specs.items()}
        self._sku_cfg = {s.id: s for s in rt.site.skus}
        self._stats_cache: tuple[float, dict[str, Any]] | None = None
        self._health_cache: tuple[float, HealthReport] | None = None
        # Shared snapshots: scope -> (position in the state log when built, frame bytes).
        self._snapshots: dict[str, tuple[int, bytes]] = {}
        self._log: list[Message] = []
        self._log_since = 0.0  # monotonic time of the oldest cached snapshot
        self.snapshot_builds = 0
        """Snapshots built (each shared by the clients that join or resync in its window)."""
        # Overview: each shelf's cell state and the counts per zone, kept from dirty shelves.
        self._zone_of: dict[str, str] = {}
        self._zone_shelves: dict[str, list[ShelfConfig]] = {}
        self._cells: dict[str, str] | None = None
        self._counts: dict[str, dict[str, int]] = {}
        self._dirty_shelves: set[str] = set()
        self._overview_version = 0
        self._overview_cache: tuple[float, Message] | None = None
        self._index_zones()
        rt.bus.add_listener(self.on_events)

    def apply_catalogue(self) -> None:
        """After a live catalogue change (docs/catalogue.md): each shelf's SKU, each SKU's
        record, the zones of the shelves."""
        self._sku_of = {sid: spec.sku for sid, spec in self.rt.specs.items()}
        self._sku_cfg = {s.id: s for s in self.rt.site.skus}
        self._index_zones()

    def _index_zones(self) -> None:
        """Zones of the shelves (site order); drops the cached snapshots and overview."""
        self._zone_of = {cfg.id: cfg.zone for cfg in self.rt.site.shelves}
        self._zone_shelves = {z.id: [] for z in self.rt.site.zones}
        for cfg in self.rt.site.shelves:
            self._zone_shelves.setdefault(cfg.zone, []).append(cfg)
        self._cells = None
        self._overview_cache = None
        self._drop_snapshots()

    def _drop_snapshots(self) -> None:
        self._snapshots.clear()
        self._log.clear()

    @property
    def default_scope(self) -> str:
        """``site`` up to ``SITE_SCOPE_MAX_SHELVES`` shelves, else ``overview``."""
        return SCOPE_SITE if len(self._zone_of) <= SITE_SCOPE_MAX_SHELVES else SCOPE_OVERVIEW

    def parse_scope(self, scope: str | None, zone: str | None) -> str:
        """A client's scope from ``scope`` and ``zone`` (query or ``subscribe``); ValueError names
        an unknown scope or zone."""
        if zone is not None:
            if scope not in (None, "zone"):
                raise ValueError("give either scope or zone")
            if zone not in self._zone_shelves:
                raise ValueError(f"unknown zone {zone!r}")
            return ZONE_PREFIX + zone
        if scope is None:
            return self.default_scope
        if scope in (SCOPE_SITE, SCOPE_OVERVIEW):
            return scope
        raise ValueError("scope must be 'site', 'overview' or 'zone' (with a zone)")

    # -- bus side (synchronous, on the publisher's path) -----------------------------------------
    def on_events(self, events: list[BusEvent]) -> None:
        dirty = self._dirty_shelves
        for ev in events:
            if isinstance(ev, StockChanged | ShelfStatusChanged):
                dirty.add(ev.shelf_id)
            elif isinstance(ev, LinkStateChanged):
                self._health_cache = None  # a snapshot's links are never older than this
        if not self.clients:
            if self._snapshots:  # nobody to replay the log to: the next join builds afresh
                self._drop_snapshots()
            return
        # A raise here is the bus's to isolate, count and log (controller/bus.py).
        msgs = [self._message(ev) for ev in events]
        if self._snapshots:
            log = self._log
            log.extend(m for m in msgs if m.body["type"] in _STATE_TYPES)
            if len(log) > SNAPSHOT_LOG_MAX:
                self._drop_snapshots()
        clients = list(self.clients.values())
        for msg in msgs:
            if msg.zone is None:
                for c in clients:
                    c.offer(msg)
            else:
                for c in clients:
                    if c.wants(msg):
                        c.offer(msg)

    def _message(self, ev: BusEvent) -> Message:
        now = self.clock()
        if isinstance(ev, StockChanged | ShelfStatusChanged):
            sid = ev.shelf_id
            if sid in self._sku_of:
                return Message(
                    {"type": "shelf", "t": now, "shelf": self.shelf_delta(sid)},
                    key="shelf:" + sid,
                    zone=self._zone_of.get(sid),
                )
        elif isinstance(ev, AlertNotice | AlertManualNotice):
            key = _alert_key(ev)
            if key is not None and self.reads.alerts.has_key(key):
                alert = self.reads.alerts.alert(key)
                body = ev.as_dict()
                return Message({"type": "alert", "t": now, "event": body, "alert": alert})
        # The wire dict is made here, at the edge (the frame's bytes are the journal body's).
        return Message({"type": _frame_type(ev), "t": now, "event": ev.as_dict()})

    # -- views -------------------------------------------------------------------------------------
    def shelf_delta(self, sid: str) -> dict[str, Any]:
        """The dynamic part of a shelf, with its SKU's level and state."""
        st = self.reads.stock.state(sid)
        sku = self._sku_of[sid]
        return {
            "id": sid,
            "status": st.status.value,
            "units": st.units,
            "weight_g": st.weight_g,
            "last_reading_ts": st.last_ts_s,
            "sku": self.sku_view(sku, brief=True),
        }

    def sku_view(self, sku_id: str, *, brief: bool = False) -> dict[str, Any]:
        alerts = self.rt.alerts
        target = alerts.targets[sku_id]
        level = alerts.level_of(sku_id)
        state: StockState = classify(level, target.policy)
        out: dict[str, Any] = {"sku": sku_id, "level": level, "state": state.value}
        if not brief:
            cfg = self._sku_cfg[sku_id]
            out.update(
                name=cfg.name,
                reorder_point=cfg.reorder_point,
                safety_stock=cfg.safety_stock,
                max_stock=cfg.max_stock,
                lead_time_d=cfg.lead_time_d,
                pack_multiple=cfg.pack_multiple,
                shelves=list(target.shelves),
            )
        return out

    def snapshot(self, scope: str = SCOPE_SITE) -> dict[str, Any]:
        """The picture a client starts from (and resyncs to after drops): the whole site, one
        zone's shelves with their SKUs and alerts, or the overview alone (no shelves)."""
        rt = self.rt
        if scope == SCOPE_SITE:
            cfgs: Iterable[ShelfConfig] = rt.site.shelves
        elif scope.startswith(ZONE_PREFIX):
            cfgs = self._zone_shelves.get(scope.removeprefix(ZONE_PREFIX), ())
        else:
            cfgs = ()
        shelves = []
        for cfg in cfgs:
            st = self.reads.stock.state(cfg.id)
            shelves.append(
                {
                    "id": cfg.id,
                    "zone": cfg.zone,
                    "location": cfg.location,
                    "sku": cfg.sku,
                    "capacity_units": cfg.capacity_units,
                    "status": st.status.value,
                    "units": st.units,
                    "weight_g": st.weight_g,
                    "last_reading_ts": st.last_ts_s,
                }
            )
        health = self._health()
        alerts = self.reads.alerts.alerts(active=True)
        if scope == SCOPE_SITE:
            skus = [self.sku_view(s.id) for s in rt.site.skus]
        else:
            sku_ids = dict.fromkeys(sh["sku"] for sh in shelves)
            ids = {sh["id"] for sh in shelves}
            skus = [self.sku_view(sku) for sku in sku_ids if sku in self._sku_cfg]
            alerts = [
                a for a in alerts if a["key"] in sku_ids or a["key"].removeprefix("shelf:") in ids
            ]
        return {
            "type": "snapshot",
            "t": self.clock(),
            "scope": self.scope_view(scope),
            "site": {"id": rt.site.site.id, "name": rt.site.site.name},
            "zones": [{"id": z.id, "name": z.name} for z in rt.site.zones],
            "shelves": shelves,
            "skus": skus,
            "alerts": alerts,
            "links": health.links,
            "plcs": [plc.as_dict() for plc in health.plcs.values()],
            "stats": self.stats(),
            "overview": self.overview().body["zones"],
        }

    def scope_view(self, scope: str) -> dict[str, Any]:
        """``{"kind": "site" | "zone" | "overview", "zone": id or None, "default": …}``."""
        zone = scope.removeprefix(ZONE_PREFIX) if scope.startswith(ZONE_PREFIX) else None
        return {
            "kind": "zone" if zone is not None else scope,
            "zone": zone,
            "default": self.default_scope,
            "shelves_total": len(self._zone_of),
            "site_scope_max_shelves": SITE_SCOPE_MAX_SHELVES,
        }

    def shared_snapshot(self, scope: str) -> tuple[bytes, list[Message]]:
        """The snapshot of ``scope`` as sent (built at most once per ``SNAPSHOT_REUSE_S``,
        shared) and the state messages published since it was built, for the caller to send
        after it. Synchronous: nothing can be published between the two."""
        now = time.monotonic()
        if self._snapshots and now - self._log_since > SNAPSHOT_REUSE_S:
            self._drop_snapshots()
        cached = self._snapshots.get(scope)
        if cached is None:
            if not self._snapshots:
                self._log_since = now
            cached = (len(self._log), _dumps(self.snapshot(scope)))
            self._snapshots[scope] = cached
            self.snapshot_builds += 1
        pos, data = cached
        return data, [m for m in self._log[pos:] if in_scope(scope, m)]

    # -- overview ----------------------------------------------------------------------------------
    def _cell_state(self, sid: str) -> str:
        """As the dashboard colours a cell: stale, unknown, out (the shelf empty), else its
        SKU's state."""
        st = self.reads.stock.state(sid)
        status = st.status.value
        if status == "stale":
            return "stale"
        if st.units is None or status == "unknown":
            return "unknown"
        if st.units <= 0:
            return "out"
        sku = self._sku_of.get(sid)
        if sku is None or sku not in self.rt.alerts.targets:
            return "unknown"
        alerts = self.rt.alerts
        return classify(alerts.level_of(sku), alerts.targets[sku].policy).value

    def overview(self) -> Message:
        """The ``overview`` message: shelves per cell state per zone, and a ``version`` that
        moves when they do. Built once (O(shelves)), then kept from the shelves changed since
        (and the other shelves of their SKUs); cached for half a stats period and shared."""
        now = time.monotonic()
        if self._overview_cache is not None and now - self._overview_cache[0] < STATS_EVERY_S / 2:
            return self._overview_cache[1]
        cells = self._cells
        counts = self._counts
        changed = False
        if cells is None:
            self._dirty_shelves.clear()
            cells = self._cells = {}
            counts = self._counts = {z: dict.fromkeys(CELL_STATES, 0) for z in self._zone_shelves}
            for sid, zone in self._zone_of.items():
                state = cells[sid] = self._cell_state(sid)
                counts.setdefault(zone, dict.fromkeys(CELL_STATES, 0))[state] += 1
            changed = True
        elif self._dirty_shelves:
            targets = self.rt.alerts.targets
            todo: set[str] = set()
            for sid in self._dirty_shelves:
                todo.add(sid)
                target = targets.get(self._sku_of.get(sid, ""))
                if target is not None:
                    todo.update(target.shelves)
            self._dirty_shelves.clear()
            for sid in todo:
                if sid not in self._zone_of:
                    continue
                zone = self._zone_of[sid]
                new = self._cell_state(sid)
                old = cells.get(sid)
                if new != old:
                    cells[sid] = new
                    if old is not None:
                        counts[zone][old] -= 1
                    counts[zone][new] += 1
                    changed = True
        if changed:
            self._overview_version += 1
        zones = [
            {"zone": z, "shelves": sum(c.values()), "states": dict(c)} for z, c in counts.items()
        ]
        msg = Message(
            {
                "type": "overview",
                "t": self.clock(),
                "version": self._overview_version,
                "zones": zones,
            }
        )
        self._overview_cache = (now, msg)
        return msg

    def _health(self) -> HealthReport:
        """The supervision service's report, shared by the stats and the snapshots built within
        half a stats period (it counts every shelf's status: O(shelves) a call)."""
        now = time.monotonic()
        if self._health_cache is None or now - self._health_cache[0] >= STATS_EVERY_S / 2:
            self._health_cache = (now, self.reads.health())
        return self._health_cache[1]

    def stats(self) -> dict[str, Any]:
        """Counters shared by every client's ``stats`` message (cached for half a period),
        from the supervision service's ``HealthReport``."""
        now = time.monotonic()
        if self._stats_cache is not None and now - self._stats_cache[0] < STATS_EVERY_S / 2:
            return self._stats_cache[1]
        health = self._health()
        ing = health.ingest
        body = {
            "readings": ing.readings,
            "messages": ing.messages,
            "rejected": sum(ing.rejected.values()),
            "bus_events": health.bus_events,
            "alerts_active": health.alerts.active,
            "mqtt": health.mqtt.state,
            "backpressure": ing.backpressure,
            "ready": health.ready,
            "clients": len(self.clients),
            "dropped_total": self.dropped_total,
        }
        self._stats_cache = (now, body)
        return body

    def summary(self) -> dict[str, Any]:
        """Figures for health/metrics: clients, queued, drops, refusals."""
        return {
            "clients": len(self.clients),
            "connections": self.connections,
            "queued": sum(len(c) for c in self.clients.values()),
            "dropped_total": self.dropped_total,
            "refused": dict(self.refused),
            "bad_client_messages": self.bad_client_messages,
        }

    # -- connection side ---------------------------------------------------------------------------
    def _register(self, principal: Principal, scope: str) -> LiveClient:
        self._next_id += 1
        self.connections += 1
        client = LiveClient(self, self._next_id, principal, self.queue_size, scope)
        self.clients[client.id] = client
        return client

    async def serve(self, ws: WebSocket) -> None:
        token, subprotocol = offered_token(ws)
        origin = ws.headers.get("origin")
        if not origin_allowed(origin, ws.headers.get("host"), self.allowed_origins):
            self.refused["origin"] += 1
            log.warning("live: refused a WebSocket from origin %r", origin)
            await _refuse(ws, subprotocol, CLOSE_FORBIDDEN_ORIGIN, "origin not allowed")
            return
        principal = authenticate(ws.app, token)
        if principal is None:
            self.refused["token"] += 1
            hook: Callable[[str], None] | None = getattr(ws.app.state, "on_auth_failure", None)
            if hook is not None:
                hook("unauthenticated")
            await _refuse(ws, subprotocol, CLOSE_UNAUTHORIZED, "missing or invalid bearer token")
            return
        await ws.accept(subprotocol=subprotocol)
        try:
            scope = self.parse_scope(
                ws.query_params.get("scope"), ws.query_params.get("zone") or None
            )
        except ValueError as exc:
            self.bad_client_messages += 1
            await ws.close(code=CLOSE_BAD_SCOPE, reason=str(exc)[:120])
            return
        # Registered, then the shared snapshot and the state messages since it was built queued
        # first: no await in between, so the client misses nothing after the snapshot.
        client = self._register(principal, scope)
        snapshot, since = self.shared_snapshot(scope)
        for m in since:
            client.offer(m)
        log.info("live: client %d (%s) connected, scope %s", client.id, principal.name, scope)
        try:
            hello = {
                "type": "hello",
                "t": self.clock(),
                "client": client.id,
                "principal": {"name": principal.name, "role": principal.role.value},
                "queue_size": client.maxsize,
                "scope": self.scope_view(scope),
            }
            # The shared snapshot's overview may be older than the hub's: the first stats tick
            # sends the current one (overview_seen starts at -1).
            await ws.send_text(_frame([_dumps(hello), snapshot]))
            async with asyncio.TaskGroup() as tg:
                recv = tg.create_task(self._receive(ws, client), name=f"live-recv-{client.id}")
                send = tg.create_task(self._send(ws, client), name=f"live-send-{client.id}")
                recv.add_done_callback(lambda _: send.cancel())
                send.add_done_callback(lambda _: recv.cancel())
        except (WebSocketDisconnect, OSError, RuntimeError):
            pass  # the peer went away while we sent the snapshot
        finally:
            del self.clients[client.id]
            log.info(
                "live: client %d gone (sent %d, dropped %d)",
                client.id,
                client.sent,
                client.dropped,
            )

    async def _receive(self, ws: WebSocket, client: LiveClient) -> None:
        while True:
            try:
                msg = await ws.receive()
            except (WebSocketDisconnect, OSError, RuntimeError):
                return
            if msg["type"] == "websocket.disconnect":
                return
            raw = msg.get("text") or msg.get("bytes") or ""
            try:
                if len(raw) > MAX_CLIENT_MESSAGE:
                    raise ValueError(f"message longer than {MAX_CLIENT_MESSAGE} bytes")
                body = orjson.loads(raw)
                typ = body.get("type") if isinstance(body, dict) else None
                if typ == "resync":
                    client.want_snapshot = True
                    client.ready.set()
                elif typ == "subscribe":
                    scope = self.parse_scope(_opt_str(body, "scope"), _opt_str(body, "zone"))
                    client.scope = scope
                    client.want_snapshot = True
                    client.ready.set()
                elif typ == "ping":
                    client.offer(Message({"type": "pong", "t": self.clock(), "id": body.get("id")}))
                else:
                    raise ValueError("expected a message of type 'ping', 'resync' or 'subscribe'")
            except (ValueError, TypeError) as exc:  # orjson.JSONDecodeError is a ValueError
                self.bad_client_messages += 1
                client.offer(Message({"type": "error", "t": self.clock(), "detail": str(exc)}))

    async def _send(self, ws: WebSocket, client: LiveClient) -> None:
        next_stats = time.monotonic() + STATS_EVERY_S
        last_snapshot = time.monotonic()
        next_send = 0.0
        resync_due = False
        try:
            while True:
                now = time.monotonic()
                if not client.items and not client.want_snapshot and now < next_stats:
                    client.ready.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(next_stats - now):
                            await client.ready.wait()
                    now = time.monotonic()
                if now < next_send:
                    await asyncio.sleep(next_send - now)
                    now = time.monotonic()
                parts: list[bytes] = []
                if client.unreported:
                    parts.append(
                        _dumps(
                            {
                                "type": "dropped",
                                "t": self.clock(),
                                "count": client.unreported,
                                "total": client.dropped,
                                "all_clients_total": self.dropped_total,
                            }
                        )
                    )
                    client.unreported = 0
                    resync_due = True
                if client.want_snapshot or (resync_due and now - last_snapshot >= RESYNC_MIN_S):
                    # The (shared) snapshot, the state messages since it was built, then the
                    # queue less those: a queued shelf of another zone is harmless to the page.
                    snapshot, since = self.shared_snapshot(client.scope)
                    parts.append(snapshot)
                    parts.extend(m.data for m in since)
                    replayed = {id(m) for m in since}
                    batch = [m for m in client.take(MAX_BATCH) if id(m) not in replayed]
                    client.overview_seen = -1  # as at connect: the current one follows
                    client.want_snapshot = resync_due = False
                    last_snapshot = now
                else:
                    batch = client.take(MAX_BATCH)
                parts.extend(m.data for m in batch)
                if now >= next_stats:
                    stats = dict(self.stats())
                    stats.update(
                        type="stats",
                        t=self.clock(),
                        client_dropped=client.dropped,
                        client_queued=len(client),
                        client_sent=client.sent,
                    )
                    parts.append(_dumps(stats))
                    overview = self.overview()
                    if overview.body["version"] != client.overview_seen:
                        client.overview_seen = overview.body["version"]
                        parts.append(overview.data)
                    next_stats = now + STATS_EVERY_S
                if parts:
                    await ws.send_text(_frame(parts))
                    client.sent += len(batch)
                    next_send = now + FLUSH_MIN_S
        except (WebSocketDisconnect, OSError, RuntimeError):
            return  # the receive side sees the disconnect too; it ends the connection


def _opt_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None or isinstance(value, str):
        return value or None
    raise ValueError(f"{name} must be a string")


async def _refuse(ws: WebSocket, subprotocol: str | None, code: int, reason: str) -> None:
    """Complete the handshake, then close with ``code``: a browser sees the code and reason (a
    refused handshake would only show 1006)."""
    await ws.accept(subprotocol=subprotocol)
    if ws.application_state is WebSocketState.CONNECTED:
        await ws.close(code=code, reason=reason)


def _frame(parts: list[bytes]) -> str:
    return (b"[" + b",".join(parts) + b"]").decode()


def install_live(app: FastAPI, rt: Runtime) -> LiveHub:
    """Add ``/api/v1/live`` to ``app``; the hub is ``app.state.live``."""
    api = rt.site.api
    reads: ReadModel = app.state.reads  # controller/api/deps.py install_queries, built first
    hub = LiveHub(rt, reads, queue_size=api.live_queue, allowed_origins=api.allowed_origins)
    app.state.live = hub
    metrics = getattr(app.state, "metrics", None)
    if metrics is not None:  # /metrics (controller/api/metrics.py) reports the hub too
        metrics.registry.register(LiveCollector(hub.summary))
    router = APIRouter()

    # Every role may read; the handler authenticates itself (it must answer the subprotocol
    # before it can refuse with a close code a browser can read).
    @router.websocket("/api/v1/live", dependencies=[Depends(checked_in_handler(*ALL_ROLES))])
    async def live(ws: WebSocket) -> None:
        """Snapshot, then deltas (docs/dashboard.md)."""
        await hub.serve(ws)

    app.include_router(router)
    return hub
