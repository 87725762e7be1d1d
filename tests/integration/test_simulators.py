"""Scale simulators against real brokers: Debian's mosquitto and the demo's embedded amqtt.

Every payload a subscriber receives is decoded with ``devices.shelf_scale`` (the controller's
parser). Tests wait on received messages with timeouts, never on sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from devices.shelf_scale import (
    RawReading,
    Rejected,
    esphome_state_topic,
    esphome_status_topic,
    native_filter,
    native_topic,
    parse_esphome_state,
    parse_esphome_status,
    parse_native,
)
from simulators.broker import (
    BrokerProcess,
    BrokerStartError,
    MosquittoProcess,
    find_mosquitto,
    make_demo_broker,
    mosquitto_password_hash,
    mqtt_login_probe,
    resolve_broker_kind,
)
from simulators.shelf_scale import ScaleSimOptions, SimEvent, WarehouseScales
from simulators.site import Site, SiteError, load_site, parse_site

ROOT = Path(__file__).resolve().parents[2]
DEMO_SITE = ROOT / "firmware-configs" / "sites" / "demo.toml"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
WAIT_S = 15.0

needs_mosquitto = pytest.mark.skipif(
    not Path(MOSQUITTO).exists(), reason="mosquitto binary not installed"
)


# --------------------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Mosquitto:
    port: int
    proc: subprocess.Popen[str]
    log: list[str]

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


def start_mosquitto(
    conf_text: str, conf_dir: Path, port: int, ready_timeout_s: float = 10.0
) -> Mosquitto:
    """Start mosquitto in the foreground; ready when it logs 'running' (stderr is drained by a
    thread so the broker never blocks on a full pipe)."""
    conf = conf_dir / "mosquitto.conf"
    conf.write_text(conf_text)
    proc = subprocess.Popen(
        [MOSQUITTO, "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    log: list[str] = []
    ready = threading.Event()

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line.rstrip())
            if " running" in line:
                ready.set()
        ready.set()  # EOF: exited; the check below reports it

    threading.Thread(target=drain, name="mosquitto-stderr", daemon=True).start()
    if not ready.wait(ready_timeout_s) or proc.poll() is not None:
        stop_mosquitto(proc)
        raise RuntimeError("mosquitto did not start:\n" + "\n".join(log[-20:]))
    return Mosquitto(port, proc, log)


def stop_mosquitto(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()  # SIGTERM to our own child, by PID
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    port = free_port()
    conf = "\n".join(
        [
            f"listener {port} 127.0.0.1",
            "allow_anonymous true",
            "persistence false",
            "log_dest stderr",
            "max_queued_messages 100000",
            "max_inflight_messages 0",
            "",
        ]
    )
    broker = start_mosquitto(conf, tmp_path, port)
    yield broker
    stop_mosquitto(broker.proc)


@dataclass(frozen=True)
class Msg:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    t: float


class Subscriber:
    """A paho subscriber that records every message; ``wait_for`` blocks on a condition."""

    def __init__(
        self,
        port: int,
        topics: list[str],
        *,
        client_id: str = "",
        clean: bool = True,
        username: str | None = None,
        password: str | None = None,
        qos: int = 1,
    ) -> None:
        self.msgs: list[Msg] = []
        self._cond = threading.Condition()
        self.subscribed = threading.Event()
        self.refused: str | None = None
        self.connect_done = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=clean,
        )
        if username:
            self.client.username_pw_set(username, password)

        def on_connect(c: mqtt.Client, u: object, flags: object, rc: object, props: object) -> None:
            if getattr(rc, "is_failure", False):
                self.refused = str(rc)
                self.connect_done.set()
                return
            self.connect_done.set()
            c.subscribe([(t, qos) for t in topics])

        def on_subscribe(*_: object) -> None:
            self.subscribed.set()

        def on_message(c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
            with self._cond:
                self.msgs.append(Msg(m.topic, m.payload, m.qos, bool(m.retain), time.monotonic()))
                self._cond.notify_all()

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()

    def wait_subscribed(self, timeout: float = WAIT_S) -> None:
        assert self.connect_done.wait(timeout), "no CONNACK"
        assert self.refused is None, f"connection refused: {self.refused}"
        assert self.subscribed.wait(timeout), "no SUBACK"

    def wait_for(self, pred: Callable[[list[Msg]], bool], timeout: float = WAIT_S) -> list[Msg]:
        with self._cond:
            ok = self._cond.wait_for(lambda: pred(self.msgs), timeout)
            snapshot = list(self.msgs)
        assert ok, f"condition not met within {timeout} s ({len(snapshot)} messages received)"
        return snapshot

    def snapshot(self) -> list[Msg]:
        with self._cond:
            return list(self.msgs)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def site() -> Site:
    return load_site(DEMO_SITE)


def scale_topics(site: Site) -> list[str]:
    return [native_filter(site.topic_prefix, site.id), "+/sensor/+/state", "+/status"]


def native_readings(msgs: list[Msg], site: Site) -> list[tuple[Msg, RawReading]]:
    out = []
    prefix = f"{site.topic_prefix}/{site.id}/"
    for m in msgs:
        if not m.topic.startswith(prefix):
            continue
        parsed = parse_native(m.payload)
        assert not isinstance(parsed, Rejected), (m.topic, m.payload, parsed)
        for r in parsed:
            assert isinstance(r, RawReading), (m.topic, m.payload, r)
            out.append((m, r))
    return out


def tolerance_g(weight_g: float) -> float:
    """6 σ of the simulated noise plus rounding."""
    return 6 * (0.3 + 0.0002 * weight_g) + 0.1


def sim(
    site: Site,
    url: str,
    *,
    speed: float = 4.0,
    seed: int = 7,
    username: str | None = None,
    password: str | None = None,
    **options: Any,
) -> WarehouseScales:
    """A simulator without random picks unless asked (tests drive the stock themselves)."""
    opts = ScaleSimOptions(**{"pick_rate_per_min": 0.0, **options})
    return WarehouseScales(site, url, username, password, speed=speed, seed=seed, options=opts)


# --------------------------------------------------------------------------- site loader
def test_site_loader_reads_demo(site: Site) -> None:
    assert site.id == "demo"
    assert site.topic_prefix == "floorhand"
    c01 = site.scale("scale-c01")
    assert c01.format == "esphome"
    assert c01.esphome_node == "shelf-c01"
    assert c01.esphome_sensors == ("shelf_weight",)
    assert len(site.shelves) == 48
    assert len(site.shelves_on("scale-a01")) == 2


def test_site_loader_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(SiteError, match="No such file"):
        load_site(tmp_path / "missing.toml")
    data = {
        "site": {"id": "x"},
        "zones": [{"id": "A"}],
        "skus": [{"id": "S1", "reorder_point": 2, "max_stock": 10}],
        "scales": [{"id": "s1", "zone": "A"}],
        "shelves": [{"id": "sh1", "zone": "A", "scale": "s1", "sku": "S2", "capacity_units": 5}],
    }
    with pytest.raises(SiteError) as exc:
        parse_site(data, "t.toml")
    paths = {p for p, _ in exc.value.errors}
    assert paths == {"shelves[0].unit_weight_g", "shelves[0].sku"}


# --------------------------------------------------------------------------- mosquitto
@needs_mosquitto
def test_topics_and_payloads_decode(mosquitto: Mosquitto, site: Site) -> None:
    sub = Subscriber(mosquitto.port, scale_topics(site), qos=2)
    sub.wait_subscribed()
    ws = sim(site, mosquitto.url)
    ws.start()
    try:
        esphome = [s for s in site.scales if s.format == "esphome"]

        want_channels = {
            (s.scale, s.channel) for s in site.shelves if site.scale(s.scale).format == "native"
        }
        want_states = {
            esphome_state_topic(s.esphome_node or "", s.esphome_sensors[0]) for s in esphome
        }

        def all_reported(msgs: list[Msg]) -> bool:
            channels = {(r.device, r.channel) for _, r in native_readings(msgs, site)}
            return channels == want_channels and want_states <= {m.topic for m in msgs}

        msgs = sub.wait_for(all_reported)
    finally:
        ws.stop()

    seen_channels: set[tuple[str, int]] = set()
    last_seq: dict[str, int] = {}
    for m, r in native_readings(msgs, site):
        scale = site.scale(r.device)
        assert m.topic == native_topic(site.topic_prefix, site.id, scale.zone, r.device)
        assert m.qos == 1
        assert r.epoch == 0
        assert r.seq == last_seq.get(r.device, -1) + 1, "seq must grow by one per reading"
        last_seq[r.device] = r.seq
        assert abs(r.ts_s - time.time()) < 60
        shelf = next(s for s in site.shelves_on(r.device) if s.channel == r.channel)
        expected = ws.expected_weight_g(shelf.id)
        assert abs(r.weight_g - expected) <= tolerance_g(expected), (shelf.id, r.weight_g)
        assert r.weight_g == round(r.weight_g, 1)
        seen_channels.add((r.device, r.channel))
    assert seen_channels == want_channels

    for s in (s for s in site.scales if s.format == "esphome"):
        node = s.esphome_node or ""
        states = [m for m in msgs if m.topic == esphome_state_topic(node, s.esphome_sensors[0])]
        shelf = site.shelves_on(s.id)[0]
        for m in states:
            assert m.qos == 0
            assert re.fullmatch(rb"\d+\.\d", m.payload), m.payload
            value = parse_esphome_state(m.payload)
            assert isinstance(value, float)
            expected = ws.expected_weight_g(shelf.id)
            assert abs(value - expected) <= tolerance_g(expected)
        status = [m for m in msgs if m.topic == esphome_status_topic(node)]
        assert status
        assert parse_esphome_status(status[0].payload) is True
    sub.close()

    # A late subscriber gets the retained ESPHome state and status (ESPHome's retain default),
    # and the status is "offline" after the clean shutdown.
    late = Subscriber(mosquitto.port, ["shelf-c01/#"])
    late.wait_subscribed()
    got = late.wait_for(
        lambda ms: (
            {m.topic for m in ms} >= {"shelf-c01/status", "shelf-c01/sensor/shelf_weight/state"}
        )
    )
    assert all(m.retain for m in got)
    assert [m.payload for m in got if m.topic == "shelf-c01/status"] == [b"offline"]
    late.close()


@needs_mosquitto
def test_pick_changes_published_weight_with_settling(mosquitto: Mosquitto, site: Site) -> None:
    shelf = site.shelf("A-01-1")  # scale-a01 channel 0, 412 g units
    sub = Subscriber(mosquitto.port, [native_filter(site.topic_prefix, site.id)])
    sub.wait_subscribed()
    ws = sim(site, mosquitto.url, speed=1.0)
    ws.start()
    try:

        def ch0(msgs: list[Msg]) -> list[RawReading]:
            return [
                r
                for _, r in native_readings(msgs, site)
                if r.device == shelf.scale and r.channel == shelf.channel
            ]

        sub.wait_for(lambda ms: len(ch0(ms)) >= 1)
        before = ws.true_count(shelf.id)
        weight_before = ws.expected_weight_g(shelf.id)
        n_before = len(ch0(sub.snapshot()))
        assert ws.pick(shelf.id, 3) == 3
        assert ws.true_count(shelf.id) == before - 3
        expected = ws.expected_weight_g(shelf.id)
        assert expected == pytest.approx(weight_before - 3 * shelf.unit_weight_g)

        def settled(ms: list[Msg]) -> bool:
            after = ch0(ms)[n_before:]
            # settled = two consecutive readings at the new weight
            return any(
                abs(a.weight_g - expected) <= tolerance_g(expected)
                and abs(b.weight_g - expected) <= tolerance_g(expected)
                for a, b in itertools.pairwise(after)
            )

        msgs = sub.wait_for(settled)
        after = ch0(msgs)[n_before:]
        first_settled = next(
            i for i, r in enumerate(after) if abs(r.weight_g - expected) <= tolerance_g(expected)
        )
        # Several readings while the load settles (0.5–1 s at ~0.15 s), well before the next
        # regular 2 s report.
        assert len(after) >= 3
        assert after[-1].ts_s - after[0].ts_s < 2.5
        assert first_settled >= 1, "the first reading after a pick is still moving"

        # restock and set_count move the weight the same way
        ws.set_count(shelf.id, 0)
        empty = ws.expected_weight_g(shelf.id)
        assert empty == pytest.approx(shelf.tare_g)
        n_now = len(ch0(sub.snapshot()))
        sub.wait_for(
            lambda ms: any(abs(r.weight_g - empty) <= tolerance_g(empty) for r in ch0(ms)[n_now:])
        )
        assert ws.restock(shelf.id) == ws.true_count(shelf.id) > 0
    finally:
        ws.stop()
        sub.close()


@needs_mosquitto
def test_reboot_new_epoch_restarts_seq_and_batch_mode(mosquitto: Mosquitto, site: Site) -> None:
    sub = Subscriber(mosquitto.port, [native_topic(site.topic_prefix, site.id, "A", "scale-a01")])
    sub.wait_subscribed()
    ws = sim(site, mosquitto.url, speed=8.0, batch=True)
    ws.start()
    try:
        msgs = sub.wait_for(lambda ms: len(ms) >= 2)
        for m in msgs:
            parsed = parse_native(m.payload)
            assert isinstance(parsed, list)
            assert len(parsed) == 2, "one array per device"
            a, b = parsed
            assert isinstance(a, RawReading)
            assert isinstance(b, RawReading)
            assert (a.channel, b.channel) == (0, 1)
            assert b.seq == a.seq + 1
        ws.reboot("scale-a01")
        n = len(msgs)

        def rebooted(ms: list[Msg]) -> bool:
            return any(
                isinstance(p := parse_native(m.payload), list)
                and isinstance(p[0], RawReading)
                and p[0].epoch == 1
                for m in ms[n:]
            )

        msgs = sub.wait_for(rebooted)
        first_new = next(
            p
            for m in msgs[n:]
            if isinstance(p := parse_native(m.payload), list)
            and isinstance(p[0], RawReading)
            and p[0].epoch == 1
        )
        assert isinstance(first_new[0], RawReading)
        assert first_new[0].seq == 0
        assert ws.device_epoch_seq("scale-a01")[0] == 1
    finally:
        ws.stop()
        sub.close()


@needs_mosquitto
def test_malformed_mode_every_message_is_poison(mosquitto: Mosquitto, site: Site) -> None:
    sub = Subscriber(mosquitto.port, scale_topics(site))
    sub.wait_subscribed()
    ws = sim(site, mosquitto.url, speed=8.0, malformed_rate=1.0)
    ws.start()
    try:
        msgs = sub.wait_for(
            lambda ms: sum("/sensor/" in m.topic for m in ms) >= 20 and len(ms) >= 150
        )
    finally:
        ws.stop()
    devices = {s.id for s in site.scales}
    now = time.time()
    kinds: set[str] = set()
    for m in msgs:
        if m.topic.endswith("/status"):
            continue
        if "/sensor/" in m.topic:
            v = parse_esphome_state(m.payload)
            assert isinstance(v, Rejected) or v < 0 or v > 1e9, m.payload
            continue
        parsed = parse_native(m.payload)
        if isinstance(parsed, Rejected):
            kinds.add(parsed.reason)
            continue
        (r,) = parsed
        if isinstance(r, Rejected):
            kinds.add(r.reason)
            continue
        topic_device = m.topic.rsplit("/", 1)[1]
        bad = (
            r.weight_g < 0
            or r.weight_g > 1e9
            or r.device not in devices
            or r.device != topic_device
            or r.ts_s > now + 3600
        )
        assert bad, f"good reading in malformed mode: {m.payload!r}"
    assert {"bad_json", "wrong_type", "bad_schema"} <= kinds
    stats = ws.stats()
    # Every reading message was replaced (ESPHome births and offline are not counted there).
    assert sum(stats.poison.values()) == stats.messages
    sub.close()


@needs_mosquitto
def test_duplicates_and_reordered_resends(mosquitto: Mosquitto, site: Site) -> None:
    topic = native_topic(site.topic_prefix, site.id, "A", "scale-a02")
    sub = Subscriber(mosquitto.port, [topic])
    sub.wait_subscribed()
    ws = sim(site, mosquitto.url, speed=8.0, duplicate_rate=1.0)
    ws.start()
    try:
        msgs = sub.wait_for(lambda ms: len(ms) >= 8)
    finally:
        ws.stop()
    seqs = [r.seq for _, r in native_readings(msgs, site)]
    counts = {s: seqs.count(s) for s in set(seqs)}
    assert all(c == 2 for s, c in counts.items() if s < max(seqs)), counts
    sub.close()

    sub = Subscriber(mosquitto.port, [topic])
    sub.wait_subscribed()
    ws = sim(site, mosquitto.url, speed=8.0, reorder_rate=0.5, seed=3)
    ws.start()
    try:
        sub.wait_for(lambda ms: len(ms) >= 20)
    finally:
        ws.stop()  # flushes a held message
    _, next_seq = ws.device_epoch_seq("scale-a02")
    msgs = sub.wait_for(lambda ms: len(ms) >= next_seq)
    seqs = [r.seq for _, r in native_readings(msgs, site)]
    assert sorted(seqs) == list(range(next_seq)), "every reading arrives exactly once"
    assert seqs != sorted(seqs), "some arrive late"
    sub.close()


@needs_mosquitto
def test_dropout_silences_one_scale(mosquitto: Mosquitto, site: Site) -> None:
    topic_a01 = native_topic(site.topic_prefix, site.id, "A", "scale-a01")
    sub = Subscriber(mosquitto.port, [native_filter(site.topic_prefix, site.id)])
    sub.wait_subscribed()
    ws = sim(site, mosquitto.url, speed=4.0)  # 2 s interval → 0.5 s
    ws.start()
    try:
        sub.wait_for(lambda ms: any(m.topic == topic_a01 for m in ms))
        ws.dropout("scale-a01", 4.0)  # 1 s of wall time
        t0 = time.monotonic()
        _, next_seq = ws.device_epoch_seq("scale-a01")

        def a01_after(ms: list[Msg]) -> list[Msg]:
            return [
                m
                for m, r in native_readings(ms, site)
                if m.topic == topic_a01 and r.seq >= next_seq
            ]

        msgs = sub.wait_for(lambda ms: bool(a01_after(ms)))
        back = a01_after(msgs)[0]
        assert back.t - t0 >= 0.9
        # meanwhile the other scales kept reporting
        others = [m for m in msgs if m.topic != topic_a01 and t0 < m.t < back.t]
        assert len({m.topic for m in others}) >= 10
    finally:
        ws.stop()
        sub.close()


# --------------------------------------------------------------------------- amqtt
async def test_amqtt_broker_login_and_persistent_session_queue(tmp_path: Path, site: Site) -> None:
    port = free_port()
    async with BrokerProcess(port, "floorhand", "s3cret-pw", var_dir=tmp_path / "broker") as broker:
        pw_line = (tmp_path / "broker" / "passwd").read_text().splitlines()[-1]
        assert pw_line.startswith("floorhand:$argon2id$")
        assert "s3cret-pw" not in pw_line

        # Anonymous and wrong-password logins are refused.
        for user, pw in ((None, None), ("floorhand", "wrong")):
            anon = Subscriber(port, ["#"], username=user, password=pw)
            assert await asyncio.to_thread(anon.connect_done.wait, WAIT_S)
            assert anon.refused is not None
            anon.close()

        native = native_filter(site.topic_prefix, site.id)
        # A durable subscriber (clean session false, logged in) subscribes, then goes away.
        durable = Subscriber(
            port,
            [native],
            client_id="fh-test-ctl",
            clean=False,
            username="floorhand",
            password="s3cret-pw",
        )
        await asyncio.to_thread(durable.wait_subscribed)
        durable.close()

        live = Subscriber(port, [native], username="floorhand", password="s3cret-pw")
        await asyncio.to_thread(live.wait_subscribed)
        ws = sim(site, broker.url, speed=8.0, username="floorhand", password="s3cret-pw")
        await asyncio.to_thread(ws.start)
        try:
            await asyncio.to_thread(live.wait_for, lambda ms: len(ms) >= 60)
        finally:
            await asyncio.to_thread(ws.stop)
        published = sum(ws.device_epoch_seq(s.id)[1] for s in site.scales if s.format == "native")
        live_msgs = await asyncio.to_thread(live.wait_for, lambda ms: len(ms) >= published)
        live.close()
        assert len(live_msgs) == published

        # Back online: the broker delivers what was queued while it was away.
        durable = Subscriber(
            port,
            [native],
            client_id="fh-test-ctl",
            clean=False,
            username="floorhand",
            password="s3cret-pw",
        )
        queued = await asyncio.to_thread(durable.wait_for, lambda ms: len(ms) >= published)
        durable.close()
        keys = {(r.device, r.seq) for _, r in native_readings(queued, site)}
        assert keys == {(r.device, r.seq) for _, r in native_readings(live_msgs, site)}
        assert all(m.qos == 1 for m in queued)
    assert broker.proc is not None
    assert broker.proc.returncode is not None


# ------------------------------------------------------------- the demo's broker choice
class ManualAckSubscriber:
    """A paho MQTT 3.1.1 subscriber with a persistent session that acknowledges only when told
    (``ack``): what the controller does, acking after its journal commit."""

    def __init__(self, port: int, user: str, password: str, client_id: str, topic: str) -> None:
        self.msgs: list[mqtt.MQTTMessage] = []
        self._cond = threading.Condition()
        self.ready = threading.Event()
        self.refused: str | None = None
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=False,
        )
        self.client.username_pw_set(user, password)
        self.client.manual_ack_set(True)

        def on_connect(c: mqtt.Client, u: object, flags: Any, rc: Any, props: object) -> None:
            if rc.is_failure:
                self.refused = str(rc)
                self.ready.set()
            elif flags.session_present:
                self.ready.set()  # the broker kept the subscription
            else:
                c.subscribe(topic, qos=1)

        def on_message(c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
            with self._cond:
                self.msgs.append(m)
                self._cond.notify_all()

        self.client.on_connect = on_connect
        self.client.on_subscribe = lambda *_: self.ready.set()
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        assert self.ready.wait(WAIT_S), "no CONNACK/SUBACK"
        assert self.refused is None, self.refused

    def wait_payload(self, payload: bytes) -> list[mqtt.MQTTMessage]:
        """Everything received up to and including the first message with ``payload``."""
        with self._cond:
            ok = self._cond.wait_for(lambda: any(m.payload == payload for m in self.msgs), WAIT_S)
            got = list(self.msgs)
        assert ok, f"{payload!r} not received; got {[m.payload for m in got]}"
        return got[: [m.payload for m in got].index(payload) + 1]

    def ack(self, msgs: list[mqtt.MQTTMessage]) -> None:
        for m in msgs:
            self.client.ack(m.mid, m.qos)

    def close(self) -> None:
        """A clean DISCONNECT: the session, and what it has not acknowledged, stays at the broker.

        A SUBACK first: the broker reads one connection in order, so once it answered, it has
        the PUBACKs sent before (a reconnect could otherwise take the session over first)."""
        settled = threading.Event()
        self.client.on_subscribe = lambda *_: settled.set()
        self.client.subscribe("fh-test-sync", qos=0)
        assert settled.wait(WAIT_S), "no SUBACK"
        self.client.disconnect()
        self.client.loop_stop()


def publish_qos1(port: int, user: str, password: str, payloads: list[bytes]) -> None:
    """Publish on ``t/<n>`` at QoS 1 and return once the broker acknowledged all."""
    pub = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id="", protocol=MQTTProtocolVersion.MQTTv311
    )
    pub.username_pw_set(user, password)
    pub.connect("127.0.0.1", port, keepalive=10)
    pub.loop_start()
    try:
        infos = [pub.publish(f"t/{i}", p, qos=1) for i, p in enumerate(payloads)]
        for info in infos:
            info.wait_for_publish(WAIT_S)
            assert info.is_published()
    finally:
        pub.disconnect()
        pub.loop_stop()


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A folder every account can reach (pytest's tmp_path sits below a private 0700 folder):
    a demo mosquitto started as root switches to its own account and works there."""
    folder = Path(tempfile.mkdtemp(prefix="fh-demo-broker-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_demo_broker_choice() -> None:
    assert resolve_broker_kind("auto", "/usr/sbin/mosquitto") == "mosquitto"
    assert resolve_broker_kind("auto", None) == "amqtt"
    assert resolve_broker_kind("amqtt", "/usr/sbin/mosquitto") == "amqtt"
    assert resolve_broker_kind("mosquitto", "/usr/sbin/mosquitto") == "mosquitto"
    with pytest.raises(BrokerStartError, match="not installed"):
        resolve_broker_kind("mosquitto", None)
    with pytest.raises(BrokerStartError, match="unknown broker"):
        resolve_broker_kind("hivemq", "/usr/sbin/mosquitto")


def test_mosquitto_password_hash_matches_mosquitto_passwd_format() -> None:
    # The hash of "secret" with a known salt, as mosquitto_passwd 2.0.11 wrote it.
    salt = base64.b64decode("jz/aYB/qhWS7u40Y")
    assert mosquitto_password_hash("secret", salt=salt) == (
        "$7$101$jz/aYB/qhWS7u40Y$vGHlJ/CiZWMSZQbGUcJyKBlIEsA2cm2qYpPPJ2SkFC8ua6vcIdvf65jQRyCD"
        "k3eykBYsau0ejOFVzDvDzd+r5w=="
    )


@needs_mosquitto
async def test_demo_mosquitto_on_a_taken_port_fails_to_start(tmp_path: Path) -> None:
    """Something else listens on the port: the demo must not take it for its broker."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        broker = MosquittoProcess(port, var_dir=tmp_path / "broker", startup_timeout_s=10.0)
        with pytest.raises(BrokerStartError, match="mosquitto exited"):
            await broker.start()
        assert broker.proc is not None
        assert broker.proc.returncode is not None


@needs_mosquitto
async def test_demo_mosquitto_readiness_is_a_login(tmp_path: Path) -> None:
    """The start-up probe is an MQTT login: mosquitto answers 0 for the demo user, 5 (not
    authorized) for a wrong password; a port where nothing listens gives no answer."""
    async with MosquittoProcess(free_port(), "floorhand", "pw-1", var_dir=tmp_path / "b") as b:
        assert await mqtt_login_probe(b.port, "floorhand", "pw-1", timeout_s=5.0) == 0
        assert await mqtt_login_probe(b.port, "floorhand", "wrong", timeout_s=5.0) == 5
    assert await mqtt_login_probe(b.port, "floorhand", "pw-1", timeout_s=5.0) is None


@needs_mosquitto
async def test_demo_broker_keeps_unacked_qos1_across_reconnect_and_restart(
    reachable_dir: Path,
) -> None:
    """The demo's default broker redelivers exactly what a durable subscriber left
    unacknowledged: after the subscriber reconnects, and after a restart of the broker.
    (amqtt 0.12.1, the fallback, redelivers none of them: README.md, TRADE_OFFS.)"""
    kind = resolve_broker_kind("auto", find_mosquitto())
    assert kind == "mosquitto"
    user, pw = "floorhand", "demo-pw"
    broker = make_demo_broker(kind, free_port(), user, pw, reachable_dir / "broker")
    port = broker.port
    payloads = [f"m{i:02d}".encode() for i in range(20)]
    await broker.start()
    try:
        sub = await asyncio.to_thread(ManualAckSubscriber, port, user, pw, "fh-durable", "t/#")
        await asyncio.to_thread(publish_qos1, port, user, pw, payloads)
        got = await asyncio.to_thread(sub.wait_payload, payloads[-1])
        assert [m.payload for m in got] == payloads
        sub.ack(got[:5])
        await asyncio.to_thread(sub.close)

        # Reconnect: the 15 unacknowledged come again, in order, before anything new.
        again = await asyncio.to_thread(ManualAckSubscriber, port, user, pw, "fh-durable", "t/#")
        await asyncio.to_thread(publish_qos1, port, user, pw, [b"marker-1"])
        got = await asyncio.to_thread(again.wait_payload, b"marker-1")
        assert [m.payload for m in got] == [*payloads[5:], b"marker-1"]
        assert all(m.dup for m in got[:-1])
        again.ack([*got[:10], got[-1]])  # m15..m19 stay unacknowledged
        await asyncio.to_thread(again.close)

        # Broker restart (SIGTERM saves its persistence file): the last 5 survive it.
        await broker.stop()
        await broker.start()
        if os.geteuid() == 0:
            assert isinstance(broker, MosquittoProcess)
            assert broker.run_as == "mosquitto", "started as root it runs as its own account"
        third = await asyncio.to_thread(ManualAckSubscriber, port, user, pw, "fh-durable", "t/#")
        await asyncio.to_thread(publish_qos1, port, user, pw, [b"marker-2"])
        got = await asyncio.to_thread(third.wait_payload, b"marker-2")
        assert [m.payload for m in got] == [*payloads[15:], b"marker-2"]
        third.ack(got)
        await asyncio.to_thread(third.close)
    finally:
        await broker.stop()
    data = reachable_dir / "broker" / "data" / "floorhand.db"
    assert data.stat().st_size > 0
    if os.geteuid() == 0:
        assert data.stat().st_uid == pwd.getpwnam("mosquitto").pw_uid


# --------------------------------------------------------------------------- demo CLI
STUB_CONTROLLER = """
import json, os, signal, socket, sys
out = sys.argv[1]
env = {k: v for k, v in os.environ.items() if k.startswith("FLOORHAND_")}
host, _, port = env["FLOORHAND_API_BIND"].rpartition(":")
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, int(port)))
srv.listen()
def bye(*_):
    with open(out, "w") as f:
        json.dump({"env": env, "argv": sys.argv[2:], "sigterm": True}, f)
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
signal.pause()
"""


@pytest.mark.parametrize(
    ("choice", "kind"),
    [
        pytest.param(None, "mosquitto", id="default-mosquitto", marks=needs_mosquitto),
        pytest.param("amqtt", "amqtt", id="env-amqtt"),
    ],
)
def test_demo_cli_with_stub_controller(tmp_path: Path, choice: str | None, kind: str) -> None:
    """The demo runs on mosquitto when it is installed, on amqtt when FLOORHAND_DEMO_BROKER
    says so, prints which and what it promises, and stops everything it started."""
    stub = tmp_path / "stub_controller.py"
    stub.write_text(STUB_CONTROLLER)
    record = tmp_path / "controller.json"
    api_port, broker_port = free_port(), free_port()
    var_dir = tmp_path / "var"
    cmd = [
        sys.executable,
        "-m",
        "simulators",
        "demo",
        str(DEMO_SITE),
        "--api-bind",
        f"127.0.0.1:{api_port}",
        "--broker-port",
        str(broker_port),
        "--var-dir",
        str(var_dir),
        "--duration",
        "2",
        "--speed",
        "4",
        "--controller-cmd",
        f"{sys.executable} {stub} {record} run {DEMO_SITE}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "FLOORHAND_DEMO_BROKER"}
    if choice is not None:
        env["FLOORHAND_DEMO_BROKER"] = choice
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    if kind == "mosquitto":
        assert "broker: mosquitto (private, 127.0.0.1): redelivers unacknowledged" in out
        assert "(mosquitto, MQTT 5 and 3.1.1)" in out
    else:
        assert "broker: amqtt (as asked). WARNING: amqtt 0.12.1 drops the unacknowledged" in out
        assert "Install mosquitto" in out
    for path in ("/api/v1/stock", "/api/v1/alerts", "/api/v1/health", "/docs"):
        assert f"http://127.0.0.1:{api_port}{path}" in out
    assert f"mqtt://127.0.0.1:{broker_port}" in out
    assert "mosquitto_sub" in out
    assert "floorhand/demo/alerts/#" in out
    assert "controller stopped (exit code 0)" in out
    assert "broker stopped" in out

    seen = json.loads(record.read_text())
    assert seen["sigterm"] is True
    env = seen["env"]
    assert env["FLOORHAND_MQTT_URL"] == f"mqtt://127.0.0.1:{broker_port}"
    assert env["FLOORHAND_MQTT_PROTOCOL"] == ("5" if kind == "mosquitto" else "4")
    assert env["FLOORHAND_MQTT_USERNAME"] == "floorhand"
    assert env["FLOORHAND_MQTT_PASSWORD"]
    assert env["FLOORHAND_MQTT_PASSWORD"] in out  # printed for the mosquitto_sub line
    assert env["FLOORHAND_API_BIND"] == f"127.0.0.1:{api_port}"
    assert env["FLOORHAND_JOURNAL"] == str(var_dir / "journal.sqlite")
    for role in ("floor", "supervisor", "engineer"):  # one API token per role, printed
        got_role, _, token = env[f"FLOORHAND_TOKEN_DEMO_{role.upper()}"].partition(":")
        assert got_role == role
        assert len(token) >= 40
        assert token in out
    assert (var_dir / "demo.env").stat().st_mode & 0o077 == 0
    assert (var_dir / "broker" / "passwd").exists()
    # Everything it started is gone: nothing listens on the broker port any more.
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.1", broker_port), 2),
    ):
        pass


@needs_mosquitto
def test_demo_defaults_cross_reorder_points_within_a_minute(
    mosquitto: Mosquitto, site: Site
) -> None:
    """The default pick rate drains most SKUs to their reorder point within a simulated minute,
    and the automatic restock follows, so a demo shows alerts firing and resolving."""
    events: list[SimEvent] = []
    cond = threading.Condition()

    def on_event(ev: SimEvent) -> None:
        with cond:
            events.append(ev)
            cond.notify_all()

    speed = 20.0
    ws = WarehouseScales(site, mosquitto.url, speed=speed, seed=11, on_event=on_event)
    ws.start()
    t0 = ws.sim_time()
    try:

        def crossed() -> set[str]:
            return {
                e.sku or ""
                for e in events
                if e.kind == "reorder_point_reached" and e.t_sim - t0 <= 60.0
            }

        def restocked_after_crossing() -> bool:
            return any(e.kind == "restock" and e.sku in crossed() for e in events)

        with cond:
            ok = cond.wait_for(
                lambda: (
                    (len(crossed()) >= 0.8 * len(site.skus) and restocked_after_crossing())
                    or ws.sim_time() - t0 > 120
                ),
                timeout=60,
            )
            assert ok
            got = crossed()
            assert len(got) >= 0.8 * len(site.skus), f"only {sorted(got)} crossed in 60 s"
            assert restocked_after_crossing()
    finally:
        ws.stop()
    for e in events:
        if e.kind in ("pick", "restock"):
            assert e.count is not None
            assert 0 <= e.count <= site.shelf(e.shelf or "").capacity_units
