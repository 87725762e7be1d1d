"""PickingService.submit against the real SQLite journal, with stand-ins for our own drivers
(only their link state and epoch are read at submission). Execution is covered against
simulated PLCs in tests/integration/test_picking.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from controller.adapters.journal import DuplicateOrderError, Journal
from controller.config import SiteConfig, load_site
from controller.domain.events import BusEvent, CmdIdsMoved
from controller.domain.model import ShelfStatus
from controller.domain.stock import ShelfState
from controller.services.ingest import shelf_specs
from controller.services.order_desk import PickRefused
from controller.services.pick_wire import status_of
from controller.services.picking import PickingService, PickRequest, ShelfCount
from devices.link.state import LinkState
from tests.sites import write_small_site


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def site_with_route(tmp_path: Path, ttl_h: float = 48.0) -> SiteConfig:
    path = write_small_site(tmp_path, mqtt_port=1883, scales=2)
    text = path.read_text().replace(
        '[[zones]]\nid = "Z"\n', '[[zones]]\nid = "Z"\nconveyors = ["c1"]\nsorter = "s1"\n'
    )
    text += f"""
[picking]
idempotency_ttl_h = {ttl_h}

[[plcs]]
id = "c1"
kind = "conveyor"
port = 1502

[[plcs]]
id = "s1"
kind = "sorter"
port = 1503

