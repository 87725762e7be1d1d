"""The SHIPPED mosquitto configuration, started for real (security matrix row S1).

Only the ports (both listeners on 127.0.0.1) and file paths of
``firmware-configs/mosquitto/mosquitto.conf`` are rewritten; users come from
``mosquitto_passwd``, the ACL is ``acl.example`` unchanged, the TLS listener's CA and broker
certificate are made at test time with ``openssl``. The ESPHome node is played by paho with
exactly the topics, QoS, will and transport of ``firmware-configs/esphome/`` (read from the
YAML). Denied publishes
are proven dropped without sleeping: a client's messages reach a subscriber in order, so once
the subscriber has the allowed message sent *after* the denied ones, the denied ones are gone.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from controller.config import load_site
from controller.services.ingest import subscriptions
from devices.shelf_scale import (
    encode_native,
    encode_reading,
    esphome_state_topic,
    esphome_status_topic,
    native_topic,
    parse_native,
)
from tests.esphome_yaml import TLS_YAML, DeviceMessage, device_messages, load_config
from tests.tls import make_test_pki

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "firmware-configs" / "mosquitto"
DEMO_SITE = ROOT / "firmware-configs" / "sites" / "demo.toml"
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


def rewrite_config(conf: str, port: int, tls_port: int, root: Path) -> str:
    """Point the shipped config at ``root``, ``port`` and ``tls_port`` (on 127.0.0.1); every
    other line stays as shipped."""
    replacements = {
        r"listener 1883 127\.0\.0\.1": f"listener {port} 127.0.0.1",
        r"listener 8883": f"listener {tls_port} 127.0.0.1",
        r"password_file \S+": f"password_file {root / 'passwd'}",
        r"acl_file \S+": f"acl_file {root / 'acl'}",
        r"persistence_location \S+": f"persistence_location {root / 'data'}/",
        r"certfile \S+": f"certfile {root / 'tls' / 'server.crt'}",
        r"keyfile \S+": f"keyfile {root / 'tls' / 'server.key'}",
        r"cafile \S+": f"cafile {root / 'tls' / 'ca.crt'}",
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
    tls_port: int
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
    port, tls_port = free_port(), free_port()
    conf = rewrite_config((CONF_DIR / "mosquitto.conf").read_text(), port, tls_port, root)
    (root / "mosquitto.conf").write_text(conf)
    shutil.copy(CONF_DIR / "acl.example", root / "acl")
    (root / "data").mkdir()
    make_test_pki(root / "tls")  # ca.crt, server.crt/.key for 127.0.0.1, other-ca.crt
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
        (root / "tls").chmod(0o755)
        for f in (passwd, root / "acl", root / "tls" / "server.key"):
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
    broker = Broker(port, tls_port, root, proc, log)
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
        *,
        client_id: str | None = None,
        tls_ca: Path | None = None,
        will: DeviceMessage | None = None,
    ) -> None:
        self.msgs: list[mqtt.MQTTMessage] = []
        self.cond = threading.Condition()
        self.done = threading.Event()
        self.refused: str | None = None
        self.subscribed = threading.Event()
        topics = subscribe or []
        self.c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id if client_id is not None else user or "",
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        if tls_ca is not None:
            self.c.tls_set(ca_certs=str(tls_ca))  # verifies the chain and the name 127.0.0.1
        if will is not None:
            self.c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
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

    def publish(self, topic: str, payload: bytes, retain: bool = False, qos: int = 1) -> None:
        info = self.c.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(WAIT_S)  # PUBACK: mosquitto acks denied 3.1.1 publishes too
        assert info.is_published()

    def wait_topic(self, topic: str) -> list[mqtt.MQTTMessage]:
        with self.cond:
            ok = self.cond.wait_for(lambda: any(m.topic == topic for m in self.msgs), WAIT_S)
            got = list(self.msgs)
        assert ok, f"nothing on {topic} within {WAIT_S} s; got {[m.topic for m in got]}"
        return got

    def wait_until(self, pred: Callable[[list[mqtt.MQTTMessage]], bool]) -> list[mqtt.MQTTMessage]:
        with self.cond:
            ok = self.cond.wait_for(lambda: pred(self.msgs), WAIT_S)
            got = list(self.msgs)
        assert ok, f"condition not met within {WAIT_S} s; got {[m.topic for m in got]}"
        return got

    def drop(self) -> None:
        """Lose the connection without a DISCONNECT (a node off the network): the broker
        publishes the will."""
        self.c.loop_stop()
        sock = self.c.socket()
        assert sock is not None
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()

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


def listener_blocks(lines: list[str]) -> list[dict[str, str]]:
    """The settings after each ``listener`` line (per_listener_settings true)."""
    blocks: list[dict[str, str]] = []
    for ln in lines:
        key, _, value = ln.partition(" ")
        if key == "listener":
            blocks.append({})
        if blocks:
            blocks[-1][key] = value
    return blocks


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
    blocks = listener_blocks(lines)
    assert [b["listener"] for b in blocks] == ["1883 127.0.0.1", "8883"]
    for block in blocks:
        assert block["allow_anonymous"] == "false"
        assert "password_file" in block
        assert "acl_file" in block
        if "certfile" not in block:
            assert block["listener"].endswith(" 127.0.0.1"), "plaintext only on loopback"
    tls = blocks[1]
    assert {"certfile", "keyfile", "cafile"} <= set(tls)
    assert tls["tls_version"] == "tlsv1.2"
    # The plaintext device listener for an isolated network stays a commented template.
    text = (CONF_DIR / "mosquitto.conf").read_text()
    lan = re.findall(r"^#listener 1883 (\S+)$", text, re.M)
    assert lan
    assert lan != ["0.0.0.0"]


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


KINDS = ("birth", "will", "shutdown")


def test_esphome_node_over_tls_as_its_yaml_says(broker: Broker) -> None:
    """The node of firmware-configs/esphome/shelf-scale-tls.yaml, played by paho with the YAML's
    client id, topics, QoS, retain flags and will, over the TLS listener with the CA: the ACL
    lets broker user <node> send every one of its messages, and each reaches the controller
    (logged in as itself, subscribed as it subscribes for the demo site) at QoS 1."""
    node_cfg = load_config(TLS_YAML)
    mqtt_cfg = node_cfg["mqtt"]
    node = node_cfg["esphome"]["name"]
    assert mqtt_cfg["port"] == 8883  # rewritten to broker.tls_port, like the config's listener
    messages = device_messages(node_cfg)
    birth, will, shutdown = (next(m for m in messages if m.kind == k) for k in KINDS)
    controller_filters = [flt for flt, _ in subscriptions(load_site(DEMO_SITE))]
    ctl = Client(broker.port, "floorhand-controller", subscribe=controller_filters).ready()
    ca = broker.root / "tls" / "ca.crt"

    def connect_node() -> Client:
        """Connect as ESPHome does: login = node name (secrets.yaml mqtt_username; the ACL's
        %u), the will set, then the birth message."""
        client = Client(
            broker.tls_port, node, client_id=mqtt_cfg["client_id"], tls_ca=ca, will=will
        ).ready()
        client.publish(birth.topic, birth.payload or b"", retain=birth.retain, qos=birth.qos)
        return client

    def received(topic: str, payload: bytes) -> Callable[[list[mqtt.MQTTMessage]], bool]:
        return lambda msgs: any(m.topic == topic and m.payload == payload for m in msgs)

    c01 = connect_node()
    expected = [(birth.topic, birth.payload or b"")]
    for msg in messages:
        if msg.kind in KINDS:
            continue
        payload = msg.payload if msg.payload is not None else b"1834.5"
        c01.publish(msg.topic, payload, retain=msg.retain, qos=msg.qos)
        expected.append((msg.topic, payload))
    # Sent last on the same connection: once it is in, everything before it would be too.
    got = ctl.wait_until(received(*expected[-1]))
    assert [(m.topic, m.payload) for m in got] == expected
    assert all(m.qos == 1 for m in got)

    c01.drop()  # off the network: the broker sends the will
    got = ctl.wait_until(received(will.topic, will.payload or b""))
    assert (got[-1].topic, got[-1].payload, got[-1].qos) == (will.topic, will.payload, 1)

    c01 = connect_node()
    c01.publish(shutdown.topic, shutdown.payload or b"", retain=shutdown.retain, qos=shutdown.qos)
    count = len(got)
    got = ctl.wait_until(lambda msgs: len(msgs) > count + 1)  # the birth, then the shutdown
    assert [(m.topic, m.payload) for m in got[count:]] == [
        (will.topic, b"online"),
        (shutdown.topic, b"offline"),
    ]
    c01.close()
    ctl.close()


def test_tls_listener_refuses_a_client_that_trusts_another_ca(broker: Broker) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        Client(broker.tls_port, "shelf-c01", tls_ca=broker.root / "tls" / "other-ca.crt")
