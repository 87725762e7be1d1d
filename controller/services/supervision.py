"""Supervision: the periodic tick, outbox housekeeping, the backpressure gate, the controller's
system alerts, link events, and the one ``HealthReport`` every reader of health renders.

``SupervisionService`` owns what keeps the controller honest about itself:

* every ``tick_s`` (the ``supervision`` task): shelf staleness (``ingest.tick``), alert dwell
  timers (``alerts.tick``), a bounded re-send of alert states that did not fit the link's
  queue, outbox housekeeping (the recent-readings window with no historian, dead letters) and
  the backpressure decision;
* the backpressure gate: while the outbox is at its bound (``[journal] max_outbox_rows``),
  reading from the broker is held (``ReadGate``, reason ``outbox``; the broker keeps the
  messages) and the retained system alert ``<prefix>/<site>/alerts/system/outbox_full`` is
  active; the bound is also checked right after each ingest commit (``check_outbox_bound``);
* link events: a link state change (broker, PLCs) is journaled and published on the bus;
* ``report()``: one frozen ``HealthReport`` with the status rule (``starting`` / ``degraded``
  / ``ok``) and readiness. ``/api/v1/health``, ``/api/v1/ready``, ``/metrics`` and the live
  feed's ``stats`` all render it; nothing else decides whether the controller is degraded.

Its inputs are this module's Protocols (the link, the journal, ingest, alerts, history, PLCs),
so it is tested with fakes of them (tests/unit/test_supervision.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Collection, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, Protocol

import orjson

from controller.domain.events import BusEvent, CatalogChanged, ShelfStatusChanged
from controller.domain.model import ShelfStatus
from controller.domain.reorder import AlertState, Episode
from controller.ports import EventRow, LinkState, LinkStateChanged, ReadingRow
from devices.errors import DeviceError

log = logging.getLogger("floorhand.supervision")

TICK_S = 0.5
"""Supervision period: staleness, alert dwell timers, outbox housekeeping."""

ALERT_REPUBLISH_QUEUE = 2_000
"""Deferred alert states are re-sent while fewer publishes than this are queued."""

RETAIN_OUTBOX_ROWS = 1_000_000
"""With history disabled the journal keeps this many recent readings for inspection."""

ALERT_STATES = ("ok", "low", "critical", "out", "unknown")
"""Stock states of alert targets, in the order health figures list them."""

HealthStatus = Literal["starting", "degraded", "ok"]
LinkStateName = Literal["connecting", "up", "down"]
PlcHealthName = Literal["ok", "faulty"]

_STATE_NAMES: dict[LinkState, LinkStateName] = {
    LinkState.CONNECTING: "connecting",
    LinkState.UP: "up",
    LinkState.DOWN: "down",
}


def link_state_name(state: LinkState) -> LinkStateName:
    """``state``'s value, typed as the wire's names."""
    return _STATE_NAMES[state]


# -- what supervision reads and drives (our own interfaces) ---------------------------------------


class ReadPauser(Protocol):
    """Stops and resumes reading from the broker (the MQTT link)."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class LinkCounters(Protocol):
    """The broker link's counters that health reports."""

    @property
    def connects(self) -> int: ...

    @property
    def oversize_in(self) -> int: ...

    @property
    def invalid_in(self) -> int: ...

    @property
    def qos_downgraded(self) -> int: ...

    @property
    def retain_dropped(self) -> int: ...


class SessionLink(Protocol):
    """A second broker session as health sees it (the pick command session)."""

    @property
    def state(self) -> LinkState: ...

    @property
    def since(self) -> float: ...

    @property
    def session_present(self) -> bool: ...

    @property
    def last_error(self) -> str: ...

    @property
    def stats(self) -> LinkCounters: ...


class BrokerLink(ReadPauser, Protocol):
    """The MQTT link as supervision sees it: its state and figures, and publishing."""

    @property
    def state(self) -> LinkState: ...

    @property
    def since(self) -> float:
        """``time.monotonic()`` when the link came up (while up), else when it went down."""
        ...

    @property
    def session_present(self) -> bool: ...

    @property
    def server_max_qos(self) -> int: ...

    @property
    def retain_available(self) -> bool: ...

    @property
    def granted_qos(self) -> Mapping[str, int]: ...

    @property
    def warnings(self) -> list[str]: ...

    @property
    def last_error(self) -> str: ...

    @property
    def stats(self) -> LinkCounters: ...

    @property
    def queued_publishes(self) -> int: ...

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None: ...


