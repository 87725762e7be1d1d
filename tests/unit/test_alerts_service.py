"""Ingest + alert service together on an injected clock: weight oscillating ±1 % around the
reorder point for a long window raises exactly one alert; missing data changes nothing."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from controller.adapters.journal import Journal
from controller.bus import Bus
from controller.config import load_site
from controller.domain.events import BusEvent, StockChanged
from controller.domain.reorder import AlertState
from controller.domain.stock import ShelfState, ShelfStates, apply_weight
from controller.services.alerts import AlertService, AlertSettings, AlertStates
from controller.services.ingest import IngestService, IngestSettings, shelf_specs
from devices.errors import DeviceUnavailable
from devices.link.mqtt import MqttMessage
from tests.sites import TARE_G, UNIT_G, topic, write_small_site

T0 = 1_764_067_200.0


class RecordingLink:
    epoch = 1

    def __init__(self) -> None:
        self.published: list[tuple[str, dict[str, Any]]] = []

    def ack(self, packet_ids: Sequence[int], epoch: int | None = None) -> None:
        pass

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        assert retain
        self.published.append((topic, orjson.loads(payload)))

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class World:
    def __init__(self, tmp: Path, *, reorder_point: int = 20, dwell_s: float = 2.0) -> None:
        self.site = load_site(
            write_small_site(
                tmp, mqtt_port=1, scales=1, reorder_point=reorder_point, dwell_s=dwell_s
            )
        )
        self.journal = Journal(tmp / "journal.sqlite")
        self.journal.open()
        self.link = RecordingLink()
        self.bus = Bus()
        self.now = T0
        specs = shelf_specs(self.site)
        self.ingest = IngestService(
            IngestSettings.from_site(self.site),
            self.journal,
            self.link,
            self.bus.publish,
            clock=lambda: self.now,
            shelf_specs=specs,
        )
        self.alerts = AlertService(
            AlertSettings.from_site(self.site),
            self.journal,
            self.link,
            self.bus.publish,
            self.ingest.states,
            specs,
        )
        self.events: list[dict[str, Any]] = []
        """What the bus carried, as wire dicts (the journal's and the live frames' bodies)."""
        self.bus.add_listener(lambda evs: self.events.extend(e.as_dict() for e in evs))
        self.bus.add_listener(self._after_commit)
        self.seq = 0

    def _after_commit(self, events: list[BusEvent]) -> None:
        self.alerts.on_events(events)
        self.alerts.evaluate_dirty(self.now)

    def reading(self, weight_g: float) -> None:
        payload = orjson.dumps({"device": "s0", "seq": self.seq, "ts": self.now, "grams": weight_g})
        self.seq += 1
        self.ingest.on_messages([MqttMessage(topic("s0"), payload, 1, False, self.seq, False)])

    def advance(self, dt_s: float) -> None:
        self.now += dt_s
        self.ingest.tick(self.now)
        self.alerts.tick(self.now)

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["kind"] == kind]


def test_one_percent_oscillation_around_the_reorder_point_raises_exactly_once(
    tmp_path: Path,
) -> None:
    w = World(tmp_path, reorder_point=20)
    rng = random.Random(5)
    # Start well stocked, then hover around the reorder point: ±1 % of the shelf weight, i.e.
    # the count flips between 19, 20 and 21 units for ten simulated minutes.
    for _ in range(10):
        w.reading(TARE_G + 35 * UNIT_G)
        w.advance(0.5)
    centre = TARE_G + 20 * UNIT_G
    for _ in range(1200):
        w.reading(centre * (1 + rng.uniform(-0.01, 0.01)))
        w.advance(0.5)
    raised = w.kinds("alert_raised")
    assert len(raised) == 1, raised
    assert not w.kinds("alert_resolved")
    # The retained alert topic carried one episode id only.
    episodes = {b["episode"] for t, b in w.link.published if b["active"]}
    assert len(episodes) == 1
    # Back above the reorder point plus hysteresis for the dwell: resolved, once.
    for _ in range(20):
        w.reading(TARE_G + 35 * UNIT_G)
        w.advance(0.5)
    assert len(w.kinds("alert_resolved")) == 1


def test_count_flipping_across_the_reorder_point_raises_exactly_once(tmp_path: Path) -> None:
    w = World(tmp_path, reorder_point=20)  # hysteresis: 2 units
    rng = random.Random(9)
    for _ in range(10):
        w.reading(TARE_G + 35 * UNIT_G)
        w.advance(0.5)
    for _ in range(200):  # ten simulated minutes of settled levels 19, 20, 21, 22
        units = rng.choice([19, 20, 21, 22])
        for _ in range(6):
            w.reading(TARE_G + units * UNIT_G + rng.uniform(-2.0, 2.0))
            w.advance(0.5)
    assert {e["new_units"] for e in w.kinds("stock_changed")} >= {19, 20, 21, 22}
    assert len(w.kinds("alert_raised")) == 1
    assert not w.kinds("alert_resolved")


def test_missing_data_neither_raises_nor_resolves(tmp_path: Path) -> None:
    w = World(tmp_path, reorder_point=20)
    for _ in range(10):
        w.reading(TARE_G + 5 * UNIT_G)
        w.advance(0.5)
    assert len(w.kinds("alert_raised")) == 1
    # The scale goes silent for ten minutes: the shelf turns STALE, the level UNKNOWN.
    for _ in range(1200):
        w.advance(0.5)
    assert w.ingest.states["sh0"].status.value == "stale"
    kinds = [r[0] for r in w.journal.db.execute("SELECT kind FROM events")]
    assert "shelf_status_changed" in kinds, "the STALE transition is journaled for history"
    assert w.alerts.alerts["K0"].state.value == "unknown"
    assert w.alerts.alerts["K0"].episode is not None, "missing data must not resolve"
    assert not w.kinds("alert_resolved")
    assert len(w.kinds("alert_raised")) == 1


@pytest.mark.parametrize("level", [0, 2, 5])
def test_severity_follows_the_level(tmp_path: Path, level: int) -> None:
    w = World(tmp_path, reorder_point=20)
    for _ in range(12):
        w.reading(TARE_G + level * UNIT_G)
        w.advance(0.5)
    raised = w.kinds("alert_raised")
    assert len(raised) == 1
    expected = "out" if level == 0 else ("critical" if level <= 3 else "low")
    state = w.alerts.public("K0")
    assert state["severity"] == expected
    assert state["suggested_order_qty"] == 40 - level


class FullQueueLink(RecordingLink):
    """A link whose outgoing queue holds ``room`` publishes until `drain` (DeviceUnavailable
    beyond, as MqttLink does while the broker is away)."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        if self.room <= 0:
            raise DeviceUnavailable("queue full")
        self.room -= 1
        super().publish(topic, payload, qos, retain)


