"""The live WebSocket, ``/api/v1/live``: a snapshot on connect, then deltas from the runtime bus.

Fan-out never makes the bus publisher wait. The bus calls ``LiveHub.on_events`` synchronously on
the ingest path; it turns each event into one wire message (once, whatever the number of clients)
and offers it to every client: an append to a bounded per-client queue, O(1) per client per
event. A client's own task serialises (once per message, shared by all clients) and sends. A
client that cannot keep up loses its *oldest* queued messages; the count is reported to it in a
``dropped`` message followed by a fresh ``snapshot`` (at most one every ``RESYNC_MIN_S``), so its
picture is whole again. Shelf updates are coalesced per shelf while queued: a client that is
behind gets the newest state of a shelf once, not every intermediate count.

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

log = logging.getLogger("floorhand.api.live")

CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN_ORIGIN = 4403
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

    __slots__ = ("_data", "body", "key")

    def __init__(self, body: dict[str, Any], key: str | None = None) -> None:
        self.body = body
        self.key = key
        self._data: bytes | None = None

    @property
    def data(self) -> bytes:
        if self._data is None:
            self._data = _dumps(self.body)
        return self._data


class LiveClient:
    """One connection's bounded queue: drop-oldest, shelf updates coalesced while queued."""

    __slots__ = (
        "coalesced",
        "dropped",
        "hub",
        "id",
        "items",
        "maxsize",
        "pending",
        "principal",
        "ready",
        "sent",
        "unreported",
        "want_snapshot",
    )

    def __init__(self, hub: LiveHub, cid: int, principal: Principal, maxsize: int) -> None:
        self.hub = hub
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
        rt.bus.add_listener(self.on_events)

    # -- bus side (synchronous, on the publisher's path) -----------------------------------------
    def on_events(self, events: list[BusEvent]) -> None:
        if not self.clients:
            return
        # A raise here is the bus's to isolate, count and log (controller/bus.py).
        msgs = [self._message(ev) for ev in events]
        clients = list(self.clients.values())
        for msg in msgs:
            for c in clients:
                c.offer(msg)

    def _message(self, ev: BusEvent) -> Message:
        now = self.clock()
        if isinstance(ev, StockChanged | ShelfStatusChanged):
            sid = ev.shelf_id
            if sid in self._sku_of:
                return Message(
                    {"type": "shelf", "t": now, "shelf": self.shelf_delta(sid)},
                    key="shelf:" + sid,
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
                shelves=list(target.shelves),
            )
        return out

    def snapshot(self) -> dict[str, Any]:
        """The whole picture a client starts from (and resyncs to after drops)."""
        rt = self.rt
        shelves = []
        for cfg in rt.site.shelves:
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
        health = self.reads.health()
        return {
            "type": "snapshot",
            "t": self.clock(),
            "site": {"id": rt.site.site.id, "name": rt.site.site.name},
            "zones": [{"id": z.id, "name": z.name} for z in rt.site.zones],
            "shelves": shelves,
            "skus": [self.sku_view(s.id) for s in rt.site.skus],
            "alerts": self.reads.alerts.alerts(active=True),
            "links": health.links,
            "plcs": [plc.as_dict() for plc in health.plcs.values()],
            "stats": self.stats(),
        }

    def stats(self) -> dict[str, Any]:
        """Counters shared by every client's ``stats`` message (cached for half a period),
        from the supervision service's ``HealthReport``."""
        now = time.monotonic()
        if self._stats_cache is not None and now - self._stats_cache[0] < STATS_EVERY_S / 2:
            return self._stats_cache[1]
        health = self.reads.health()
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
    def _register(self, principal: Principal) -> LiveClient:
        self._next_id += 1
        self.connections += 1
        client = LiveClient(self, self._next_id, principal, self.queue_size)
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
        client = self._register(principal)
        log.info("live: client %d (%s) connected", client.id, principal.name)
        try:
            hello = {
                "type": "hello",
                "t": self.clock(),
                "client": client.id,
                "principal": {"name": principal.name, "role": principal.role.value},
                "queue_size": client.maxsize,
            }
            await ws.send_text(_frame([_dumps(hello), _dumps(self.snapshot())]))
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
                elif typ == "ping":
                    client.offer(Message({"type": "pong", "t": self.clock(), "id": body.get("id")}))
                else:
                    raise ValueError("expected {'type': 'ping'} or {'type': 'resync'}")
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
                batch = client.take(MAX_BATCH)
                parts.extend(m.data for m in batch)
                if client.want_snapshot or (resync_due and now - last_snapshot >= RESYNC_MIN_S):
                    parts.append(_dumps(self.snapshot()))
                    client.want_snapshot = resync_due = False
                    last_snapshot = now
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
                    next_stats = now + STATS_EVERY_S
                if parts:
                    await ws.send_text(_frame(parts))
                    client.sent += len(batch)
                    next_send = now + FLUSH_MIN_S
        except (WebSocketDisconnect, OSError, RuntimeError):
            return  # the receive side sees the disconnect too; it ends the connection


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
