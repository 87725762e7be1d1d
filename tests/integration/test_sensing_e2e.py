"""End to end on a real mosquitto: scales → broker → controller → stock → alert on MQTT."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho

from controller.config import load_site
from controller.domain.events import AlertNotice, BusEvent, StockChanged
from controller.runtime import Runtime
from simulators.shelf_scale import ScaleSimOptions, WarehouseScales
from simulators.site import load_site as load_sim_site
from tests.mosquitto import MosquittoBroker, paho_publish
from tests.sites import grams, topic, write_small_site
from tests.waiting import wait_for_condition


class PahoWatcher:
    """An independent subscriber (paho) whose messages can be awaited with a predicate."""

    def __init__(self, port: int, topic_filter: str, client_id: str = "watcher") -> None:
        self.messages: list[tuple[str, dict[str, Any], bool]] = []
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._subscribed = threading.Event()
        self._client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
        )
        self._client.on_connect = lambda c, *a: c.subscribe(topic_filter, qos=1)
        self._client.on_subscribe = lambda *a: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", port, keepalive=30, clean_start=True)
        self._client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        body = orjson.loads(msg.payload)
        self.messages.append((msg.topic, body, bool(msg.retain)))
        self._loop.call_soon_threadsafe(self._changed.set)

    async def subscribed(self, timeout_s: float = 5.0) -> None:
        ok = await asyncio.to_thread(self._subscribed.wait, timeout_s)
        assert ok, "watcher did not subscribe"

    async def wait_for(
        self, pred: Callable[[str, dict[str, Any]], bool], timeout_s: float = 15.0
    ) -> tuple[str, dict[str, Any]]:

        def first_match() -> tuple[str, dict[str, Any]] | None:
            return next(((t, body) for t, body, _ in self.messages if pred(t, body)), None)

        found = await wait_for_condition(
            first_match,
            timeout_s,
            what="a watched message matching the predicate",
            until=lambda m: m is not None,
            wake=self._changed,
            context=lambda: f"{len(self.messages)} messages seen",
        )
        assert found is not None
        return found

    async def wait_last(
        self, pred: Callable[[str, dict[str, Any]], bool], timeout_s: float = 15.0
    ) -> dict[str, Any]:
        """Wait until the most recent message satisfies ``pred``."""

        def last() -> tuple[str, dict[str, Any]] | None:
            return self.messages[-1][:2] if self.messages else None

        found = await wait_for_condition(
            last,
            timeout_s,
            what="the last watched message to match the predicate",
            until=lambda m: m is not None and pred(*m),
            wake=self._changed,
        )
        assert found is not None
        return found[1]

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@contextlib.asynccontextmanager
async def running(rt: Runtime) -> AsyncIterator[Runtime]:
    task = asyncio.create_task(rt.run(), name="runtime-under-test")
    try:
        async with asyncio.timeout(10):
            await rt.started.wait()
            await rt.link.wait_up(10)
        yield rt
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def readings(device: str, first_seq: int, units: int, n: int, t0: float) -> list[tuple[str, bytes]]:
    return [
        (
            topic(device),
            orjson.dumps(
                {"device": device, "seq": first_seq + i, "ts": t0 + i * 0.1, "grams": grams(units)}
            ),
        )
        for i in range(n)
    ]


async def test_readings_become_stock_and_a_retained_alert(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    site = load_site(write_small_site(tmp_path, mqtt_port=mosquitto.port))
    watcher = PahoWatcher(mosquitto.port, "fh/t/alerts/#")
    await watcher.subscribed()
    try:
        async with running(Runtime(site)) as rt:
            t0 = rt.clock()
            await asyncio.to_thread(paho_publish, mosquitto.port, readings("s0", 0, 25, 6, t0))
            await asyncio.to_thread(paho_publish, mosquitto.port, readings("s0", 6, 5, 8, t0 + 1))
            _, alert = await watcher.wait_for(lambda t, b: t == "fh/t/alerts/K0" and b["active"])
            assert alert["state"] == "low"
            assert alert["level"] == 5
            assert alert["suggested_order_qty"] == 35
            assert alert["episode"].startswith("K0@")
            assert rt.ingest.states["sh0"].units == 5
            assert rt.alerts.raised == 1
    finally:
        watcher.close()
    # The alert is retained: a supervisor connecting later sees the active episode.
    late = PahoWatcher(mosquitto.port, "fh/t/alerts/K0")
    try:
        _, body = await late.wait_for(lambda t, b: True)
        assert body["active"] is True
        assert body["episode"] == alert["episode"]
    finally:
        late.close()


async def test_restart_with_an_active_alert_keeps_the_episode(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    site = load_site(write_small_site(tmp_path, mqtt_port=mosquitto.port))
    async with running(Runtime(site)) as rt:
        raised = rt.bus.subscribe("test", kinds=frozenset({"alert_raised"}))
        t0 = rt.clock()
        await asyncio.to_thread(paho_publish, mosquitto.port, readings("s1", 0, 4, 8, t0))
        event = await raised.get(timeout_s=10)
        assert isinstance(event, AlertNotice)
        assert event.transition.key == "K1"
        episode = rt.alerts.alerts["K1"].episode
        assert episode is not None
    async with running(Runtime(site)) as rt2:
        restored = rt2.alerts.alerts["K1"].episode
        assert restored is not None
        assert restored.episode_id == episode.episode_id
        assert rt2.alerts.raised == 0, "a restart must not raise the episode again"


async def test_simulated_scales_drive_an_alert(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    site_path = write_small_site(tmp_path, mqtt_port=mosquitto.port, reporting_interval_s=0.2)
    site = load_site(site_path)
    watcher = PahoWatcher(mosquitto.port, "fh/t/alerts/K2")
    await watcher.subscribed()
    sim = WarehouseScales(
        load_sim_site(site_path),
        f"mqtt://127.0.0.1:{mosquitto.port}",
        speed=1.0,
        seed=3,
        options=ScaleSimOptions(pick_rate_per_min=0.0, auto_restock=False),
    )
    try:
        async with running(Runtime(site)):
            await asyncio.to_thread(sim.start)
            sim.set_count("sh2", 30)
            await watcher.wait_for(lambda t, b: b["level"] == 30)
            sim.pick("sh2", 25)
            _, body = await watcher.wait_for(lambda t, b: b["active"])
            assert body["level"] == 5
            assert body["state"] == "low"
    finally:
        await asyncio.to_thread(sim.stop)
        watcher.close()


async def test_consumers_see_causal_order_and_a_raising_listener_stays_off_the_ack(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """On the real runtime: a consumer added after the alert service (where picking, metrics
    and the live hub sit) sees each ``stock_changed`` before the ``alert_raised`` it caused;
    a listener that raises is counted, and the MQTT link acks every batch on one connection
    (no "batch not acked", no reconnect, no redelivery). No dwell: the alert service raises
    the alert from its listener, on the commit that lowered the stock."""
    site = load_site(write_small_site(tmp_path, mqtt_port=mosquitto.port, dwell_s=0.0))
    async with running(Runtime(site)) as rt:
        seen: list[BusEvent] = []

        def broken(events: list[BusEvent]) -> None:
            raise RuntimeError("a listener's bug")

        rt.bus.add_listener(broken)
        rt.bus.add_listener(seen.extend)
        raised = rt.bus.subscribe("test", kinds=frozenset({"alert_raised"}))
        t0 = rt.clock()
        await asyncio.to_thread(paho_publish, mosquitto.port, readings("s0", 0, 25, 6, t0))
        await asyncio.to_thread(paho_publish, mosquitto.port, readings("s0", 6, 5, 8, t0 + 1))
        await raised.get(timeout_s=10)
        first_alert = next(i for i, e in enumerate(seen) if e.kind == "alert_raised")
        before = [e for e in seen[:first_alert] if isinstance(e, StockChanged)]
        assert before, [e.kind for e in seen]
        assert before[-1].new_units == 5, "the change that caused the alert comes first"
        assert rt.bus.listener_errors_by_name[broken.__qualname__] >= 2
        assert rt.link.stats.callback_errors == 0
        assert rt.link.stats.connects == 1
        assert rt.ingest.rejected.get("duplicate", 0) == 0