def test_retained_states_beyond_the_link_queue_are_deferred_not_fatal(tmp_path: Path) -> None:
    """A site with more alert targets than the link queues while down must still start: the
    states that do not fit are kept and published as the queue drains."""
    site = load_site(write_small_site(tmp_path, mqtt_port=1, scales=25))
    journal = Journal(tmp_path / "journal.sqlite")
    journal.open()
    try:
        link = FullQueueLink(room=10)
        specs = shelf_specs(site)
        states = {sid: ShelfState(spec) for sid, spec in specs.items()}
        alerts = AlertService(
            AlertSettings.from_site(site), journal, link, Bus().publish, states, specs
        )
        alerts.republish_all()  # must not raise
        assert len(link.published) == 10
        assert len(alerts.unpublished) == 15
        link.room = 8
        assert alerts.retry_unpublished(100) == 8
        assert len(alerts.unpublished) == 7
        link.room = 100
        assert alerts.retry_unpublished(5) == 5
        assert alerts.retry_unpublished(100) == 2
        assert not alerts.unpublished
        assert sorted(t for t, _ in link.published) == sorted(
            f"fh/t/alerts/K{i}" for i in range(25)
        )
    finally:
        journal.close()


def test_alerts_watch_the_targets_their_settings_name(tmp_path: Path) -> None:
    """AlertService is built from AlertSettings, not the site file: one target per SKU from
    ``from_site``, and a service given a subset watches only that subset."""
    site = load_site(write_small_site(tmp_path, mqtt_port=1, scales=3))
    settings = AlertSettings.from_site(site)
    assert [t.key for t in settings.targets] == [sku.id for sku in site.skus]
    assert settings.topic_base == f"{site.mqtt.topic_prefix}/{site.site.id}/alerts"
    journal = Journal(tmp_path / "journal.sqlite")
    journal.open()
    try:
        specs = shelf_specs(site)
        states = {sid: ShelfState(spec) for sid, spec in specs.items()}
        link = RecordingLink()
        first = replace(settings, targets=settings.targets[:1])
        alerts = AlertService(first, journal, link, Bus().publish, states, specs)
        alerts.republish_all()
        assert list(alerts.targets) == [settings.targets[0].key]
        assert [topic for topic, _ in link.published] == [
            f"{settings.topic_base}/{settings.targets[0].key}"
        ]
    finally:
        journal.close()


