"""fault case M7 on real mosquitto: a plain paho publisher (QoS 1, persistent session, paho's
own queue and resend), a broker restart and controller kill -9s in the middle. After a broker
restart paho sends new readings ahead of its unacknowledged backlog; every reading the broker
acknowledged to the publisher must end up in history exactly once, and the gap counters must
come back to 0 missing."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import orjson
import paho.mqtt.client as paho
import pytest

from tests.controller_proc import ControllerProcess
from tests.mosquitto import MosquittoBroker
from tests.sites import grams, topic, write_small_site
from tests.waiting import wait_for_condition

pytestmark = pytest.mark.slow

DEVICES = ["s0", "s1", "s2", "s3"]


class PlainPahoPublisher:
    """paho as a device fleet uses it: publish every reading at QoS 1, connected or not, and
    leave queueing and resending to paho; like most firmware, also publish the current reading
    as soon as the connection is (re)established. That reading goes out ahead of the backlog paho
    resends after a reconnect (paho 2.2 sends a publish() made in on_connect first), which is
    how readings arrive late. `wait_all_acked` returns the (device, seq) whose PUBACK came."""

    def __init__(self, port: int, *, total: int, rate: float) -> None:
        assert total < 65_535, "packet ids must not wrap: acks are mapped back by id"
        self.total = total
        """At most this many readings (`stop` ends the run sooner)."""
        self.count = 0
        """Readings the generator published (plus ``on_connect_readings``)."""
        self._stop = threading.Event()
        self.rate = rate
        self._sent: dict[int, tuple[str, int]] = {}
        self._acked_mids: set[int] = set()
        self._all_acked = threading.Event()
        self._lock = threading.Lock()
        self._seq = dict.fromkeys(DEVICES, 0)
        self._n = 0
        self.on_connect_readings = 0
        self.published = threading.Event()
        self._client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id="plain-paho",
            protocol=paho.MQTTv311,
            clean_session=False,
        )
        self._client.max_queued_messages_set(0)  # unbounded: nothing refused while offline
        self._client.reconnect_delay_set(0.1, 1.0)
        self._client.on_publish = self._on_publish
        self._connected = threading.Event()
        self._client.on_connect = self._on_connect
        self._client.connect("127.0.0.1", port, keepalive=5)
        self._client.loop_start()
        self._thread = threading.Thread(target=self._run, name="plain-paho", daemon=True)

    def _on_connect(self, *_: object) -> None:
        if self._connected.is_set():  # a reconnect
            self.on_connect_readings += 1
            self._publish_next()
        self._connected.set()

    def _publish_next(self) -> None:
        with self._lock:
            device = DEVICES[self._n % len(DEVICES)]
            self._n += 1
            seq = self._seq[device]
            self._seq[device] = seq + 1
        payload = orjson.dumps(
            {"device": device, "seq": seq, "ts": time.time(), "grams": grams(20 + seq % 3)}
        )
        # Never hold our lock across publish(): paho calls on_publish under its own lock.
        info = self._client.publish(topic(device), payload, qos=1)
        with self._lock:  # its ack may already be in: completion compares the two sets
            self._sent[info.mid] = (device, seq)

    def _on_publish(self, _c: object, _u: object, mid: int, *_: object) -> None:
        with self._lock:
            self._acked_mids.add(mid)
            self._check_done()

    def _check_done(self) -> None:
        if self.published.is_set() and self._sent.keys() <= self._acked_mids:
            self._all_acked.set()

    def start(self) -> None:
        if not self._connected.wait(10):
            raise TimeoutError("paho did not connect")
        self._thread.start()

    def stop(self) -> None:
        """End the run (it publishes until then, so every fault of the test happens while
        readings flow, however long the controller takes to start on a loaded machine)."""
        self._stop.set()

    def _run(self) -> None:
        t0 = time.monotonic()
        for n in range(self.total):
            if self._stop.is_set():
                break
            delay = t0 + n / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing the generator, not waiting for state
            self._publish_next()
            self.count += 1
        with self._lock:
            self.published.set()
            self._check_done()

    def wait_all_acked(self, timeout_s: float) -> set[tuple[str, int]]:
        self._thread.join()
        self._all_acked.wait(timeout_s)
        self._client.disconnect()
        self._client.loop_stop()
        with self._lock:
            missing = len(self._sent.keys() - self._acked_mids)
            acked = {self._sent[m] for m in self._acked_mids if m in self._sent}
        if missing:
            raise TimeoutError(f"{missing} publishes never acknowledged by the broker")
        return acked


async def wait_until(ctl: ControllerProcess, want: dict[str, int], timeout_s: float) -> None:
    """Until every device's accepted count reached ``want`` and the outbox is drained."""

    async def progress() -> tuple[dict[str, int], int]:
        devices = {d["id"]: d for d in await ctl.get("/api/v1/devices")}
        health = await ctl.get("/api/v1/health")
        return {k: devices[k]["applied"] for k in want}, health["ingest"]["outbox_rows"]

    await wait_for_condition(
        progress,
        timeout_s,
        what=f"(applied, outbox rows) = ({want}, 0)",
        until=lambda got: got == (want, 0),
        interval_s=0.1,
        context=ctl.tail,
    )