class SupervisedJournal(Protocol):
    """The journal's outbox size, its housekeeping, and event commits."""

    @property
    def outbox_rows(self) -> int: ...

    def trim_outbox(self, keep_readings: int, keep_events: int) -> int: ...

    def trim_dead_letters(self, keep: int) -> int: ...

    def commit(self, readings: Sequence[ReadingRow], *, events: Sequence[EventRow]) -> None: ...


class SupervisedIngest(Protocol):
    """Ingest's staleness tick, counters and shelf states."""

    messages: int
    readings: int
    commits: int
    commit_failures: int
    ignored_retained: int
    late_readings: int
    last_commit_error: str | None

    @property
    def rejected(self) -> MutableMapping[str, int]: ...

    def shelf_status_counts(self) -> Mapping[str, int]:
        """Shelves per status value (every status present, 0 included)."""
        ...

    def tick(self, now: float) -> list[BusEvent]: ...


class SupervisedAlerts(Protocol):
    """The alert service's dwell tick, deferred publishes and states."""

    @property
    def alerts(self) -> Mapping[str, AlertState]: ...

    def figures(self) -> tuple[Mapping[str, int], list[Episode]]:
        """Keys per state and the active episodes, without a pass over every key."""
        ...

    @property
    def unpublished(self) -> Collection[str]: ...

    def tick(self, now_s: float) -> None: ...

    def retry_unpublished(self, budget: int) -> int: ...


class SupervisedHistory(Protocol):
    """The historian's figures (``HistoryService.snapshot()``)."""

    def snapshot(self) -> dict[str, Any]: ...


class SupervisedPlc(Protocol):
    """One PLC at run time: its link and driver figures, without I/O."""

    def view(self) -> PlcView: ...


class BusFigures(Protocol):
    @property
    def published(self) -> int: ...


class PauseFigures(Protocol):
    """The main loop's pauses for the control loop (`controller.control.Precedence`)."""

    @property
    def pauses(self) -> int: ...

    @property
    def paused_s(self) -> float: ...


class ControlScheduling(Protocol):
    """How the control loop's thread is scheduled (`controller.control.ControlLoop`)."""

    @property
    def realtime_granted(self) -> int: ...


# -- the report ---------------------------------------------------------------------------------


class _Figures:
    """Frozen figures with a plain-dict form, field for field (the wire models take it)."""

    __slots__ = ()

    def as_dict(self) -> dict[str, Any]:
        figures = fields(self)  # type: ignore[arg-type]  # every subclass is a dataclass
        return {f.name: getattr(self, f.name) for f in figures}


@dataclass(frozen=True, slots=True)
class MqttHealth(_Figures):
    """The broker link: state, session, what the broker weakened, its drop counters."""

    state: LinkStateName
    since_s: float
    session_present: bool
    connects: int
    max_qos: int
    retain_available: bool
    granted_qos: Mapping[str, int]
    warnings: tuple[str, ...]
    oversize_in: int
    invalid_in: int
    qos_downgraded: int
    retain_dropped: int
    last_error: str


@dataclass(frozen=True, slots=True)
class CommandLinkHealth(_Figures):
    """The pick command session (client id ``<client_id>-picks``): down makes the status
    degraded (``mqtt:picks``), not the controller unready."""

    state: LinkStateName
    since_s: float
    session_present: bool
    connects: int
    last_error: str


@dataclass(frozen=True, slots=True)
class IngestHealth(_Figures):
    """Ingest counters, the outbox and backpressure."""

    messages: int
    readings: int
    commits: int
    commit_failures: int
    rejected: Mapping[str, int]
    ignored_retained: int
    late_readings: int
    outbox_rows: int
    max_outbox_rows: int
    backpressure: bool
    last_commit_error: str | None
    oversize: int
    """Messages above ``[mqtt] max_payload_bytes`` (also in ``rejected["oversize"]``)."""


@dataclass(frozen=True, slots=True)
class HistoryHealth(_Figures):
    """The historian (``[history] backend`` other than ``none``)."""

    backend: str
    state: str
    since_s: float
    last_error: str | None
    points_written: int
    batches: int
    retries: int
    rejected_requests: int
    dead_lettered: int
    corrupt_rows: int
    nudged: int
    lag_s: float

    @classmethod
    def from_snapshot(cls, snapshot: Mapping[str, Any]) -> HistoryHealth:
        """From ``HistoryService.snapshot()`` (which may carry more keys)."""
        return cls(**{f.name: snapshot[f.name] for f in fields(cls)})