def test_a_start_publishes_a_slice_of_the_retained_states_and_defers_the_rest(
    tmp_path: Path,
) -> None:
    """At 100k SKUs publishing every retained state in `republish_all` held the start ~1 s:
    the first ``at_once`` go now, the rest when the supervision tick has room for them; each
    key is published once."""
    site = load_site(write_small_site(tmp_path, mqtt_port=1, scales=25))
    journal = Journal(tmp_path / "journal.sqlite")
    journal.open()
    try:
        link = RecordingLink()
        specs = shelf_specs(site)
        states = {sid: ShelfState(spec) for sid, spec in specs.items()}
        alerts = AlertService(
            AlertSettings.from_site(site), journal, link, Bus().publish, states, specs
        )
        alerts.republish_all(at_once=10)
        assert len(link.published) == 10
        assert len(alerts.unpublished) == 15
        assert alerts.retry_unpublished(100) == 15
        assert not alerts.unpublished
        topics = [t for t, _ in link.published]
        assert sorted(topics) == sorted(f"fh/t/alerts/K{i}" for i in range(25))
    finally:
        journal.close()


def test_new_alert_states_built_in_bulk_are_the_ones_built_one_by_one() -> None:
    keys = [f"K{i}" for i in range(50)]
    bulk = AlertStates.unknown(keys)
    one_by_one = AlertStates((k, AlertState(k)) for k in keys)
    assert bulk == one_by_one
    assert bulk.by_state == one_by_one.by_state
    assert bulk.active == one_by_one.active == set()
    assert AlertStates.unknown([]).by_state == AlertStates().by_state


def test_skus_with_one_reorder_rule_share_one_policy(tmp_path: Path) -> None:
    site = load_site(write_small_site(tmp_path, mqtt_port=1, scales=4))
    targets = AlertSettings.from_site(site).targets
    assert len({id(t.policy) for t in targets}) == 1
    other = site.model_copy(
        update={"skus": (site.skus[0].model_copy(update={"reorder_point": 5}), *site.skus[1:])}
    )
    first, *rest = AlertSettings.from_site(other).targets
    assert first.policy.reorder_point == 5
    assert all(t.policy.reorder_point == 10 for t in rest)
    assert first.policy is not rest[0].policy


def test_the_pass_over_every_key_after_a_start_goes_in_slices(tmp_path: Path) -> None:
    """After a start every key is evaluated once more, ``full_slice`` per tick (one pass over
    100k keys held the loop ~1 s); a key that changes meanwhile is evaluated at once."""
    site = load_site(write_small_site(tmp_path, mqtt_port=1, scales=25, dwell_s=0.0))
    journal = Journal(tmp_path / "journal.sqlite")
    journal.open()
    try:
        specs = shelf_specs(site)
        states = ShelfStates(specs)
        for sid, spec in specs.items():  # every shelf settled at 2 units: every SKU low
            for k in range(3):
                apply_weight(states[sid], spec, T0 + k, 700.0, T0 + k)
        alerts = AlertService(
            AlertSettings.from_site(site), journal, RecordingLink(), Bus().publish, states, specs
        )
        alerts.full_slice = 10
        alerts.tick(T0 + 5)
        assert alerts.evaluated == 10
        assert [k for k, st in alerts.alerts.items() if st.episode] == [f"K{i}" for i in range(10)]
        alerts.on_events([StockChanged("sh24", "K24", 2, 2, T0 + 5)])  # K24 changed: at once
        alerts.tick(T0 + 6)
        assert alerts.evaluated == 21
        assert alerts.full_pass_pending
        alerts.tick(T0 + 7)
        assert alerts.evaluated == 26  # the last slice, K20..K24
        assert not alerts.full_pass_pending
        alerts.tick(T0 + 8)
        assert alerts.evaluated == 26  # nothing left, nothing changed
        assert all(st.episode is not None for st in alerts.alerts.values())
    finally:
        journal.close()
