"""The supervision tick costs O(what is due), not O(site): staleness examines only shelves whose
time ran out, alerts evaluate only keys that changed or wait on a dwell (issue: a 100k-shelf
site re-evaluated everything every 0.5 s). Behaviour is the brute-force rule's, checked on
random schedules."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import orjson
import pytest

from controller.adapters.journal import Journal
from controller.bus import Bus
from controller.config import load_site
from controller.domain.events import BusEvent, ShelfStatusChanged
from controller.domain.model import ShelfStatus
from controller.services.alerts import AlertService, AlertSettings
from controller.services.ingest import IngestService, IngestSettings, shelf_specs
from devices.link.mqtt import MqttMessage
from tests.sites import TARE_G, UNIT_G, topic, write_small_site
from tests.unit.test_alerts_service import RecordingLink
from tests.unit.test_supervision import Rig

T0 = 1_764_067_200.0


class Site:
    def __init__(self, tmp: Path, n: int, *, reporting_s: float = 1.0) -> None:
        self.site = load_site(
            write_small_site(
                tmp, mqtt_port=1, scales=n, reporting_interval_s=reporting_s, dwell_s=2.0
            )
        )
        self.journal = Journal(tmp / "journal.sqlite")
        self.journal.open()
        self.bus = Bus()
        self.now = T0
        specs = shelf_specs(self.site)
        link = RecordingLink()
        self.ingest = IngestService(
            IngestSettings.from_site(self.site),
            self.journal,
            link,
            self.bus.publish,
            clock=lambda: self.now,
            shelf_specs=specs,
        )
        self.alerts = AlertService(
            AlertSettings.from_site(self.site),
            self.journal,
            link,
            self.bus.publish,
            self.ingest.states,
            specs,
        )
        self.events: list[BusEvent] = []
        self.bus.add_listener(self.events.extend)
        self.bus.add_listener(self._after_commit)
        self.seq: dict[int, int] = {}
        self.stale_after_s = specs["sh0"].stale_after_s

    def _after_commit(self, events: list[BusEvent]) -> None:
        self.alerts.on_events(events)
        self.alerts.evaluate_dirty(self.now)

    def readings(self, shelves: list[int], units: int = 30) -> None:
        msgs = []
        for i in shelves:
            seq = self.seq.get(i, -1) + 1
            self.seq[i] = seq
            body = {"device": f"s{i}", "seq": seq, "ts": self.now, "grams": TARE_G + units * UNIT_G}
            msgs.append(MqttMessage(topic(f"s{i}"), orjson.dumps(body), 1, False, seq + 1, False))
        self.ingest.on_messages(msgs)

    def tick(self, now: float) -> None:
        self.now = now
        self.ingest.tick(now)
        self.alerts.tick(now)

    def stale(self) -> set[str]:
        return {sid for sid, st in self.ingest.states.items() if st.status is ShelfStatus.STALE}


@pytest.fixture
def site(tmp_path: Path) -> Site:
    s = Site(tmp_path, 300)
    yield s
    s.journal.close()


def test_a_tick_examines_only_the_shelves_whose_time_ran_out(site: Site) -> None:
    n = len(site.ingest.states)
    site.readings(list(range(n)))
    site.tick(T0 + 0.5)
    site.tick(T0 + 1.0)
    assert site.ingest.stale_checks == 0
    assert site.stale() == set()
    # Half the shelves keep reporting; the other half go silent.
    site.now = T0 + site.stale_after_s / 2
    site.readings(list(range(0, n, 2)))
    site.tick(T0 + site.stale_after_s + 0.1)
    silent = {f"sh{i}" for i in range(1, n, 2)}
    assert site.stale() == silent
    # Only the shelves whose time ran out were examined one by one (the others are one
    # vectorised comparison over the table's columns).
    assert site.ingest.stale_checks == len(silent)
    stale_events = [
        e for e in site.events if isinstance(e, ShelfStatusChanged) and e.new == "stale"
    ]
    assert {e.shelf_id for e in stale_events} == silent
    before = site.ingest.stale_checks
    site.tick(T0 + site.stale_after_s + 0.6)
    assert site.ingest.stale_checks == before  # nothing due: nothing examined
    # A STALE shelf that reports again is watched again, and goes STALE again when silent.
    site.now = T0 + site.stale_after_s + 1.0
    site.readings([1])
    assert "sh1" not in site.stale()
    site.tick(site.now + site.stale_after_s + 0.1)
    assert "sh1" in site.stale()


def test_alert_ticks_evaluate_only_keys_that_changed_or_wait_on_a_dwell(tmp_path: Path) -> None:
    site = Site(tmp_path, 300, reporting_s=10.0)  # no shelf goes STALE in this test
    n = len(site.alerts.targets)
    site.readings(list(range(n)))  # well stocked: no dwell anywhere
    site.tick(T0 + 0.5)  # the first tick evaluates every key
    first = site.alerts.evaluated
    assert first >= n
    site.tick(T0 + 1.0)
    assert site.alerts.evaluated == first  # nothing changed, nothing waits: no evaluation
    for k in range(8):  # below the reorder point, settled: a raise waits on its dwell
        site.now = T0 + 1.1 + 0.05 * k
        site.readings([7], units=2)
    key = next(k for k, t in site.alerts.targets.items() if t.sku == "K7")
    assert site.alerts.alerts[key].pending is not None
    after_readings = site.alerts.evaluated
    site.tick(T0 + 1.6)
    assert site.alerts.evaluated == after_readings + 1  # only the key waiting on its dwell
    site.tick(T0 + 4.0)  # the dwell (2 s) completes at a tick
    assert [k for k, st in site.alerts.alerts.items() if st.episode is not None] == [key]
    done = site.alerts.evaluated
    site.tick(T0 + 4.5)
    assert site.alerts.evaluated == done
    site.journal.close()


@pytest.mark.parametrize("seed", range(5))
def test_random_schedules_match_the_brute_force_rule(tmp_path: Path, seed: int) -> None:
    """After every tick, a shelf is STALE exactly when its newest reading is older than
    ``stale_after_s`` (the rule check_stale applies to every shelf)."""
    rng = random.Random(seed)
    s = Site(tmp_path, 40)
    try:
        now = T0
        last: dict[str, float] = {}
        for _ in range(200):
            now += rng.choice((0.1, 0.5, 1.0, 3.0, s.stale_after_s))
            s.now = now
            if rng.random() < 0.6:
                chosen = rng.sample(range(40), rng.randint(1, 10))
                s.readings(chosen)
                last.update({f"sh{i}": now for i in chosen})
            if rng.random() < 0.7:
                s.tick(now)
                expected = {sid for sid, ts in last.items() if now - ts > s.stale_after_s}
                assert s.stale() == expected, f"seed {seed} at +{now - T0:.1f} s"
    finally:
        s.journal.close()


def test_the_health_report_keeps_shelf_and_alert_counts_without_a_pass_over_the_site(
    tmp_path: Path,
) -> None:
    """/health, /metrics and the live stats render one report; at 100k shelves a pass over
    every shelf and alert per report held the loop ~250 ms. The counts follow the bus."""
    s = Site(tmp_path, 200)
    try:
        counted = 0
        count_all = s.ingest.shelf_status_counts

        def counting() -> dict[str, int]:
            nonlocal counted
            counted += 1
            return count_all()

        s.ingest.shelf_status_counts = counting  # type: ignore[method-assign]
        rig = Rig(ingest=s.ingest, alerts=s.alerts)  # type: ignore[arg-type]
        svc = rig.service()
        s.bus.add_listener(svc.on_events)
        svc.track_shelf_statuses()
        svc.mark_started()

        def full_count() -> dict[str, int]:
            c = Counter(s.ingest.states[sid].status.value for sid in s.ingest.states)
            return {st.value: c.get(st.value, 0) for st in ShelfStatus}

        s.readings(list(range(200)))
        for k in range(8):  # shelf 7 settles low: its alert raises after the dwell
            s.now = T0 + 0.1 * k
            s.readings([7], units=2)
        s.tick(T0 + 1.0)
        s.tick(T0 + 3.5)
        counted = 0
        report = svc.report()
        assert counted == 0  # the counts came from the bus, not a count over the shelves
        assert dict(report.shelves) == full_count()
        assert report.alerts.active == 1
        assert report.alerts.by_state["critical"] == 1
        assert sum(report.alerts.by_state.values()) == len(s.alerts.targets)
        s.tick(T0 + s.stale_after_s + 5.0)  # every shelf goes STALE: the counts follow
        report = svc.report()
        assert report.shelves["stale"] == 200
        assert dict(report.shelves) == full_count()
        assert counted == 0
    finally:
        s.journal.close()