[[pack_stations]]
id = "PS1"
sorter = "s1"
lane = 2
"""
    path.write_text(text)
    return load_site(path)


class FakeSorter:
    """A stand-in for our sorter driver: submission reads ``mailbox_known`` and ``epoch``; the
    service registers a mailbox listener, which `report` calls as a status read would."""

    def __init__(self, up: bool = True) -> None:
        self.link = link(up)
        self.mailbox_known = up
        self.epoch = 7
        self.listeners: list[Callable[[int, int], None]] = []

    def add_mailbox_listener(self, callback: Callable[[int, int], None]) -> None:
        self.listeners.append(callback)

    def add_epoch_listener(self, callback: Callable[[int | None, int], None]) -> None:
        pass

    def report(self, highest_id: int) -> None:
        for callback in self.listeners:
            callback(self.epoch, highest_id)


def link(up: bool) -> Any:
    """A stand-in for our Modbus link: its state, why it last went down, its state watch."""
    return SimpleNamespace(
        state=LinkState.UP if up else LinkState.DOWN,
        last_down_reason=None if up else "refused",
        watch=SimpleNamespace(add_listener=lambda callback: None),
    )


def device(up: bool = True) -> Any:
    """A stand-in for a conveyor driver: submission reads only ``link.state``."""
    return SimpleNamespace(link=link(up), add_epoch_listener=lambda callback: None)


def service(
    site: SiteConfig, journal: Journal, clock: Clock, *, units: int = 20, sorter_up: bool = True
) -> tuple[PickingService, list[dict[str, Any]]]:
    specs = shelf_specs(site)
    states = {sid: ShelfState(spec) for sid, spec in specs.items()}
    for st in states.values():
        st.units, st.status, st.last_ts_s = units, ShelfStatus.OK, clock.now
    published: list[BusEvent] = []
    svc = PickingService(
        site,
        journal,
        states,
        specs,
        conveyors={"c1": device()},
        sorters={"s1": FakeSorter(sorter_up)},
        publish_bus=published.extend,
        clock=clock,
    )
    svc.restore()
    return svc, published


REQ = PickRequest("W-1", (("K0", 3),), "PS1", "wms")


async def test_submit_journals_everything_in_one_go(tmp_path: Path) -> None:
    site, clock = site_with_route(tmp_path), Clock()
    journal = Journal(tmp_path / "j.sqlite")
    journal.open()
    try:
        svc, _ = service(site, journal, clock)
        done = svc.submit(REQ, key="k1", principal="floor-1")
        assert (done.status, done.replayed) == (201, False)
        (task,) = done.order["tasks"]
        assert (task["shelf"], task["cmd_id"], task["tote"], task["plc_epoch"]) == ("sh0", 1, 1, 7)
        assert task["target_count"] == 17
        assert journal.counters() == {"order": 1, "tote": 1, "cmd:s1": 1}
        assert journal.idempotency_key("k1") is not None
        kinds = [r[0] for r in journal.db.execute("SELECT kind FROM events")]
        assert kinds == ["order_state"] * 3
        assert svc.available("sh0") == 17

        # The same key and body: a replay (200); another body: 422 naming the caller's own
        # order; another caller: 422 without it.
        again = svc.submit(REQ, key="k1", principal="floor-1")
        assert (again.status, again.replayed, again.order["order_id"]) == (
            200,
            True,
            done.order["order_id"],
        )
        with pytest.raises(PickRefused) as err:
            svc.submit(
                PickRequest("W-1", (("K0", 4),), "PS1", "wms"), key="k1", principal="floor-1"
            )
        assert (status_of(err.value), err.value.extra) == (
            422,
            {"order_id": done.order["order_id"]},
        )
        with pytest.raises(PickRefused) as err:
            svc.submit(REQ, key="k1", principal="someone-else")
        assert (status_of(err.value), err.value.extra) == (422, {})
        # Another caller's (channel, order id), under its own key: 409, nothing of the order.
        with pytest.raises(PickRefused) as err:
            svc.submit(REQ, key="k-other", principal="someone-else")
        assert (status_of(err.value), err.value.code, err.value.extra) == (409, "order_exists", {})
        assert done.order["order_id"] not in err.value.detail
        assert svc.stats["accepted"] == 1
    finally:
        journal.close()


async def test_journal_refuses_a_second_order_with_the_same_external_id(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    journal.open()
    try:
        body = {
            "order_id": "a",
            "channel": "wms",
            "external_id": "W-1",
            "state": "PICKING",
            "updated_ts": 1.0,
        }
        journal.commit_orders([body])
        with pytest.raises(DuplicateOrderError):
            journal.commit_orders([{**body, "order_id": "b"}], counters={"order": 2})
        assert journal.counters() == {}  # nothing of the refused transaction was written
    finally:
        journal.close()


async def test_expired_keys_fall_back_to_the_journal(tmp_path: Path) -> None:
    """After the TTL the key and the external id are no longer in memory: the same
    (channel, order id) is still recognised, by the journal's unique index."""
    site, clock = site_with_route(tmp_path, ttl_h=1.0), Clock()
    journal = Journal(tmp_path / "j.sqlite")
    journal.open()
    try:
        svc, _ = service(site, journal, clock)
        first = svc.submit(REQ, key="k1", principal="p")
        clock.now += 2 * 3600
        svc2, _ = service(site, journal, clock)  # a restart, two hours later
        assert svc2.desk._keys == {}
        again = svc2.submit(REQ, key="k1", principal="p")
        assert (again.status, again.replayed) == (200, True)
        assert again.order["order_id"] == first.order["order_id"]
        with pytest.raises(PickRefused) as err:
            svc2.submit(PickRequest("W-1", (("K0", 1),), "PS1", "wms"), key="k2", principal="p")
        assert (status_of(err.value), err.value.code) == (409, "order_exists")
        with pytest.raises(PickRefused) as err:  # another caller, found by the journal's index
            svc2.submit(REQ, key="k3", principal="other")
        assert (status_of(err.value), err.value.code, err.value.extra) == (409, "order_exists", {})
        assert journal.db.execute("SELECT count(*) FROM orders").fetchone()[0] == 1
    finally:
        journal.close()


