"""Pick commands have an MQTT session of their own, on the control loop (docs/architecture.md,
"Sessions"): a blocked ingest loop delays neither the answer nor the ack of an MQTT pick
command, and the upgrade from a release whose one session took the commands loses none and
answers each once. Real mosquitto, real Modbus simulators, paho as the floor system."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest

from controller.domain.events import BusEvent, StockChanged
from controller.runtime import Runtime, command_client_id, command_topic
from controller.services.supervision import degraded_reasons
from devices.link.mqtt import MqttLink
from devices.link.state import LinkState
from simulators.conveyor import ConveyorPlc
from simulators.modbus_host import PlcHost
from simulators.sorter import SorterPlc
from tests.integration.test_control_loop import BLOCK_LIMIT_S, Written, plcs_in_thread
from tests.integration.test_picking import floor, pick_command
from tests.integration.test_sensing_e2e import PahoWatcher, readings
from tests.mosquitto import MosquittoBroker, paho_publish
from tests.sites import auth_headers
from tests.waiting import wait_for_condition

pytestmark = pytest.mark.timeout(90)

RESULTS = "fh/t/cmd/picks/result"


class ThreadWatcher(PahoWatcher):
    """A `PahoWatcher` whose messages a blocked thread can also wait for (`PahoWatcher` wakes
    an asyncio loop: the one this test blocks)."""

    def __init__(self, port: int, topic_filter: str) -> None:
        self.cond = threading.Condition()
        super().__init__(port, topic_filter, client_id="thread-watcher")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self.cond:
            super()._on_message(client, userdata, msg)
            self.cond.notify_all()

    def wait_order(self, order_id: str, timeout_s: float) -> dict[str, Any] | None:
        """Block until a message names ``order_id``; it, or None after ``timeout_s``."""

        def found() -> dict[str, Any] | None:
            return next((b for _, b, _ in self.messages if b.get("order_id") == order_id), None)

        with self.cond:
            self.cond.wait_for(lambda: found() is not None, timeout_s)
            return found()


async def test_a_blocked_ingest_loop_delays_no_mqtt_pick_answer(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """While a bus listener blocks the ingest loop, a pick command published over MQTT from
    the blocked thread itself reaches the sorter (its mailbox write) and is answered on
    ``…/result``: its session lives on the control loop. Before, its reply (and its ack) were
    published by the main loop, after the block."""
    conveyor = ConveyorPlc("conveyor-1")
    sorter = SorterPlc("sorter-1", speed=20.0, lane_drain_s=0.0)
    sorter_writes = Written(sorter)
    watcher = ThreadWatcher(mosquitto.port, RESULTS)
    await watcher.subscribed()
    try:
        async with (
            plcs_in_thread(conveyor, sorter) as (ch, sh),
            floor(mosquitto, tmp_path, ch, sh) as f,  # type: ignore[arg-type]
        ):
            rt: Runtime = f.rt
            await f.shelf("s0", 20)
            seen: dict[str, Any] = {}
            unblocked = asyncio.Event()

            def block_ingest(events: list[BusEvent]) -> None:
                """On the first count of shelf sh1: block this (the ingest) loop, and from
                this very thread publish a pick command and wait for its answer."""
                if seen or not any(
                    isinstance(e, StockChanged) and e.shelf_id == "sh1" for e in events
                ):
                    return
                seen["blocked"] = True
                command = pick_command("BLK-1", "plant-b", 2)
                paho_publish(mosquitto.port, [("fh/t/cmd/picks", orjson.dumps(command))])
                seen["mailbox_write"] = sorter_writes.wait(
                    lambda: sorter_writes.count("mb_strobe") >= 1, BLOCK_LIMIT_S
                )
                seen["reply"] = watcher.wait_order("BLK-1", BLOCK_LIMIT_S)
                unblocked.set()

            rt.bus.add_listener(block_ingest)
            assert sorter_writes.count("mb_strobe") == 0
            acks_before = rt.command_link.stats.acks_sent
            await asyncio.to_thread(
                paho_publish, mosquitto.port, readings("s1", 0, 10, 6, rt.clock() - 0.6)
            )
            async with asyncio.timeout(3 * BLOCK_LIMIT_S):
                await unblocked.wait()
            assert seen["mailbox_write"], "the MQTT pick's first Modbus write waited for ingest"
            reply = seen["reply"]
            assert reply is not None, "the MQTT pick's answer waited for the blocked ingest loop"
            assert reply["status"] == 201, reply
            # Acknowledged by its own session (after the journal commit), not by the main one.
            await wait_for_condition(
                lambda: rt.command_link.stats.acks_sent,
                10,
                what="the command session's ack",
                until=lambda n: n > acks_before,
            )
            assert rt.command_link.acks_held == 0
            assert rt.commands_on_main_session == 0
    finally:
        watcher.close()


async def test_the_sessions_and_their_subscriptions(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """The main session no longer subscribes to the command topic; the command session does
    (QoS 1, persistent, client id ``<client_id>-picks``, never holding a read); the health
    report shows it and a command session that is down makes the controller degraded, not
    unready."""
    conveyor = ConveyorPlc("conveyor-1")
    sorter = SorterPlc("sorter-1", speed=20.0, lane_drain_s=0.0)
    async with (
        PlcHost(conveyor, seed=1) as ch,
        PlcHost(sorter, seed=2) as sh,
        floor(mosquitto, tmp_path, ch, sh) as f,
    ):
        rt = f.rt
        cmd = command_topic(rt.site)
        assert cmd not in dict(rt.link.config.subscriptions)
        assert cmd not in rt.link.granted_qos
        assert (
            rt.command_link.config.client_id == command_client_id(rt.site) == "floorhand-test-picks"
        )
        assert rt.command_link.config.client_id != rt.link.config.client_id
        assert rt.command_link.granted_qos == {cmd: 1}
        assert not rt.command_link.config.clean_start
        assert rt.command_link.config.will is None  # the owner claim's will is the main one's
        # Readings are held under load to grow the groups ([mqtt] coalesce_*; defaults 2 ms,
        # 16 KiB, 8,000 msg/s); a command is answered at once.
        assert (
            rt.link.config.coalesce_s,
            rt.link.config.coalesce_bytes,
            rt.link.config.coalesce_from_msg_s,
        ) == (0.002, 16_384, 8_000.0)
        assert rt.command_link.config.coalesce_s == 0.0
        report = rt.supervision.report()
        assert report.ready
        assert report.command_link is not None
        assert report.command_link.state == "up"
        assert report.links["mqtt:picks"] == "up"
        assert "mqtt:picks" not in report.degraded_by
        r = await f.client.get("/api/v1/health")
        assert r.json()["command_link"]["state"] == "up", r.text
        r = await f.client.get("/metrics", headers=auth_headers("engineer"))
        assert 'floorhand_link_state{link="mqtt:picks",state="up"} 1.0' in r.text


def test_a_command_session_down_degrades_but_leaves_the_controller_ready() -> None:
    """Ingest and HTTP picks work without the command session: degraded, not unready."""
    common: dict[str, Any] = {
        "ready": True,
        "backpressure": False,
        "last_commit_error": None,
        "history_state": None,
        "plc_links": {},
        "mqtt_warnings": (),
    }
    for state in ("down", "connecting"):
        assert degraded_reasons(**common, command_link=state) == ("mqtt:picks",)
    assert degraded_reasons(**common, command_link="up") == ()
    assert degraded_reasons(**common) == ()  # no command session (a report without it)


def forget_session(port: int, client_id: str) -> None:
    """Have the broker drop the persistent session of ``client_id`` (a clean start with no
    session expiry, then a disconnect)."""
    done = threading.Event()
    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
    )
    client.on_connect = lambda *a: done.set()
    client.connect("127.0.0.1", port, keepalive=30, clean_start=True)
    client.loop_start()
    try:
        assert done.wait(10), "could not connect to drop the session"
    finally:
        client.disconnect()
        client.loop_stop()


def _old_release_session(rt: Runtime) -> MqttLink:
    """The broker session of the previous release: the main session's client id, its
    subscriptions plus the command topic (it took the pick commands itself)."""
    old = rt.link.config
    return MqttLink(
        dataclasses.replace(
            old, subscriptions=(*old.subscriptions, (command_topic(rt.site), 1)), will=None
        ),
        lambda msgs: None,  # never called: it only connects, subscribes and leaves
        name="previous-release",
    )


async def test_commands_queued_in_a_previous_release_session_are_answered_once(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """Upgrade: the previous release's session (same client id as the main session) holds the
    command subscription and a command queued while the controller was down. After the
    upgrade it is answered once (by the main session, which then drops the subscription);
    commands published later, running or down, come through the command session only. Each
    is executed once and answered once, none as a replay."""
    conveyor = ConveyorPlc("conveyor-1")
    sorter = SorterPlc("sorter-1", speed=20.0, lane_drain_s=0.0)
    watcher = PahoWatcher(mosquitto.port, RESULTS, client_id="replies")
    await watcher.subscribed()

    async def publish(order_id: str) -> None:
        body = orjson.dumps(pick_command(order_id, "wms", 1))
        await asyncio.to_thread(paho_publish, mosquitto.port, [("fh/t/cmd/picks", body)])

    try:
        async with PlcHost(conveyor, seed=1) as ch, PlcHost(sorter, seed=2) as sh:
            # The stock, then the previous release's session: connected once, left (kept).
            async with floor(mosquitto, tmp_path, ch, sh) as f:
                await f.shelf("s0", 20)
                rt = f.rt
            # The previous release had no command session: the one of the first run goes.
            await asyncio.to_thread(forget_session, mosquitto.port, command_client_id(rt.site))
            old = _old_release_session(rt)
            task = asyncio.create_task(old.run())
            try:
                await old.watch.wait_for(LinkState.UP, 10)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await publish("UP-1")  # queued in the previous release's session only
            async with floor(mosquitto, tmp_path, ch, sh) as f:
                rt = f.rt
                _, reply = await watcher.wait_for(lambda t, b: b.get("order_id") == "UP-1")
                assert reply["status"] == 201, reply
                assert rt.commands_on_main_session == 1
                # Dropped from the main session once the command session held it.
                await wait_for_condition(
                    lambda: rt.link.stats.unsubacks, 10, what="the UNSUBACK", until=bool
                )
                await publish("UP-2")
                _, reply = await watcher.wait_for(lambda t, b: b.get("order_id") == "UP-2")
                assert reply["status"] == 201, reply
                assert rt.commands_on_main_session == 1
            await publish("UP-3")  # queued in the command session only
            async with floor(mosquitto, tmp_path, ch, sh) as f:
                rt = f.rt
                _, reply = await watcher.wait_for(lambda t, b: b.get("order_id") == "UP-3")
                assert reply["status"] == 201, reply
                assert rt.commands_on_main_session == 0
        replies = [b for _, b, _ in watcher.messages]
        assert sorted(b["order_id"] for b in replies) == ["UP-1", "UP-2", "UP-3"], replies
        assert not any(b.get("replayed") for b in replies)
        assert sorted(sorter.executions.values()) == [1, 1, 1]
    finally:
        watcher.close()


async def test_a_retained_command_is_never_executed(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """A retained pick command (stale by definition) reaches the command session when it
    subscribes anew: acknowledged, never executed, never answered."""
    conveyor = ConveyorPlc("conveyor-1")
    sorter = SorterPlc("sorter-1", speed=20.0, lane_drain_s=0.0)
    watcher = PahoWatcher(mosquitto.port, RESULTS, client_id="replies")
    await watcher.subscribed()
    stale = ("fh/t/cmd/picks", orjson.dumps(pick_command("RET-1", "wms", 1)))
    try:
        async with PlcHost(conveyor, seed=1) as ch, PlcHost(sorter, seed=2) as sh:
            async with floor(mosquitto, tmp_path, ch, sh) as f:
                await f.shelf("s0", 20)
                client_id = command_client_id(f.rt.site)
            await asyncio.to_thread(forget_session, mosquitto.port, client_id)
            await asyncio.to_thread(paho_publish, mosquitto.port, [stale], retain=True)
            async with floor(mosquitto, tmp_path, ch, sh) as f:
                rt = f.rt
                await wait_for_condition(
                    lambda: rt.command_link.stats.acks_sent, 10, what="the ack", until=bool
                )
                body = orjson.dumps(pick_command("LIVE-1", "wms", 1))
                await asyncio.to_thread(paho_publish, mosquitto.port, [("fh/t/cmd/picks", body)])
                _, reply = await watcher.wait_for(lambda t, b: b.get("order_id") == "LIVE-1")
                assert reply["status"] == 201, reply
                assert rt.command_link.acks_held == 0
                assert rt.journal.db.execute("SELECT count(*) FROM orders").fetchone()[0] == 1
        assert [b["order_id"] for _, b, _ in watcher.messages] == ["LIVE-1"]
    finally:
        await asyncio.to_thread(
            paho_publish, mosquitto.port, [("fh/t/cmd/picks", b"")], retain=True
        )
        watcher.close()
