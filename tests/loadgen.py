"""A paced QoS 1 reading publisher (paho, independent of our client) that records which
(device, seq) the broker acknowledged, for loss/duplicate accounting under faults."""

from __future__ import annotations

import threading
import time

import orjson
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.sites import grams, topic
from tests.waiting import wait_for_condition_sync

MAX_MESSAGES = 60_000
"""The generator stops by itself here: paho's packet ids wrap at 65,535 and the accounting maps
acknowledgements back to readings by packet id."""


class AckedPublisher:
    """Publishes ``rate`` readings/s round-robin over ``devices`` until stopped.

    Uses a persistent session and an unbounded paho queue, so messages published while the
    broker is down are sent after paho reconnects. After `stop`, ``acked`` holds the
    (device, seq) pairs whose PUBACK arrived."""

    def __init__(
        self,
        port: int,
        devices: list[str],
        *,
        rate: float = 2000.0,
        units: int = 30,
        client_id: str = "loadgen",
    ) -> None:
        self.devices = devices
        self.rate = rate
        self.units = units
        self._sent: list[tuple[int, str, int]] = []  # (mid, device, seq) in publish order
        self._acked_mids: set[int] = set()
        self.acked: set[tuple[str, int]] = set()
        self.published = 0
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loadgen", daemon=True)
        self._client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
        )
        self._client.max_inflight_messages_set(1000)
        self._client.max_queued_messages_set(0)
        self._client.reconnect_delay_set(0.1, 1.0)
        self._client.on_connect = lambda *a: self._connected.set()
        self._client.on_disconnect = lambda *a: self._connected.clear()
        # set.add from paho's thread is atomic under the GIL; no lock shared with publish().
        self._client.on_publish = lambda c, u, mid, *a: self._acked_mids.add(mid)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self._client.connect("127.0.0.1", port, keepalive=5, clean_start=False, properties=props)
        self._client.loop_start()

    def start(self) -> None:
        if not self._connected.wait(10):
            raise TimeoutError("load generator did not connect")
        self._thread.start()

    def _run(self) -> None:
        seq = dict.fromkeys(self.devices, 0)
        t0 = time.monotonic()
        n = 0
        while not self._stop.is_set() and n < MAX_MESSAGES:
            due = t0 + n / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)  # pacing the generator, not waiting for state
                continue
            if not self._connected.is_set():
                self._connected.wait(0.1)  # publish only while connected (paho queues anyway)
                continue
            device = self.devices[n % len(self.devices)]
            s = seq[device]
            seq[device] = s + 1
            payload = orjson.dumps(
                {"device": device, "seq": s, "ts": time.time(), "grams": grams(self.units)}
            )
            info = self._client.publish(topic(device), payload, qos=1)
            self._sent.append((info.mid, device, s))
            n += 1
        self.published = n

    def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Stop publishing and wait until every published message is acknowledged."""
        self._stop.set()
        self._thread.join()
        if len(self._sent) >= 65_535:
            raise ValueError("packet ids wrapped: lower rate × duration for exact accounting")
        want = {mid for mid, _, _ in self._sent}
        try:
            wait_for_condition_sync(  # paho has no "all acknowledged" event: polled
                lambda: len(want - self._acked_mids),
                drain_timeout_s,
                what="every publish acknowledged by the broker (last observed: how many not)",
                until=lambda missing: missing == 0,
                interval_s=0.05,
            )
        finally:
            self.acked = {(d, s) for mid, d, s in self._sent if mid in self._acked_mids}
            self._client.disconnect()
            self._client.loop_stop()

    def max_seq(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for device, seq in self.acked:
            out[device] = max(out.get(device, -1), seq)
        return out
