"""The bus's contract: groups are delivered first in, first out; a listener that publishes only
queues (never re-entrant delivery), so every consumer sees events in causal order; a listener
that raises is counted and logged once, and neither stops delivery nor reaches the publisher."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from controller.api.metrics import BusCollector
from controller.bus import Bus
from controller.domain.events import BusEvent, Event
from tests.sites import TARE_G, UNIT_G
from tests.unit.test_alerts_service import RecordingLink, World


@dataclass(frozen=True, slots=True)
class Note(Event):
    """A test event whose kind is its own (the bus only reads ``kind``)."""

    kind: str  # type: ignore[misc]
    ts_s: float = 0.0


def _kinds(events: Sequence[BusEvent | dict[str, Any]]) -> list[str]:
    return [e["kind"] if isinstance(e, dict) else e.kind for e in events]


def test_a_listener_publishing_is_delivered_after_the_current_group() -> None:
    bus = Bus()
    seen_by_first: list[BusEvent] = []
    seen_by_last: list[BusEvent] = []
    right_after_publish: list[str] = []

    def cause_effect(events: list[BusEvent]) -> None:
        seen_by_first.extend(events)
        if any(e.kind == "cause" for e in events):
            bus.publish([Note("effect", 1.0)])
            right_after_publish.extend(_kinds(seen_by_first))

    bus.add_listener(cause_effect)
    bus.add_listener(seen_by_last.extend)
    sub = bus.subscribe("all")
    bus.publish([Note("cause", 0.0), Note("other", 0.0)])

    # The effect was queued behind the current group, not delivered from inside the listener.
    assert right_after_publish == ["cause", "other"]
    assert _kinds(seen_by_first) == ["cause", "other", "effect"]
    assert _kinds(seen_by_last) == ["cause", "other", "effect"]
    got = []
    while (ev := sub.get_nowait()) is not None:
        got.append(ev)
    assert _kinds(got) == ["cause", "other", "effect"]
    assert bus.published == 3
    assert bus.queued == 0


def test_groups_published_during_a_drain_keep_their_order() -> None:
    bus = Bus()
    order: list[str] = []

    def fan(events: list[BusEvent]) -> None:
        for e in events:
            if e.kind == "a":
                bus.publish([Note("b1", 0.0)])
                bus.publish([Note("b2", 0.0)])
            elif e.kind == "b1":
                bus.publish([Note("c", 0.0)])

    bus.add_listener(fan)
    bus.add_listener(lambda events: order.extend(_kinds(events)))
    bus.publish([Note("a", 0.0)])
    assert order == ["a", "b1", "b2", "c"]


def test_the_publisher_may_reuse_its_list() -> None:
    bus = Bus()
    got: list[str] = []
    group = [Note("x", 0.0)]

    def republish(events: list[BusEvent]) -> None:
        if events[0].kind == "x":
            bus.publish(group)  # queued: delivered after this group
            group.clear()  # the caller reuses its list before delivery

    bus.add_listener(republish)
    bus.add_listener(lambda events: got.extend(_kinds(events)))
    bus.publish(group)
    assert got == ["x", "x"]


def test_a_raising_listener_is_counted_logged_once_and_others_still_receive(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = Bus()
    got: list[str] = []

    def broken(events: list[BusEvent]) -> None:
        raise KeyError("shelf_id")

    bus.add_listener(broken)
    bus.add_listener(lambda events: got.extend(_kinds(events)))
    sub = bus.subscribe("sub")
    with caplog.at_level(logging.ERROR, logger="floorhand.bus"):
        bus.publish([Note("stock_changed", 0.0)])
        bus.publish([Note("seq_gap", 1.0)])  # must not raise either
    assert got == ["stock_changed", "seq_gap"]
    assert len(sub) == 2
    assert bus.listener_errors == 2
    assert bus.listener_errors_by_name == {broken.__qualname__: 2}
    logged = [r for r in caplog.records if r.name == "floorhand.bus"]
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert broken.__qualname__ in logged[0].getMessage()
    assert "stock_changed" in logged[0].getMessage()
    # The bus is not left half-way: the next group is delivered normally.
    bus.publish([Note("after", 2.0)])
    assert got[-1] == "after"


def test_stock_changed_precedes_the_alert_it_caused(tmp_path: Path) -> None:
    """The alert service publishes ``alert_raised`` from its listener; consumers added after it
    (picking, metrics, the live hub) and subscriptions still see the ``stock_changed`` first.
    No dwell: the alert is raised by the listener itself, on the commit that lowered the stock."""
    w = World(tmp_path, reorder_point=20, dwell_s=0.0)
    later: list[dict[str, Any]] = []  # in the place of picking / metrics / live
    w.bus.add_listener(lambda evs: later.extend(e.as_dict() for e in evs))
    sub = w.bus.subscribe("live-like")
    for _ in range(6):
        w.reading(TARE_G + 35 * UNIT_G)
        w.advance(0.5)
    for _ in range(6):
        w.reading(TARE_G + 5 * UNIT_G)
        w.advance(0.5)
    subbed = []
    while (ev := sub.get_nowait()) is not None:
        subbed.append(ev.as_dict())
    for seen in (w.events, later, subbed):
        kinds = [k for k in _kinds(seen) if k in ("stock_changed", "alert_raised")]
        assert "alert_raised" in kinds
        raised_at = kinds.index("alert_raised")
        # The change to 5 units that caused the alert is seen before it.
        drop = next(
            i for i, e in enumerate(seen) if e["kind"] == "stock_changed" and e["new_units"] == 5
        )
        assert drop < next(i for i, e in enumerate(seen) if e["kind"] == "alert_raised")
        assert kinds[raised_at - 1] == "stock_changed"
    assert _kinds(later) == _kinds(w.events) == _kinds(subbed)


class AckRecordingLink(RecordingLink):
    def __init__(self) -> None:
        super().__init__()
        self.acked: list[int] = []

    def ack(self, packet_ids: Sequence[int], epoch: int | None = None) -> None:
        self.acked.extend(packet_ids)


def test_a_raising_listener_does_not_reach_the_ingest_ack_path(tmp_path: Path) -> None:
    w = World(tmp_path, reorder_point=20)
    link = AckRecordingLink()
    w.ingest._link = link

    def broken(events: list[BusEvent]) -> None:
        raise RuntimeError("listener bug")

    w.bus.add_listener(broken)
    later: list[BusEvent] = []
    w.bus.add_listener(later.extend)
    for units in (35,) * 6 + (5,) * 6:
        w.reading(TARE_G + units * UNIT_G)  # must not raise into the MQTT link's callback
        w.advance(0.5)
    assert link.acked == list(range(1, 13))
    assert w.bus.listener_errors_by_name[broken.__qualname__] >= 2
    assert "alert_raised" in _kinds(later)
    assert w.ingest.commit_failures == 0


def test_bus_counters_are_exposed_as_metrics() -> None:
    bus = Bus()

    def broken(events: list[BusEvent]) -> None:
        raise ValueError("bug")

    bus.add_listener(broken, name="broken")
    bus.publish([Note("a", 0.0), Note("b", 0.0)])
    registry = CollectorRegistry()
    registry.register(BusCollector(bus))
    text = generate_latest(registry).decode()
    assert "floorhand_bus_events_total 2.0" in text
    assert 'floorhand_bus_listener_errors_total{listener="broken"} 1.0' in text