@dataclass(frozen=True, slots=True)
class PlcView(_Figures):
    """One PLC's link state, health and epoch (``GET /api/v1/plcs``), without I/O."""

    id: str
    kind: str
    endpoint: str
    unit: int
    link: LinkStateName
    since_s: float
    health: PlcHealthName
    fault: str | None
    last_down_reason: str | None
    epoch: int | None
    restarts: int
    connects: int
    heartbeat: bool


@dataclass(frozen=True, slots=True)
class AlertFigures:
    """Alert targets by stock state, and raised episodes (acknowledged, snoozed now)."""

    by_state: Mapping[str, int]
    active: int
    acknowledged: int
    snoozed: int


@dataclass(frozen=True, slots=True)
class HealthReport:
    """The controller's health at one moment. ``status``: ``starting`` until the runtime has
    started, then ``degraded`` while ``degraded_by`` names any reason, else ``ok``."""

    status: HealthStatus
    ready: bool
    """Started (journal open, state restored) and the broker link up."""
    degraded_by: tuple[str, ...]
    """Why the status is degraded: ``not ready``, ``backpressure``, ``journal``, ``history``,
    ``plc:<id>``, ``mqtt warnings``, ``mqtt:picks``; empty when ok (and while starting)."""
    site: str
    uptime_s: float
    mqtt: MqttHealth
    ingest: IngestHealth
    alerts: AlertFigures
    shelves: Mapping[str, int]
    """Shelves by status, every status listed."""
    history: HistoryHealth | None
    plcs: Mapping[str, PlcView]
    bus_events: int
    command_link: CommandLinkHealth | None = None
    """The pick command session (None: a runtime without one)."""
    main_loop_pauses: int = 0
    """Main-loop iterations paused for the control loop's work (the process's)."""
    main_loop_paused_s: float = 0.0
    """Their time in total (s)."""
    control_realtime_priority: int = 0
    """The ``SCHED_FIFO`` priority the control loop's thread runs at; 0: normal scheduling
    (``[process] control_realtime_priority`` 0, or refused)."""

    @property
    def stale_shelves(self) -> int:
        return self.shelves[ShelfStatus.STALE.value]

    @property
    def links(self) -> dict[str, str]:
        """State per link: ``mqtt``, ``mqtt:picks`` (the command session, when there is
        one), then ``plc:<id>`` in site order."""
        out: dict[str, str] = {"mqtt": self.mqtt.state}
        if self.command_link is not None:
            out["mqtt:picks"] = self.command_link.state
        out.update({f"plc:{pid}": plc.link for pid, plc in self.plcs.items()})
        return out


def degraded_reasons(
    *,
    ready: bool,
    backpressure: bool,
    last_commit_error: str | None,
    history_state: str | None,
    plc_links: Mapping[str, str],
    mqtt_warnings: Sequence[str],
    command_link: str | None = None,
) -> tuple[str, ...]:
    """The status rule: what makes a started controller degraded. The command session
    (``command_link``, its state) down is ``mqtt:picks``: degraded, still ready (ingest and
    the HTTP picks do not need it)."""
    reasons: list[str] = []
    if not ready:
        reasons.append("not ready")
    if backpressure:
        reasons.append("backpressure")
    if last_commit_error is not None:
        reasons.append("journal")
    if history_state == "down":
        reasons.append("history")
    reasons += [f"plc:{pid}" for pid, link in plc_links.items() if link != LinkState.UP.value]
    if mqtt_warnings:
        reasons.append("mqtt warnings")
    if command_link is not None and command_link != LinkState.UP.value:
        reasons.append("mqtt:picks")
    return tuple(reasons)


# -- the gate -----------------------------------------------------------------------------------


class ReadGate:
    """Reading from the broker is paused while any holder asks for it (journal failing,
    outbox full, pick commands held at start-up): one holder's release does not undo another's
    hold."""

    def __init__(self, link: ReadPauser) -> None:
        self._link = link
        self.holds: set[str] = set()

    def hold(self, reason: str) -> None:
        if not self.holds:
            self._link.pause_reading()
        self.holds.add(reason)

    def release(self, reason: str) -> None:
        if reason in self.holds:
            self.holds.discard(reason)
            if not self.holds:
                self._link.resume_reading()


