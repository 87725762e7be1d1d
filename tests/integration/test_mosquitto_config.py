"""The SHIPPED mosquitto configuration, started for real (security matrix row S1).

Only the port and file paths of ``firmware-configs/mosquitto/mosquitto.conf`` are rewritten;
users come from ``mosquitto_passwd``, the ACL is ``acl.example`` unchanged. Denied publishes
are proven dropped without sleeping: a client's messages reach a subscriber in order, so once
the subscriber has the allowed message sent *after* the denied ones, the denied ones are gone.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from devices.shelf_scale import (
    encode_native,
    encode_reading,
    esphome_state_topic,
    esphome_status_topic,
    native_topic,
    parse_native,
)

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "firmware-configs" / "mosquitto"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")
WAIT_S = 10.0

pytestmark = pytest.mark.skipif(
    not Path(MOSQUITTO).exists() or MOSQUITTO_PASSWD is None,
    reason="mosquitto / mosquitto_passwd not installed",
)

USERS = {
    "floorhand-controller": "ctl-pw",
    "supervisor": "sup-pw",
    "scale-a01": "a01-pw",
    "scale-a02": "a02-pw",
    "shelf-c01": "c01-pw",
}


# ----------------------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def active_lines(conf: str) -> list[str]:
    return [
        ln.strip() for ln in conf.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]


def rewrite_config(conf: str, port: int, root: Path) -> str:
    """Point the shipped config at ``root`` and ``port``; every other line stays as shipped."""
    replacements = {
        r"listener 1883 127\.0\.0\.1": f"listener {port} 127.0.0.1",
        r"password_file \S+": f"password_file {root / 'passwd'}",
        r"acl_file \S+": f"acl_file {root / 'acl'}",
        r"persistence_location \S+": f"persistence_location {root / 'data'}/",
    }
    out = []
    hits = dict.fromkeys(replacements, 0)
    for line in conf.splitlines():
        for pattern, new in replacements.items():
            if re.fullmatch(pattern, line.strip()):
                line = new
                hits[pattern] += 1
        out.append(line)
    missing = [p for p, n in hits.items() if n == 0]
    assert not missing, f"shipped mosquitto.conf lacks active lines matching {missing}"
    return "\n".join(out) + "\n"


@dataclass
class Broker:
    port: int
    root: Path
    proc: subprocess.Popen[str]
    log: list[str]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # our own child, by PID
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_broker(root: Path) -> Broker:
    port = free_port()
    conf = rewrite_config((CONF_DIR / "mosquitto.conf").read_text(), port, root)
    (root / "mosquitto.conf").write_text(conf)
    shutil.copy(CONF_DIR / "acl.example", root / "acl")
    (root / "data").mkdir()
    passwd = root / "passwd"
    for i, (user, password) in enumerate(USERS.items()):
        args = [MOSQUITTO_PASSWD or "mosquitto_passwd", "-b"]
        args += ["-c"] if i == 0 else []
        subprocess.run([*args, str(passwd), user, password], check=True, capture_output=True)
    if os.geteuid() == 0:
        # As root, mosquitto drops to user "mosquitto" before opening these (README.md).
        mosq = pwd.getpwnam("mosquitto")
        root.chmod(0o755)
        os.chown(root / "data", mosq.pw_uid, mosq.pw_gid)
        for f in (passwd, root / "acl"):
            os.chown(f, 0, mosq.pw_gid)
            f.chmod(0o640)
    proc = subprocess.Popen(
        [MOSQUITTO, "-c", str(root / "mosquitto.conf")],
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
        ready.set()

    threading.Thread(target=drain, name="mosquitto-stderr", daemon=True).start()
    broker = Broker(port, root, proc, log)
    if not ready.wait(WAIT_S) or proc.poll() is not None:
        broker.stop()
        raise RuntimeError("mosquitto did not start:\n" + "\n".join(log[-20:]))
    return broker


@pytest.fixture
def broker() -> Iterator[Broker]:
    # Not pytest's tmp_path: its parent is 0700 root, which the dropped "mosquitto" user
    # cannot traverse.
    root = Path(tempfile.mkdtemp(prefix="fh-mosquitto-"))
    b = start_broker(root)
    yield b
    b.stop()
    shutil.rmtree(root, ignore_errors=True)


class Client:
    """A logged-in paho client recording what it receives."""

    def __init__(
        self,
        port: int,
        user: str | None,
        password: str | None = None,
        subscribe: list[str] | None = None,
    ) -> None:
        self.msgs: list[mqtt.MQTTMessage] = []
        self.cond = threading.Condition()
        self.done = threading.Event()
        self.refused: str | None = None
        self.subscribed = threading.Event()
        topics = subscribe or []
        self.c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=user or "",
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        if user is not None:
            self.c.username_pw_set(user, password if password is not None else USERS[user])

        def on_connect(c: mqtt.Client, u: object, f: object, rc: object, p: object) -> None:
            if getattr(rc, "is_failure", False):
                self.refused = str(rc)
                c.disconnect()  # no reconnect loop for a refused login
            elif topics:
                c.subscribe([(t, 1) for t in topics])
            else:
                self.subscribed.set()
            self.done.set()

        def on_subscribe(*_: object) -> None:
            self.subscribed.set()

        def on_message(c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
            with self.cond:
                self.msgs.append(m)
                self.cond.notify_all()

        self.c.on_connect = on_connect
        self.c.on_subscribe = on_subscribe
        self.c.on_message = on_message
        self.c.connect("127.0.0.1", port, keepalive=10)
        self.c.loop_start()
        assert self.done.wait(WAIT_S), "no CONNACK"

    def ready(self) -> Client:
        assert self.refused is None, self.refused
        assert self.subscribed.wait(WAIT_S), "no SUBACK"
        return self

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(WAIT_S)  # PUBACK: mosquitto acks denied 3.1.1 publishes too
        assert info.is_published()

    def wait_topic(self, topic: str) -> list[mqtt.MQTTMessage]:
        with self.cond:
            ok = self.cond.wait_for(lambda: any(m.topic == topic for m in self.msgs), WAIT_S)
            got = list(self.msgs)
        assert ok, f"nothing on {topic} within {WAIT_S} s; got {[m.topic for m in got]}"
        return got

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def reading(device: str, seq: int, grams: float = 1834.5) -> bytes:
    return encode_native([encode_reading(device, seq, time.time(), grams)])


CONTROLLER_TOPICS = [
    "floorhand/+/+/scale/+",
    "floorhand/+/alerts/#",
    "+/sensor/+/state",
    "+/status",
]


# ------------------------------------------------------------------------------- tests
def test_shipped_config_settings() -> None:
    lines = active_lines((CONF_DIR / "mosquitto.conf").read_text())
    settings = {ln.split()[0]: ln.split(None, 1)[1] if " " in ln else "" for ln in lines}
    assert settings["per_listener_settings"] == "true"
    assert "listener 1883 127.0.0.1" in lines
    assert all(ln != "allow_anonymous true" for ln in lines)
    assert settings["allow_anonymous"] == "false"
    assert settings["persistence"] == "true"
    assert settings["autosave_on_changes"] == "true"
    assert int(settings["max_queued_messages"]) >= 100_000
    assert int(settings["max_queued_bytes"]) > 0
    assert settings["max_inflight_messages"] == "0"
    assert int(settings["max_packet_size"]) >= 262_144
    assert settings["log_dest"] == "stderr"
    assert "persistent_client_expiration" in settings
    text = (CONF_DIR / "mosquitto.conf").read_text()
    assert re.search(r"^#listener 8883$", text, re.M), "commented TLS listener template"
    listeners = [ln for ln in lines if ln.startswith("listener")]
    assert all(ln.endswith("127.0.0.1") for ln in listeners), "plaintext only on loopback"


def test_anonymous_and_bad_password_are_refused(broker: Broker) -> None:
    anon = Client(broker.port, None)
    assert anon.refused is not None
    anon.close()
    bad = Client(broker.port, "scale-a01", "wrong")
    assert bad.refused is not None
    bad.close()
    ok = Client(broker.port, "scale-a01").ready()
    ok.close()


def test_scale_publishes_only_its_own_topic(broker: Broker) -> None:
    ctl = Client(broker.port, "floorhand-controller", subscribe=CONTROLLER_TOPICS).ready()
    a01 = Client(broker.port, "scale-a01").ready()
    own = native_topic("floorhand", "demo", "A", "scale-a01")
    # Denied: another scale's topic, the alerts, an ESPHome node's state and status.
    a01.publish(native_topic("floorhand", "demo", "A", "scale-a02"), reading("scale-a02", 0))
    a01.publish("floorhand/demo/alerts/SKU-0001", b'{"sku": "SKU-0001", "state": "resolved"}')
    a01.publish(esphome_state_topic("shelf-c01", "shelf_weight"), b"1.0")
    a01.publish(esphome_status_topic("shelf-c01"), b"offline")
    # Allowed, sent last: its arrival proves the four before it were dropped.
    a01.publish(own, reading("scale-a01", 0))
    got = ctl.wait_topic(own)
    assert [m.topic for m in got] == [own]
    parsed = parse_native(got[0].payload)
    assert isinstance(parsed, list)
    assert parsed[0].device == "scale-a01"  # type: ignore[union-attr]
    a01.close()
    ctl.close()


def test_esphome_node_and_supervisor_permissions(broker: Broker) -> None:
    ctl = Client(broker.port, "floorhand-controller", subscribe=CONTROLLER_TOPICS).ready()
    sup = Client(broker.port, "supervisor", subscribe=["floorhand/#", "+/status"]).ready()
    c01 = Client(broker.port, "shelf-c01").ready()
    c01.publish(esphome_state_topic("shelf-c02", "shelf_weight"), b"5.0")  # not its node
    c01.publish(native_topic("floorhand", "demo", "C", "scale-c01"), reading("scale-c01", 0))
    c01.publish(esphome_status_topic("shelf-c01"), b"online", retain=True)
    c01.publish(esphome_state_topic("shelf-c01", "shelf_weight"), b"1834.5", retain=True)
    got = ctl.wait_topic(esphome_state_topic("shelf-c01", "shelf_weight"))
    assert [m.topic for m in got] == ["shelf-c01/status", "shelf-c01/sensor/shelf_weight/state"]

    # The supervisor is read-only: its alert is dropped; the controller's reaches it.
    alert_topic = "floorhand/demo/alerts/SKU-0003"
    sup.publish(alert_topic, b'{"sku": "SKU-0003", "state": "resolved"}', retain=True)
    forged = native_topic("floorhand", "demo", "A", "scale-a01")
    sup.publish(forged, reading("scale-a01", 0))
    ctl.publish(alert_topic, b'{"sku": "SKU-0003", "state": "active"}', retain=True)
    got = sup.wait_topic(alert_topic)
    alerts = [m for m in got if m.topic == alert_topic]
    assert [m.payload for m in alerts] == [b'{"sku": "SKU-0003", "state": "active"}']
    assert not any(m.topic == forged for m in got)
    for c in (c01, sup, ctl):
        c.close()


def test_persistence_folder_is_writable_after_privilege_drop(broker: Broker) -> None:
    ctl = Client(broker.port, "floorhand-controller").ready()
    ctl.publish("floorhand/demo/alerts/SKU-0001", b'{"sku": "SKU-0001"}', retain=True)
    ctl.close()
    broker.stop()  # a clean stop saves the in-memory database
    assert (broker.root / "data" / "floorhand.db").stat().st_size > 0
    assert not any("rror" in line for line in broker.log), broker.log
