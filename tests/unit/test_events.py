"""Typed events keep the wire format: each one's ``as_dict()`` serialises to exactly the bytes
of the dict that was built by hand before it had a type (journal bodies, history points, the
live WebSocket and the bus carry that dict), and ``from_dict`` gives the same event back."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from controller.domain.events import (
    AlertDeescalated,
    AlertEscalated,
    AlertManualNotice,
    AlertNotice,
    AlertRaised,
    AlertResolved,
    CalibrationValues,
    CmdIdsMoved,
    Event,
    OrderException,
    OrderStateChanged,
    PickTaskChanged,
    PlcCommandIssued,
    SeqGap,
    SeqGapFilled,
    ShelfCalibrated,
    ShelfStatusChanged,
    StockChanged,
    event_from_dict,
)
from controller.domain.model import OrderState, ShelfStatus, StockState, TaskState
from controller.domain.reorder import AlertAcknowledged, AlertSnoozed, AlertSnoozeEnded
from controller.ports import DeviceStatusChanged, LinkStateChanged
from devices.link.state import LinkState

# (typed event, the dict the code built by hand before, in its key order)
WIRE: list[tuple[Event, dict[str, Any]]] = [
    (
        SeqGap(12.5, "s2", 4, 9, 4),
        {"kind": "seq_gap", "ts": 12.5, "device": "s2"} | {"after_seq": 4, "seq": 9, "missing": 4},
    ),
    (
        SeqGapFilled(13.0, "s2", 1, 5, 7, 3),
        {"kind": "seq_gap_filled", "ts": 13.0, "device": "s2", "epoch": 1}
        | {"first_seq": 5, "last_seq": 7, "filled": 3},
    ),
    (
        LinkStateChanged(14.0, "plc:sorter-A", LinkState.UP, LinkState.DOWN),
        {"kind": "link_state", "ts": 14.0, "link": "plc:sorter-A", "old": "up", "new": "down"},
    ),
    (
        DeviceStatusChanged(15.0, "esp1", False),
        {"kind": "device_status", "ts": 15.0, "device": "esp1", "online": False},
    ),
    (
        ShelfCalibrated(
            15.5,
            "sh1",
            "K1",
            "s1",
            0,
            "calibrate",
            "eng",
            CalibrationValues(500.0, 100.0, 1.0),
            CalibrationValues(512.5, 99.5, 1.02),
        ),
        {"kind": "shelf_calibrated", "ts": 15.5, "shelf_id": "sh1", "sku": "K1", "scale": "s1"}
        | {"channel": 0, "action": "calibrate", "by": "eng"}
        | {"old": {"tare_g": 500.0, "unit_weight_g": 100.0, "scale_factor": 1.0}}
        | {"new": {"tare_g": 512.5, "unit_weight_g": 99.5, "scale_factor": 1.02}},
    ),
    (
        StockChanged("sh1", "K1", None, 7, 16.0),
        {"kind": "stock_changed", "shelf_id": "sh1", "sku": "K1", "old_units": None}
        | {"new_units": 7, "ts_s": 16.0},
    ),
    (
        ShelfStatusChanged("sh1", ShelfStatus.OK, ShelfStatus.STALE, 17.0, "no_reading"),
        {"kind": "shelf_status_changed", "shelf_id": "sh1", "old": "ok", "new": "stale"}
        | {"ts_s": 17.0, "reason": "no_reading"},
    ),
    # Orders and picks (services/order_desk.py, domain/orders.py), as built by hand before.
    (
        OrderStateChanged(
            18.0, "t-00000001", "wms", "W-1", OrderState.ALLOCATED, OrderState.PICKING, None
        ),
        {"kind": "order_state", "ts": 18.0, "order_id": "t-00000001", "channel": "wms"}
        | {"external_id": "W-1", "old": "ALLOCATED", "new": "PICKING", "reason": None},
    ),
    (
        OrderException(
            19.0,
            "t-00000001",
            "api",
            "W-2",
            OrderState.PICKING,
            OrderState.EXCEPTION,
            "task 0 SHORT: x",
        ),
        {"kind": "order_exception", "ts": 19.0, "order_id": "t-00000001", "channel": "api"}
        | {"external_id": "W-2", "old": "PICKING", "new": "EXCEPTION", "reason": "task 0 SHORT: x"},
    ),
    (
        PickTaskChanged(
            20.0,
            "t-00000001",
            0,
            "K0",
            2,
            "sh0",
            "sorter-1",
            7,
            3,
            TaskState.DIVERTED,
            "DIVERTED",
            None,
        ),
        {"kind": "pick_task", "ts": 20.0, "order_id": "t-00000001", "task_no": 0, "sku": "K0"}
        | {"qty": 2, "shelf": "sh0", "sorter": "sorter-1", "cmd_id": 7, "tote": 3}
        | {"state": "DIVERTED", "result": "DIVERTED", "reason": None},
    ),
    (  # a supervisor's resolution: the one pick_task with ``by``
        PickTaskChanged(
            21.0,
            "t-00000001",
            1,
            "K0",
            1,
            "sh0",
            "sorter-1",
            8,
            4,
            TaskState.CONFIRMED,
            None,
            "resolved",
            by="sup",
        ),
        {"kind": "pick_task", "ts": 21.0, "order_id": "t-00000001", "task_no": 1, "sku": "K0"}
        | {"qty": 1, "shelf": "sh0", "sorter": "sorter-1", "cmd_id": 8, "tote": 4}
        | {"state": "CONFIRMED", "result": None, "reason": "resolved", "by": "sup"},
    ),
    (
        CmdIdsMoved(21.5, "sorter-1", 3, 41, 57),
        {"kind": "cmd_ids_moved", "ts": 21.5, "sorter": "sorter-1", "epoch": 3}
        | {"old": 41, "new": 57},
    ),
    (
        PlcCommandIssued(
            22.0, "conveyor-1", "stop", "eng", "engineer", "ok", "", "STOPPED", "NONE"
        ),
        {"kind": "plc_command", "ts": 22.0, "plc": "conveyor-1", "command": "stop", "by": "eng"}
        | {"role": "engineer", "result": "ok", "detail": "", "state": "STOPPED", "fault": "NONE"},
    ),
    (
        PlcCommandIssued(
            23.0, "sorter-1", "start", "eng", "engineer", "unavailable", "down", None, None
        ),
        {"kind": "plc_command", "ts": 23.0, "plc": "sorter-1", "command": "start", "by": "eng"}
        | {"role": "engineer", "result": "unavailable", "detail": "down", "state": None}
        | {"fault": None},
    ),
]


@pytest.mark.parametrize(("event", "legacy"), WIRE, ids=lambda x: getattr(x, "kind", ""))
def test_wire_bytes_unchanged_and_round_trip(event: Event, legacy: dict[str, Any]) -> None:
    assert orjson.dumps(event.as_dict()) == orjson.dumps(legacy)
    assert type(event).from_dict(legacy) == event
    assert event_from_dict(orjson.loads(orjson.dumps(legacy))) == event


def _raised() -> AlertRaised:
    return AlertRaised("K1", "K1@1", StockState.LOW, 5, 10, 35, 20.0)


ALERTS: list[tuple[AlertNotice, dict[str, Any]]] = [
    (
        AlertNotice(_raised(), "K1", 35, True),
        {"kind": "alert_raised", "key": "K1", "episode_id": "K1@1", "severity": "low"}
        | {"level": 5, "threshold": 10, "suggested_order_qty": 35, "ts_s": 20.0}
        | {"sku": "K1", "notify": True},
    ),
    (
        AlertNotice(
            AlertEscalated("shelf:sh1", "e", StockState.LOW, StockState.OUT, 0, 0, 21.0),
            "K1",
            40,
            False,
        ),
        {"kind": "alert_escalated", "key": "shelf:sh1", "episode_id": "e"}
        | {"old_severity": "low", "new_severity": "out", "level": 0, "threshold": 0}
        | {"ts_s": 21.0, "sku": "K1", "suggested_order_qty": 40, "notify": False},
    ),
    (
        AlertNotice(
            AlertDeescalated("K1", "e", StockState.OUT, StockState.LOW, 4, 10, 22.0),
            "K1",
            36,
            False,
        ),
        {"kind": "alert_deescalated", "key": "K1", "episode_id": "e"}
        | {"old_severity": "out", "new_severity": "low", "level": 4, "threshold": 10}
        | {"ts_s": 22.0, "sku": "K1", "suggested_order_qty": 36, "notify": False},
    ),
    (
        AlertNotice(AlertResolved("K1", "e", StockState.LOW, 30, 20.0, 23.0), "K1", None, True),
        {"kind": "alert_resolved", "key": "K1", "episode_id": "e", "severity": "low"}
        | {"level": 30, "raised_at_s": 20.0, "ts_s": 23.0}
        | {"sku": "K1", "suggested_order_qty": None, "notify": True},
    ),
]


@pytest.mark.parametrize(("notice", "legacy"), ALERTS, ids=lambda x: getattr(x, "kind", ""))
def test_alert_notices_keep_the_published_shape(
    notice: AlertNotice, legacy: dict[str, Any]
) -> None:
    # The shape AlertService built by hand: transition dict, then sku, suggested_order_qty
    # (replacing a raise's own, in place) and notify.
    assert orjson.dumps(notice.as_dict()) == orjson.dumps(legacy)
    assert AlertNotice.from_dict(orjson.loads(orjson.dumps(legacy))) == notice


def test_unknown_or_mismatched_bodies_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="unknown event kind"):
        event_from_dict({"kind": "no_such_event"})
    with pytest.raises(ValueError, match="not a seq_gap event"):
        SeqGap.from_dict({"kind": "seq_gap_filled", "ts": 1.0})
    with pytest.raises(KeyError):
        SeqGap.from_dict({"kind": "seq_gap", "ts": 1.0, "device": "s"})
    with pytest.raises(ValueError, match="not an alert transition"):
        AlertNotice.from_dict(
            AlertAcknowledged("K1", "e", StockState.LOW, "sup", "", 1.0).as_dict()
            | {"sku": "K1", "suggested_order_qty": 1, "notify": False}
        )


MANUAL: list[tuple[AlertManualNotice, dict[str, Any]]] = [
    (
        AlertManualNotice(
            AlertAcknowledged("K1", "e", StockState.LOW, "sup", "on it", 30.0), "K1", False
        ),
        {"kind": "alert_ack", "key": "K1", "episode_id": "e", "severity": "low", "by": "sup"}
        | {"note": "on it", "ts_s": 30.0, "sku": "K1", "notify": False},
    ),
    (
        AlertManualNotice(
            AlertSnoozed("K1", "e", StockState.OUT, "sup", "truck due", 90.0, 31.0), "K1", False
        ),
        {"kind": "alert_snooze", "key": "K1", "episode_id": "e", "severity": "out", "by": "sup"}
        | {"reason": "truck due", "until_s": 90.0, "ts_s": 31.0, "sku": "K1", "notify": False},
    ),
    (
        AlertManualNotice(
            AlertSnoozeEnded("K1", "e", StockState.LOW, "sup", False, 90.0), "K1", True
        ),
        {"kind": "alert_snooze_ended", "key": "K1", "episode_id": "e", "severity": "low"}
        | {"snoozed_by": "sup", "acked": False, "ts_s": 90.0, "sku": "K1", "notify": True},
    ),
]


@pytest.mark.parametrize(("notice", "legacy"), MANUAL, ids=lambda x: getattr(x, "kind", ""))
def test_manual_alert_notices_keep_the_published_shape(
    notice: AlertManualNotice, legacy: dict[str, Any]
) -> None:
    # The shape AlertService built by hand: the event's dict, then sku and notify.
    assert orjson.dumps(notice.as_dict()) == orjson.dumps(legacy)
    assert AlertManualNotice.from_dict(orjson.loads(orjson.dumps(legacy))) == notice


def test_a_manual_notice_refuses_other_events() -> None:
    with pytest.raises(ValueError, match="not a manual alert event"):
        AlertManualNotice(SeqGap(1.0, "s", 1, 3, 1), "K1", False)