# -- the service --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SupervisionSettings:
    site_id: str
    topic_prefix: str
    max_outbox_rows: int
    """The outbox bound: backpressure at or above it."""
    dead_letter_keep: int
    keep_outbox_rows: int | None = None
    """With no historian: the recent rows the journal keeps (None: a historian drains it)."""
    tick_s: float = TICK_S

    @property
    def system_alert_base(self) -> str:
        return f"{self.topic_prefix}/{self.site_id}/alerts/system"


class SupervisionService:
    """See the module docstring. ``started`` is set by the runtime once the journal is open
    and the state restored (``mark_started``)."""

    def __init__(
        self,
        settings: SupervisionSettings,
        *,
        link: BrokerLink,
        gate: ReadGate,
        journal: SupervisedJournal,
        ingest: SupervisedIngest,
        alerts: SupervisedAlerts,
        history: SupervisedHistory | None,
        plcs: Mapping[str, SupervisedPlc],
        bus: BusFigures,
        publish_events: Callable[[list[BusEvent]], None],
        clock: Callable[[], float],
        monotonic: Callable[[], float],
        command_link: SessionLink | None = None,
        main_loop: PauseFigures | None = None,
        control_loop: ControlScheduling | None = None,
    ) -> None:
        self.settings = settings
        self._main_loop = main_loop
        self._control_loop = control_loop
        self._link = link
        self._command_link = command_link
        self.gate = gate
        self._journal = journal
        self._ingest = ingest
        self._alerts = alerts
        self._history = history
        self._plcs = plcs
        self._bus = bus
        self._publish_events = publish_events
        self._clock = clock
        self._monotonic = monotonic
        self.started = asyncio.Event()
        self.started_at_s: float | None = None
        self.backpressure = False
        self.journal_failing = False
        """Ingest holds reading because the journal cannot be written (disk full, I/O error,
        locked): the ``journal_unavailable`` system alert is active."""
        self.oversize = 0
        self.after_tick: list[Callable[[], None]] = []
        """Called after every tick of `run` (``floorhand run``: systemd readiness, watchdog)."""
        self._unsent: dict[str, tuple[bool, float, str | None]] = {}
        """System alerts the link could not queue (broker away, queue full): name → (active,
        since, error), sent again on each tick until the link takes them; a newer state replaces."""
        self._tracking = False
        self._shelf_counts: Counter[str] | None = None
        """Shelves per status, kept from the bus's ``shelf_status_changed`` events once
        `track_shelf_statuses` was called (the report is then O(1) in shelves, not a pass over
        every shelf); counted again at the next tick after a catalogue change."""

    # -- lifecycle ----------------------------------------------------------------------------
    def mark_started(self) -> None:
        self.started_at_s = self._clock()
        self.started.set()
        self._count_shelves()

    def track_shelf_statuses(self) -> None:
        """Keep the shelves per status from the bus (`on_events` must be a bus listener,
        ahead of any listener that reads the report) instead of counting them per report."""
        self._tracking = True
        self._count_shelves()

    def on_events(self, events: list[BusEvent]) -> None:
        """Bus listener: moves the shelf counts with each status change; a catalogue change
        (shelves added or removed without events) has them counted again at the next tick."""
        counts = self._shelf_counts
        if counts is None:
            return
        for ev in events:
            if type(ev) is ShelfStatusChanged:
                counts[ev.old.value] -= 1
                counts[ev.new.value] += 1
            elif type(ev) is CatalogChanged:
                self._shelf_counts = None
                return

    def _count_shelves(self) -> None:
        """Count the shelves per status: on the event loop, outside any bus delivery (at the
        start and at a tick), so every state change so far has had its event delivered."""
        if self._tracking and self.started.is_set():
            self._shelf_counts = Counter(self._ingest.shelf_status_counts())

    @property
    def ready(self) -> bool:
        return self.started.is_set() and self._link.state is LinkState.UP

    async def run(self) -> None:
        """The ``supervision`` task: one ``tick`` every ``tick_s``, then the ``after_tick``
        hooks (the systemd watchdog: it is fed only while this loop runs, so a wedged event
        loop stops feeding it)."""
        while True:
            await asyncio.sleep(self.settings.tick_s)
            self.tick()
            for hook in self.after_tick:
                try:
                    hook()
                except Exception:
                    log.exception("a supervision hook failed")

    def tick(self) -> None:
        now = self._clock()
        if self._tracking and self._shelf_counts is None:
            self._count_shelves()
        self._ingest.tick(now)
        self._alerts.tick(now)
        if self._alerts.unpublished and self._link.state is LinkState.UP:
            # Retained alert states that did not fit the link's queue (large sites at
            # start-up, long outages): a bounded slice per tick, paced by the queue.
            self._alerts.retry_unpublished(ALERT_REPUBLISH_QUEUE - self._link.queued_publishes)
        unsent = dict(self._unsent)  # from earlier ticks; housekeeping may supersede them
        self._housekeeping()
        for name, pending in unsent.items():
            if self._unsent.get(name) == pending:
                active, since_s, error = pending
                self._publish_system_alert(name, active, since_s, error=error)

    # -- outbox and backpressure --------------------------------------------------------------
    def check_outbox_bound(self) -> None:
        """Right after an ingest commit: the bound is enforced by the commit that reached it,
        not at the next tick."""
        if not self.backpressure and self._journal.outbox_rows >= self.settings.max_outbox_rows:
            self._backpressure_on()

    def _housekeeping(self) -> None:
        journal = self._journal
        keep = self.settings.keep_outbox_rows
        try:
            if keep is not None and journal.outbox_rows > keep:
                # No historian: keep a bounded window of recent readings and events (well
                # under the backpressure bound, which is for an unreachable historian only).
                journal.trim_outbox(keep, max(1, keep // 10))
            journal.trim_dead_letters(self.settings.dead_letter_keep)
        except Exception as exc:
            log.error("journal housekeeping failed: %s", exc)
        full = journal.outbox_rows >= self.settings.max_outbox_rows
        if full and not self.backpressure:
            self._backpressure_on()
        elif not full and self.backpressure:
            self.backpressure = False
            self.gate.release("outbox")
            self._publish_system_alert("outbox_full", False)
            log.info("outbox below its bound again: backpressure off")
        self._watch_journal()

    def _watch_journal(self) -> None:
        """Ingest holds reading while its group commit fails (the ``journal`` hold of the
        gate): a retained system alert says so, with the journal's error, and clears once a
        commit got through again (ingest retries on its own; no restart)."""
        failing = "journal" in self.gate.holds
        if failing is self.journal_failing:
            return
        self.journal_failing = failing
        error = self._ingest.last_commit_error if failing else None
        self._publish_system_alert("journal_unavailable", failing, error=error)
        if failing:
            log.error("journal unavailable (%s): not reading from the broker", error)
        else:
            log.info("journal writable again: reading from the broker")

    def _backpressure_on(self) -> None:
        self.backpressure = True
        self.gate.hold("outbox")
        self._publish_system_alert("outbox_full", True)
        hist = self._history.snapshot() if self._history is not None else None
        log.error(
            "outbox full (%d rows): backpressure on, not reading from the broker%s",
            self._journal.outbox_rows,
            f" (history {hist['state']}: {hist['last_error']})" if hist is not None else "",
        )

    def _publish_system_alert(
        self, name: str, active: bool, since_s: float | None = None, *, error: str | None = None
    ) -> None:
        """Retained controller alerts on ``<prefix>/<site>/alerts/system/<name>`` (beside the
        SKU alerts), so supervisors see why ingest stopped reading from the broker. One the
        link cannot queue is kept and sent again by the next tick."""
        since_s = self._clock() if since_s is None else since_s
        hist = self._history.snapshot() if self._history is not None else None
        body = {
            "key": f"system:{name}",
            "active": active,
            "since": since_s,
            "outbox_rows": self._journal.outbox_rows,
            "max_outbox_rows": self.settings.max_outbox_rows,
            "history": hist,
            "plcs": {pid: plc.view().link for pid, plc in self._plcs.items()},
        }
        if name == "journal_unavailable":
            body["error"] = error
        topic = f"{self.settings.system_alert_base}/{name}"
        try:
            self._link.publish(topic, orjson.dumps(body), qos=1, retain=True)
        except DeviceError as exc:  # queue full while the broker is unreachable
            pending = self._unsent.get(name)
            if pending is None or pending[0] is not active:  # once per state, not per tick
                log.error("could not publish the %s alert (sent again later): %s", name, exc)
            self._unsent[name] = (active, since_s, error)
            return
        self._unsent.pop(name, None)

    # -- link events and oversize messages ------------------------------------------------------
    def on_link_state(self, old: LinkState, new: LinkState, *, link: str = "mqtt") -> None:
        """Link state changes (broker, PLCs) are events like any other: journaled for the
        history, published on the bus for live consumers."""
        now = self._clock()
        event = LinkStateChanged(now, link, old, new)
        try:
            self._journal.commit((), events=[EventRow(now, event.kind, event.as_dict())])
        except Exception as exc:
            log.error("could not journal the link state change: %s", exc)
        self._publish_events([event])

    def plc_state_listener(self, plc_id: str) -> Callable[[LinkState, LinkState], None]:
        """The state listener of one PLC link: only entering and leaving UP are events
        (reconnect attempts flap CONNECTING <-> DOWN every second while a PLC is away)."""

        def on_change(old: LinkState, new: LinkState) -> None:
            if LinkState.UP in (old, new):
                self.on_link_state(old, new, link=f"plc:{plc_id}")

        return on_change

    def on_oversize(self, topic: str, size: int) -> None:
        """The link dropped a message above the payload limit (acked; counted here)."""
        self.oversize += 1
        self._ingest.rejected["oversize"] += 1
        log.warning("dropped an oversize message on %s (%d bytes)", topic, size)

    # -- the report -----------------------------------------------------------------------------
    def plc_views(self) -> list[PlcView]:
        """Every PLC's link figures, in site order (no I/O)."""
        return [plc.view() for plc in self._plcs.values()]

    def report(self) -> HealthReport:
        """Health now: one consistent set of figures for every renderer."""
        now = self._clock()
        link, ing = self._link, self._ingest
        stats = link.stats
        ready = self.ready
        hist = self._history.snapshot() if self._history is not None else None
        history = HistoryHealth.from_snapshot(hist) if hist is not None else None
        plcs = {view.id: view for view in self.plc_views()}
        warnings = tuple(link.warnings)
        command = self._command_health()
        started = self.started.is_set()
        reasons = (
            degraded_reasons(
                ready=ready,
                backpressure=self.backpressure,
                last_commit_error=ing.last_commit_error,
                history_state=history.state if history is not None else None,
                plc_links={pid: p.link for pid, p in plcs.items()},
                mqtt_warnings=warnings,
                command_link=command.state if command is not None else None,
            )
            if started
            else ()
        )
        status: HealthStatus = "starting" if not started else ("degraded" if reasons else "ok")
        by_state, episodes = self._alerts.figures()
        shelves: Mapping[str, int] | None = self._shelf_counts
        if shelves is None:
            shelves = ing.shelf_status_counts()
        return HealthReport(
            status=status,
            ready=ready,
            degraded_by=reasons,
            site=self.settings.site_id,
            uptime_s=now - self.started_at_s if self.started_at_s else 0.0,
            mqtt=MqttHealth(
                state=link_state_name(link.state),
                since_s=self._monotonic() - link.since,
                session_present=link.session_present,
                connects=stats.connects,
                max_qos=link.server_max_qos,
                retain_available=link.retain_available,
                granted_qos=dict(link.granted_qos),
                warnings=warnings,
                oversize_in=stats.oversize_in,
                invalid_in=stats.invalid_in,
                qos_downgraded=stats.qos_downgraded,
                retain_dropped=stats.retain_dropped,
                last_error=link.last_error,
            ),
            ingest=IngestHealth(
                messages=ing.messages,
                readings=ing.readings,
                commits=ing.commits,
                commit_failures=ing.commit_failures,
                rejected=dict(ing.rejected),
                ignored_retained=ing.ignored_retained,
                late_readings=ing.late_readings,
                outbox_rows=self._journal.outbox_rows,
                max_outbox_rows=self.settings.max_outbox_rows,
                backpressure=self.backpressure,
                last_commit_error=ing.last_commit_error,
                oversize=self.oversize,
            ),
            alerts=AlertFigures(
                by_state={st: by_state.get(st, 0) for st in ALERT_STATES},
                active=len(episodes),
                acknowledged=sum(1 for e in episodes if e.acked_by is not None),
                snoozed=sum(1 for e in episodes if e.snoozed(now)),
            ),
            shelves={st.value: shelves.get(st.value, 0) for st in ShelfStatus},
            history=history,
            plcs=plcs,
            bus_events=self._bus.published,
            command_link=command,
            main_loop_pauses=0 if self._main_loop is None else self._main_loop.pauses,
            main_loop_paused_s=0.0 if self._main_loop is None else self._main_loop.paused_s,
            control_realtime_priority=(
                0 if self._control_loop is None else self._control_loop.realtime_granted
            ),
        )

    def _command_health(self) -> CommandLinkHealth | None:
        link = self._command_link
        if link is None:
            return None
        return CommandLinkHealth(
            state=link_state_name(link.state),
            since_s=self._monotonic() - link.since,
            session_present=link.session_present,
            connects=link.stats.connects,
            last_error=link.last_error,
        )