def stored_weights(path: Path) -> list[tuple[str, int, int]]:
    """(device, seq, ts_ms) of every weight point in the embedded history store."""
    db = sqlite3.connect(path)
    try:
        rows = db.execute(
            "SELECT s.tags, w.seq, w.ts_ms FROM weight w JOIN series s ON s.id = w.series"
        )
        return [(dict(orjson.loads(tags))["device"], seq, ts) for tags, seq, ts in rows]
    finally:
        db.close()


def gap_points(path: Path) -> list[int]:
    """``missing`` of every seq_gap point in the embedded history store."""
    db = sqlite3.connect(path)
    try:
        rows = db.execute(
            "SELECT p.fields FROM points p JOIN series s ON s.id = p.series "
            "WHERE s.measurement = 'seq_gap'"
        )
        return [int(orjson.loads(fields)["missing"]) for (fields,) in rows]
    finally:
        db.close()


async def test_plain_paho_backlog_after_broker_restart_is_stored_exactly_once(
    mosquitto: MosquittoBroker, tmp_path: Path, controllers: list[ControllerProcess]
) -> None:
    site = write_small_site(
        tmp_path, mqtt_port=mosquitto.port, client_id="fh-late", history_backend="sqlite"
    )
    ctl = ControllerProcess(site, tmp_path)
    controllers.append(ctl)
    await ctl.start()
    pub = PlainPahoPublisher(mosquitto.port, total=60_000, rate=1_000.0)
    pub.start()
    await asyncio.sleep(2.0)  # a point in the load, not a wait for state
    await ctl.kill()
    await ctl.start()
    await asyncio.sleep(1.0)  # a point in the load
    await mosquitto.stop()  # SIGTERM: mosquitto saves both sessions
    await asyncio.sleep(1.0)  # the broker stays down while paho keeps publishing
    await mosquitto.start()
    await asyncio.sleep(2.0)  # a point in the load
    await ctl.kill()
    await ctl.start()
    pub.stop()
    acked = await asyncio.to_thread(pub.wait_all_acked, 60.0)
    want = {d: sum(1 for dd, _ in acked if dd == d) for d in DEVICES}
    await wait_until(ctl, want, timeout_s=60.0)
    devices = await ctl.get("/api/v1/devices")
    health = await ctl.get("/api/v1/health")
    assert await ctl.stop() == 0

    stored = stored_weights(tmp_path / "history.sqlite")
    identities = [(d, s) for d, s, _ in stored]
    assert len(identities) == len(set(identities)), "a reading stored twice"
    lost = acked - set(identities)
    assert not lost, f"{len(lost)} acknowledged readings not in history, e.g. {sorted(lost)[:5]}"
    assert len(stored) == len(acked) == pub.count + pub.on_connect_readings
    assert {d["id"]: d["missing_readings"] for d in devices} == dict.fromkeys(DEVICES, 0)
    assert health["ingest"]["rejected"].get("out_of_order", 0) == 0
    journal = sqlite3.connect(tmp_path / "journal.sqlite")
    letters = journal.execute("SELECT reason, count(*) FROM dead_letters").fetchall()
    journal.close()
    assert letters == [(None, 0)], "nothing dead-lettered (no out_of_order)"
    missing = gap_points(tmp_path / "history.sqlite")
    # In history a gap adds its missing readings and the late readings that fill it subtract.
    assert sum(missing) == 0
    gaps = sum(d["gaps"] for d in devices)
    assert gaps == sum(1 for m in missing if m > 0)
    late = -sum(m for m in missing if m < 0)
    assert late > 0, "the broker restart should have made paho send readings ahead of its backlog"
    print(
        f"gaps seen {gaps}, late readings that filled them {late}, starts {ctl.starts}, "
        f"late readings in the last run {health['ingest']['late_readings']}"
    )