async def test_refusals_reserve_nothing_and_write_nothing(tmp_path: Path) -> None:
    site, clock = site_with_route(tmp_path), Clock()
    journal = Journal(tmp_path / "j.sqlite")
    journal.open()
    try:
        svc, _ = service(site, journal, clock, units=2, sorter_up=False)
        cases = [
            (PickRequest("A", (("K0", 1),), "PS1"), 503, "device_unavailable"),
            (PickRequest("B", (("NOPE", 1),), "PS1"), 422, "invalid_pick"),
            (PickRequest("C", (("K0", 1),), "PS9"), 422, "invalid_pick"),
            (PickRequest("D", (("K0", 0),), "PS1"), 422, "invalid_pick"),
            (PickRequest("E", (("K0", 3),), "PS1"), 409, "insufficient_stock"),
        ]
        for req, status, code in cases:
            with pytest.raises(PickRefused) as err:
                svc.submit(req, key=f"key-{req.external_id}", principal="p")
            assert (status_of(err.value), err.value.code) == (status, code), req
        assert svc.reserved("sh0") == 0
        assert journal.db.execute("SELECT count(*) FROM orders").fetchone()[0] == 0
        assert journal.db.execute("SELECT count(*) FROM idempotency").fetchone()[0] == 0
    finally:
        journal.close()


@pytest.mark.parametrize(
    "payload",
    [
        b"{nope",
        b"[]",
        orjson.dumps({"order_id": "x", "pack_station": "PS1", "lines": "K0"}),
        orjson.dumps({"order_id": "x", "pack_station": "PS1", "lines": [{"sku": "K0"}]}),
        orjson.dumps({"order_id": 5, "pack_station": "PS1", "lines": []}),
        orjson.dumps({"order_id": "x", "pack_station": "PS1", "lines": [], "channel": ""}),
        orjson.dumps({"order_id": "x", "pack_station": "PS1", "lines": [], "idempotency_key": 3}),
        orjson.dumps(
            {"order_id": "x", "pack_station": "PS1", "lines": [{"sku": "K0", "qty": 1.5}]}
        ),
    ],
)
async def test_bad_mqtt_commands_are_answered_400(tmp_path: Path, payload: bytes) -> None:
    site, clock = site_with_route(tmp_path), Clock()
    journal = Journal(tmp_path / "j.sqlite")
    journal.open()
    try:
        svc, _ = service(site, journal, clock)
        status, reply = svc.on_command(payload)
        assert status == 400
        assert reply["code"] == "bad_command"
        assert reply["detail"]
        assert svc.stats["invalid"] == 1
    finally:
        journal.close()


async def test_closed_orders_are_trimmed_open_ones_never(tmp_path: Path) -> None:
    """Closed = SHIPPED, EXCEPTION, CANCELLED (docs/picking.md). A SORTED or PACKED order still
    waits for a person to pack or ship it: it is kept however old."""
    journal = Journal(tmp_path / "j.sqlite")
    journal.open()
    try:
        rows = [
            ("old-shipped", "SHIPPED", 100.0),
            ("old-exception", "EXCEPTION", 100.0),
            ("old-cancelled", "CANCELLED", 100.0),
            ("old-open", "PICKING", 100.0),
            ("old-sorted", "SORTED", 100.0),
            ("old-packed", "PACKED", 100.0),
            ("new-shipped", "SHIPPED", 900.0),
        ]
        journal.commit_orders(
            [
                {"order_id": oid, "channel": "c", "external_id": oid, "state": st, "updated_ts": ts}
                for oid, st, ts in rows
            ]
        )
        assert journal.trim_orders(500.0) == 3
        left = {r[0] for r in journal.db.execute("SELECT order_id FROM orders")}
        assert left == {"old-open", "old-sorted", "old-packed", "new-shipped"}
    finally:
        journal.close()


