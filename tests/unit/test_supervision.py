"""SupervisionService and its HealthReport, against fakes of our own interfaces (the Protocols
of controller/services/supervision.py): the status rule, the backpressure gate and its system
alert, outbox housekeeping, link events, oversize counting."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from controller.domain.events import BusEvent
from controller.domain.model import ShelfStatus, StockState
from controller.domain.reorder import AlertState, Episode
from controller.ports import EventRow, LinkStateChanged, ReadingRow
from controller.services.supervision import (
    ALERT_REPUBLISH_QUEUE,
    HealthReport,
    PlcView,
    ReadGate,
    SupervisionService,
    SupervisionSettings,
)
from devices.errors import DeviceError
from devices.link.state import LinkState

NOW_S = 1_700_000_000.0
BOUND = 100


@dataclass
class FakeCounters:
    connects: int = 1
    oversize_in: int = 0
    invalid_in: int = 0
    qos_downgraded: int = 0
    retain_dropped: int = 0


@dataclass
class FakeLink:
    state: LinkState = LinkState.UP
    since: float = 10.0
    session_present: bool = True
    server_max_qos: int = 2
    retain_available: bool = True
    granted_qos: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    last_error: str = ""
    stats: FakeCounters = field(default_factory=FakeCounters)
    queued_publishes: int = 0
    paused: bool = False
    published: list[tuple[str, dict[str, Any], int, bool]] = field(default_factory=list)
    refuse_publishes: int = 0

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        if self.refuse_publishes:
            self.refuse_publishes -= 1
            raise DeviceError("publish queue full")
        self.published.append((topic, orjson.loads(payload), qos, retain))


@dataclass
class FakeJournal:
    outbox_rows: int = 0
    trims: list[tuple[int, int]] = field(default_factory=list)
    dead_letter_trims: list[int] = field(default_factory=list)
    events: list[EventRow] = field(default_factory=list)
    fail_commits: bool = False

    def trim_outbox(self, keep_readings: int, keep_events: int) -> int:
        self.trims.append((keep_readings, keep_events))
        n = max(0, self.outbox_rows - keep_readings)
        self.outbox_rows -= n
        return n

    def trim_dead_letters(self, keep: int) -> int:
        self.dead_letter_trims.append(keep)
        return 0

    def commit(self, readings: Sequence[ReadingRow], *, events: Sequence[EventRow]) -> None:
        if self.fail_commits:
            raise OSError("disk I/O error")
        self.events.extend(events)


@dataclass
class FakeShelf:
    status: ShelfStatus


@dataclass
class FakeIngest:
    messages: int = 0
    readings: int = 0
    commits: int = 0
    commit_failures: int = 0
    ignored_retained: int = 0
    late_readings: int = 0
    last_commit_error: str | None = None
    rejected: Counter[str] = field(default_factory=Counter)
    states: dict[str, FakeShelf] = field(default_factory=dict)
    ticks: list[float] = field(default_factory=list)

    def tick(self, now: float) -> list[dict[str, Any]]:
        self.ticks.append(now)
        return []

    def shelf_status_counts(self) -> dict[str, int]:
        counts = dict.fromkeys((s.value for s in ShelfStatus), 0)
        for shelf in self.states.values():
            counts[shelf.status.value] += 1
        return counts


@dataclass
class FakeAlerts:
    alerts: dict[str, AlertState] = field(default_factory=dict)
    unpublished: set[str] = field(default_factory=set)
    ticks: list[float] = field(default_factory=list)
    budgets: list[int] = field(default_factory=list)

    def tick(self, now_s: float) -> None:
        self.ticks.append(now_s)

    def retry_unpublished(self, budget: int) -> int:
        self.budgets.append(budget)
        return 0

    def figures(self) -> tuple[Counter[str], list[Episode]]:
        by_state = Counter(a.state.value for a in self.alerts.values())
        return by_state, [a.episode for a in self.alerts.values() if a.episode is not None]


@dataclass
class FakeHistory:
    state: str = "up"

    def snapshot(self) -> dict[str, Any]:
        return {
            "backend": "sqlite",
            "state": self.state,
            "since_s": 1.0,
            "last_error": None if self.state != "down" else "refused",
            "points_written": 5,
            "batches": 1,
            "retries": 0,
            "rejected_requests": 0,
            "dead_lettered": 0,
            "corrupt_rows": 0,
            "nudged": 0,
            "lag_s": 0.0,
        }


@dataclass
class FakePlc:
    id: str
    link: str = "up"

    def view(self) -> PlcView:
        return PlcView(
            id=self.id,
            kind="conveyor",
            endpoint="127.0.0.1:1502",
            unit=1,
            link="up" if self.link == "up" else "down",
            since_s=1.0,
            health="ok",
            fault=None,
            last_down_reason=None,
            epoch=7,
            restarts=0,
            connects=1,
            heartbeat=True,
        )


@dataclass
class FakeBus:
    published: int = 0
    groups: list[list[BusEvent]] = field(default_factory=list)

    def publish(self, events: list[BusEvent]) -> None:
        self.published += len(events)
        self.groups.append(events)


@dataclass
class Rig:
    link: FakeLink = field(default_factory=FakeLink)
    journal: FakeJournal = field(default_factory=FakeJournal)
    ingest: FakeIngest = field(default_factory=FakeIngest)
    alerts: FakeAlerts = field(default_factory=FakeAlerts)
    history: FakeHistory | None = field(default_factory=FakeHistory)
    plcs: dict[str, FakePlc] = field(default_factory=lambda: {"c1": FakePlc("c1")})
    bus: FakeBus = field(default_factory=FakeBus)
    keep_outbox_rows: int | None = None
    main_loop: Any = None
    control_loop: Any = None

    def service(self) -> SupervisionService:
        return SupervisionService(
            SupervisionSettings(
                site_id="t",
                topic_prefix="fh",
                max_outbox_rows=BOUND,
                dead_letter_keep=50,
                keep_outbox_rows=self.keep_outbox_rows,
            ),
            link=self.link,
            gate=ReadGate(self.link),
            journal=self.journal,
            ingest=self.ingest,
            alerts=self.alerts,
            history=self.history,
            plcs=self.plcs,
            bus=self.bus,
            publish_events=self.bus.publish,
            clock=lambda: NOW_S,
            monotonic=lambda: 25.0,
            main_loop=self.main_loop,
            control_loop=self.control_loop,
        )


def started(rig: Rig) -> SupervisionService:
    svc = rig.service()
    svc.mark_started()
    return svc


# -- the status rule ----------------------------------------------------------------------------


def test_starting_until_marked_started_whatever_else_is_wrong() -> None:
    rig = Rig(link=FakeLink(state=LinkState.DOWN))
    rig.ingest.last_commit_error = "disk full"
    report = rig.service().report()
    assert (report.status, report.ready, report.degraded_by) == ("starting", False, ())
    assert report.uptime_s == 0.0


def test_ok_when_started_with_the_broker_up_and_nothing_wrong() -> None:
    report = started(Rig()).report()
    assert (report.status, report.ready, report.degraded_by) == ("ok", True, ())


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (lambda r: setattr(r.link, "state", LinkState.DOWN), "not ready"),
        (lambda r: setattr(r.ingest, "last_commit_error", "disk full"), "journal"),
        (lambda r: setattr(r.history, "state", "down"), "history"),
        (lambda r: setattr(r.plcs["c1"], "link", "down"), "plc:c1"),
        (lambda r: r.link.warnings.append("broker Maximum QoS is 0"), "mqtt warnings"),
        (lambda r: setattr(r.journal, "outbox_rows", BOUND), "backpressure"),
    ],
)
def test_each_cause_alone_makes_the_status_degraded(spoil: Any, reason: str) -> None:
    rig = Rig()
    svc = started(rig)
    spoil(rig)
    svc.check_outbox_bound()
    report = svc.report()
    assert report.status == "degraded"
    assert report.degraded_by == (reason,)
    assert report.ready is (reason != "not ready")


def test_a_history_starting_or_absent_is_not_degraded() -> None:
    rig = Rig(history=FakeHistory(state="starting"))
    assert started(rig).report().status == "ok"
    rig = Rig(history=None)
    report = started(rig).report()
    assert (report.status, report.history) == ("ok", None)


def test_the_report_carries_every_figure_its_renderers_need() -> None:
    rig = Rig()
    rig.ingest.states = {
        "a": FakeShelf(ShelfStatus.STALE),
        "b": FakeShelf(ShelfStatus.OK),
        "c": FakeShelf(ShelfStatus.STALE),
    }
    ep = Episode("ep-1", StockState.LOW, NOW_S - 5, 3, 4, acked_by="sup")
    snoozed = Episode("ep-2", StockState.OUT, NOW_S - 5, 0, 4, snoozed_until_s=NOW_S + 60)
    rig.alerts.alerts = {
        "K1": AlertState("K1", StockState.LOW, 3, ep),
        "K2": AlertState("K2", StockState.OUT, 0, snoozed),
        "K3": AlertState("K3"),
    }
    rig.ingest.rejected["bad_json"] = 2
    rig.bus.published = 9
    svc = started(rig)
    svc.on_oversize("fh/t/scales/x", 99_999)
    report = svc.report()
    assert isinstance(report, HealthReport)
    assert report.stale_shelves == 2
    assert report.shelves == {"unknown": 0, "ok": 1, "settling": 0, "ambiguous": 0, "stale": 2}
    assert (report.alerts.active, report.alerts.acknowledged, report.alerts.snoozed) == (2, 1, 1)
    assert report.alerts.by_state == {"ok": 0, "low": 1, "critical": 0, "out": 1, "unknown": 1}
    assert report.ingest.rejected == {"bad_json": 2, "oversize": 1}
    assert report.ingest.oversize == 1
    assert report.mqtt.since_s == 15.0
    assert report.links == {"mqtt": "up", "plc:c1": "up"}
    assert report.bus_events == 9
    with pytest.raises(AttributeError):
        report.status = "ok"  # type: ignore[misc]


# -- backpressure and the system alert ------------------------------------------------------------


def test_a_full_outbox_holds_reading_and_raises_the_retained_system_alert() -> None:
    rig = Rig()
    svc = started(rig)
    rig.journal.outbox_rows = BOUND - 1
    svc.check_outbox_bound()
    assert not svc.backpressure
    rig.journal.outbox_rows = BOUND
    svc.check_outbox_bound()  # on the ingest path: the commit that reached the bound
    assert svc.backpressure
    assert rig.link.paused
    assert svc.gate.holds == {"outbox"}
    topic, body, qos, retain = rig.link.published[-1]
    assert (topic, qos, retain) == ("fh/t/alerts/system/outbox_full", 1, True)
    assert body["key"] == "system:outbox_full"
    assert body["active"] is True
    assert (body["outbox_rows"], body["max_outbox_rows"]) == (BOUND, BOUND)
    assert body["history"]["state"] == "up"
    assert body["plcs"] == {"c1": "up"}
    assert svc.report().ingest.backpressure
    svc.tick()  # still full: nothing new
    assert len(rig.link.published) == 1
    rig.journal.outbox_rows = BOUND - 1
    svc.tick()
    assert not svc.backpressure
    assert not rig.link.paused
    assert not svc.gate.holds
    assert rig.link.published[-1][1]["active"] is False
    assert not svc.report().ingest.backpressure


def test_releasing_backpressure_keeps_another_holders_pause() -> None:
    rig = Rig()
    svc = started(rig)
    svc.gate.hold("journal")
    rig.journal.outbox_rows = BOUND
    svc.tick()
    rig.journal.outbox_rows = 0
    svc.tick()
    assert not svc.backpressure
    assert rig.link.paused
    assert svc.gate.holds == {"journal"}


def test_a_system_alert_the_link_could_not_queue_is_sent_at_a_later_tick() -> None:
    """The publish queue is full while the broker is away: the alert was logged and lost, so
    supervisors never learned why reading stopped. It is sent again on the next tick."""
    rig = Rig()
    svc = started(rig)
    rig.link.refuse_publishes = 2
    rig.journal.outbox_rows = BOUND
    svc.tick()
    assert svc.backpressure
    assert rig.link.published == []
    svc.tick()  # refused again
    assert rig.link.published == []
    svc.tick()
    assert [(t, b["active"]) for t, b, _, _ in rig.link.published] == [
        ("fh/t/alerts/system/outbox_full", True)
    ]
    svc.tick()
    assert len(rig.link.published) == 1  # sent once


def test_a_cleared_alert_is_not_overtaken_by_its_unsent_raise() -> None:
    rig = Rig()
    svc = started(rig)
    rig.link.refuse_publishes = 1
    rig.journal.outbox_rows = BOUND
    svc.tick()  # raise refused
    rig.journal.outbox_rows = 0
    svc.tick()  # cleared: the clear is sent, the stale raise is not
    assert [b["active"] for _, b, _, _ in rig.link.published] == [False]
    svc.tick()
    assert [b["active"] for _, b, _, _ in rig.link.published] == [False]


# -- the tick ---------------------------------------------------------------------------------


def test_the_tick_drives_staleness_alert_dwell_and_the_deferred_alert_states() -> None:
    rig = Rig()
    svc = started(rig)
    rig.alerts.unpublished = {"K1"}
    rig.link.queued_publishes = 500
    svc.tick()
    assert rig.ingest.ticks == [NOW_S]
    assert rig.alerts.ticks == [NOW_S]
    assert rig.alerts.budgets == [ALERT_REPUBLISH_QUEUE - 500]
    rig.link.state = LinkState.DOWN
    svc.tick()
    assert rig.alerts.budgets == [ALERT_REPUBLISH_QUEUE - 500]  # not while the broker is away
    assert rig.journal.dead_letter_trims == [50, 50]


def test_with_no_historian_the_outbox_keeps_a_bounded_window() -> None:
    rig = Rig(history=None, keep_outbox_rows=40)
    svc = started(rig)
    rig.journal.outbox_rows = 40
    svc.tick()
    assert rig.journal.trims == []
    rig.journal.outbox_rows = 70
    svc.tick()
    assert rig.journal.trims == [(40, 4)]
    assert not svc.backpressure


# -- link events --------------------------------------------------------------------------------


def test_a_link_state_change_is_journaled_then_published() -> None:
    rig = Rig()
    svc = rig.service()
    svc.on_link_state(LinkState.CONNECTING, LinkState.UP)
    body = {"kind": "link_state", "ts": NOW_S, "link": "mqtt", "old": "connecting", "new": "up"}
    assert rig.journal.events == [EventRow(NOW_S, "link_state", body)]
    assert rig.bus.groups == [[LinkStateChanged(NOW_S, "mqtt", LinkState.CONNECTING, LinkState.UP)]]


def test_a_link_event_the_journal_refuses_is_still_published() -> None:
    rig = Rig()
    rig.journal.fail_commits = True
    svc = rig.service()
    svc.on_link_state(LinkState.UP, LinkState.DOWN)
    assert rig.journal.events == []
    assert [ev.new for g in rig.bus.groups for ev in g if isinstance(ev, LinkStateChanged)] == [
        LinkState.DOWN
    ]


def test_only_entering_and_leaving_up_are_plc_events() -> None:
    rig = Rig()
    on_change = rig.service().plc_state_listener("c1")
    on_change(LinkState.CONNECTING, LinkState.DOWN)
    on_change(LinkState.DOWN, LinkState.CONNECTING)
    assert rig.bus.groups == []
    on_change(LinkState.CONNECTING, LinkState.UP)
    on_change(LinkState.UP, LinkState.DOWN)
    assert [
        (ev.link, ev.new) for g in rig.bus.groups for ev in g if isinstance(ev, LinkStateChanged)
    ] == [
        ("plc:c1", LinkState.UP),
        ("plc:c1", LinkState.DOWN),
    ]
    assert len(rig.journal.events) == 2


# -- hooks after each tick (floorhand run: systemd readiness and watchdog) ----------------------


async def test_hooks_run_after_every_tick_and_a_failing_one_stops_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    svc = started(Rig())
    svc.settings = dataclasses.replace(svc.settings, tick_s=0.001)
    fed: list[int] = []
    three = asyncio.Event()

    def broken() -> None:
        raise RuntimeError("boom")

    def feed() -> None:
        fed.append(1)
        if len(fed) >= 3:
            three.set()

    svc.after_tick += [broken, feed]
    task = asyncio.create_task(svc.run(), name="supervision")
    try:
        await asyncio.wait_for(three.wait(), 5.0)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert len(fed) >= 3
    assert "a supervision hook failed" in caplog.text


def test_the_report_carries_the_main_loops_pauses_for_the_control_loop() -> None:
    """The main loop's pauses (`controller.control.Precedence`) reach /metrics through the
    report like every other figure; a service given none reports zeros."""

    @dataclass
    class Pauses:
        pauses: int = 7
        paused_s: float = 0.012

    report = Rig().service().report()
    assert (report.main_loop_pauses, report.main_loop_paused_s) == (0, 0.0)
    report = Rig(main_loop=Pauses()).service().report()
    assert (report.main_loop_pauses, report.main_loop_paused_s) == (7, 0.012)


def test_the_report_carries_the_control_loops_realtime_priority() -> None:
    """The control thread's SCHED_FIFO priority (`controller.control.ControlLoop`) reaches
    /metrics through the report; none given or not granted: 0."""

    @dataclass
    class Scheduling:
        realtime_granted: int = 10

    assert Rig().service().report().control_realtime_priority == 0
    assert Rig(control_loop=Scheduling(0)).service().report().control_realtime_priority == 0
    assert Rig(control_loop=Scheduling()).service().report().control_realtime_priority == 10