async def test_cmd_ids_move_above_the_plcs_before_the_next_pick(tmp_path: Path) -> None:
    """B6: a sorter whose ids are ahead of the journal's counter (restored backup, mailbox
    written by hand): the counter moves above them, journaled, and the next pick's cmd_id is
    above; a read reporting lower ids changes nothing; until the mailbox was read, picks to the
    sorter are refused like a sorter that is down."""
    site, clock = site_with_route(tmp_path), Clock()
    journal = Journal(tmp_path / "j.sqlite")
    journal.open()
    try:
        svc, published = service(site, journal, clock)
        sorter = svc.executor.sorters["s1"]
        assert isinstance(sorter, FakeSorter)
        sorter.mailbox_known = False
        with pytest.raises(PickRefused) as err:
            svc.submit(REQ, key="k0", principal="p")
        assert (status_of(err.value), err.value.code) == (503, "device_unavailable")
        sorter.mailbox_known = True
        sorter.report(500)
        assert journal.counters()["cmd:s1"] == 500
        assert [type(e) for e in published] == [CmdIdsMoved]
        kinds = [r[0] for r in journal.db.execute("SELECT kind FROM events")]
        assert kinds == ["cmd_ids_moved"]
        sorter.report(20)  # below the counter: nothing to do
        assert journal.counters()["cmd:s1"] == 500
        done = svc.submit(REQ, key="k1", principal="p")
        assert done.order["tasks"][0]["cmd_id"] == 501
        assert journal.counters()["cmd:s1"] == 501
        # A restarted service continues above the moved counter.
        again, _ = service(site, journal, clock)
        assert (
            again.submit(
                PickRequest("W-2", (("K0", 1),), "PS1", "wms"), key="k2", principal="p"
            ).order["tasks"][0]["cmd_id"]
            == 502
        )
    finally:
        journal.close()


def command(**changes: Any) -> bytes:
    body: dict[str, Any] = {
        "order_id": "M-1",
        "pack_station": "PS1",
        "lines": [{"sku": "K0", "qty": 1}],
    }
    body.update(changes)
    return orjson.dumps({k: v for k, v in body.items() if v is not None})


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        # Values the shared schema refuses for their size or form: 422 as the desk's own checks
        # (the statuses the hand-written parser gave them).
        (command(lines=[{"sku": "K0", "qty": 0}]), 422, "invalid_pick"),
        (command(order_id=""), 422, "invalid_pick"),
        (command(lines=[{"sku": "no such sku", "qty": 1}]), 422, "invalid_pick"),
        (command(pack_station="PS9"), 422, "invalid_pick"),
        # Not the schema's shape, or a bad channel / key: 400.
        (command(lines=[{"sku": "K0", "qty": "1"}]), 400, "bad_command"),
        (command(channel=""), 400, "bad_command"),
        (command(idempotency_key=""), 400, "bad_command"),
        # Unknown fields are ignored on MQTT, as they always were.
        (command(note="from plant b"), 201, None),
    ],
)
async def test_mqtt_commands_are_answered_like_before(
    tmp_path: Path, payload: bytes, status: int, code: str | None
) -> None:
    site, clock = site_with_route(tmp_path), Clock()
    journal = Journal(tmp_path / "j.sqlite")
    journal.open()
    try:
        svc, _ = service(site, journal, clock)
        got, reply = svc.on_command(payload)
        assert (got, reply.get("code")) == (status, code), reply
        if status == 422:
            assert reply["order_id"] == orjson.loads(payload)["order_id"]
    finally:
        journal.close()


def test_the_mqtt_command_and_the_api_share_one_pick_schema() -> None:
    """One `PickIn` (services/pick_wire.py): the API's body and, with the key, the MQTT
    command; no hand-written parser of the same fields."""
    import inspect

    from controller.api.routes import orders
    from controller.services import picking
    from controller.services.pick_wire import PickCommand, PickIn

    assert orders.PickIn is PickIn
    assert inspect.signature(orders.create_pick).parameters["body"].annotation in (PickIn, "PickIn")
    assert issubclass(PickCommand, PickIn)
    assert set(PickCommand.model_fields) == {*PickIn.model_fields, "idempotency_key"}
    assert "orjson.loads" not in inspect.getsource(picking)


def test_equal_shelf_counts_are_one_object() -> None:
    """The control loop's copy of every shelf's count: 100k shelves at a large site hold a few
    hundred distinct (units, status) pairs, one frozen object each."""
    a = ShelfCount.of(SimpleNamespace(units=7, status=ShelfStatus.OK))
    b = ShelfCount.of(SimpleNamespace(units=7, status=ShelfStatus.OK))
    c = ShelfCount.of(SimpleNamespace(units=7, status=ShelfStatus.STALE))
    assert a is b
    assert (a.units, a.status, c.status) == (7, ShelfStatus.OK, ShelfStatus.STALE)
    assert c is not a
