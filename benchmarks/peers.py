"""The peers Floorhand is compared with: what a typical engineer writes instead of Floorhand.

* ``naive``: a paho-mqtt callback that parses the reading and writes it with one
  influxdb-client call per message (``write_api(SYNCHRONOUS)``, a ``Point`` per reading). The
  QoS 1 PUBACK follows the write (paho acknowledges when the callback returns).
* ``batching``: the best practical peer: the same callback hands line protocol to
  influxdb-client's batching write API (``batch_size`` 5,000, default 1 s flush interval) and
  returns at once; paho acknowledges before the reading is written anywhere (no durability).
  When every message has arrived the write API is closed, which flushes the last partial batch
  (so the run does not end with a flush-interval tail).

Both parse the native Floorhand JSON payload (a reading or an array of readings, orjson), count
the readings the database accepted (the write call returned / the batch success callback ran)
and write to a real database with the InfluxDB v2 write API (victoria-metrics on 127.0.0.1, see
tests/influx_servers.py: InfluxDB 1.6.7 has no v2 API).

Each peer runs in its own process with paho's network thread (``loop_start``), an MQTT 3.1.1
persistent session (clean session off) subscribed at QoS 1 to ``fh/<site>/+/scale/+``:

    python benchmarks/peers.py setup --kind naive --port P --client-id C
    python benchmarks/peers.py drain --kind batching --port P --client-id C --count N \\
        --url http://127.0.0.1:8428 --measurement m

``setup`` creates the session and exits. ``drain`` imports and prepares everything, prints
``READY``, waits for ``GO`` on stdin, then connects and times until ``--count`` messages were
received and all their readings written (or nothing progressed for ``--stall-s``); it prints
``DONE {json}`` (received, applied, write errors, wall and CPU seconds of the whole process).
``benchmarks/suite.py`` (``benchmarks/run``) pre-loads the session with benchmarks/loadgen.py
and runs the peers next to Floorhand.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

import orjson
import paho.mqtt.client as mqtt

TOPIC_FILTER = "fh/t/+/scale/+"
BATCH_SIZE = 5_000


def _client(client_id: str) -> mqtt.Client:
    return mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=False,
        protocol=mqtt.MQTTv311,
    )


def setup(port: int, client_id: str) -> None:
    """Create the persistent session (subscribed at QoS 1) and disconnect."""
    client = _client(client_id)
    subscribed = threading.Event()
    client.on_connect = lambda c, *a: c.subscribe(TOPIC_FILTER, qos=1)
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    try:
        if not subscribed.wait(10):
            raise TimeoutError("peer: no SUBACK")
    finally:
        client.disconnect()
        client.loop_stop()


def _readings(payload: bytes) -> list[dict[str, Any]]:
    doc = orjson.loads(payload)
    return doc if isinstance(doc, list) else [doc]


class Peer:
    """Counts what arrived and what the database accepted; ``done`` once all are applied."""

    def __init__(self, kind: str, url: str, measurement: str, count: int) -> None:
        from influxdb_client import InfluxDBClient
        from influxdb_client.client.write_api import SYNCHRONOUS, WriteOptions

        self.kind = kind
        self.count = count
        self.measurement = measurement
        self.received = 0
        self.applied = 0
        self.errors = 0
        self.progress_at = time.monotonic()
        self.done = threading.Event()
        self.all_received = threading.Event()
        self.lock = threading.Lock()
        self.db = InfluxDBClient(url=url, token="bench", org="bench", timeout=30_000)
        if kind == "naive":
            self.write_api = self.db.write_api(write_options=SYNCHRONOUS)
        else:
            self.write_api = self.db.write_api(
                write_options=WriteOptions(batch_size=BATCH_SIZE, max_retries=0),
                success_callback=self._written,
                error_callback=self._failed,
            )

    # -- database callbacks (batching: the write API's thread) ----------------------------
    def _written(self, conf: Any, data: bytes | str) -> None:
        n = data.count(b"\n" if isinstance(data, bytes) else "\n") + 1 if data else 0
        with self.lock:
            self.applied += n
            self.progress_at = time.monotonic()
        self._check()

    def _failed(self, conf: Any, data: bytes | str, exc: BaseException) -> None:
        with self.lock:
            self.errors += data.count(b"\n" if isinstance(data, bytes) else "\n") + 1
        print(f"peer write error: {exc}", file=sys.stderr, flush=True)

    def _check(self) -> None:
        if self.received >= self.count and self.applied >= self.received:
            self.done.set()

    # -- paho's network thread ---------------------------------------------------------------
    def on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        readings = _readings(msg.payload)
        if self.kind == "naive":
            from influxdb_client import Point, WritePrecision

            points = [
                Point(self.measurement)
                .tag("device", r["device"])
                .field("grams", float(r["grams"]))
                .field("seq", int(r["seq"]))
                .time(int(r["ts"] * 1000), WritePrecision.MS)
                for r in readings
            ]
            try:
                self.write_api.write(bucket="bench", record=points)
                self.applied += len(points)
            except Exception as exc:
                self.errors += len(points)
                print(f"peer write error: {exc}", file=sys.stderr, flush=True)
            self.received += 1
            self.progress_at = time.monotonic()
            self._check()
            return
        m = self.measurement
        lines = [
            f"{m},device={r['device']} grams={float(r['grams'])},seq={int(r['seq'])}i "
            f"{int(r['ts'] * 1000)}"
            for r in readings
        ]
        self.write_api.write(bucket="bench", record=lines, write_precision="ms")
        self.received += 1
        self.progress_at = time.monotonic()
        if self.received >= self.count:
            self.all_received.set()

    def close_writes(self) -> None:
        """Batching: flush the last partial batch (close waits for the pending writes)."""
        if self.kind != "naive":
            self.write_api.close()
            with self.lock:
                self._check()


def drain(args: argparse.Namespace) -> None:
    peer = Peer(args.kind, args.url, args.measurement, args.count)
    client = _client(args.client_id)
    client.on_connect = lambda c, *a: c.subscribe(TOPIC_FILTER, qos=1)
    client.on_message = peer.on_message
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "GO":
        return
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    peer.progress_at = time.monotonic()
    client.connect("127.0.0.1", args.port, keepalive=60)
    client.loop_start()
    complete = True
    try:
        if peer.kind != "naive":
            while not peer.all_received.wait(0.2):
                if time.monotonic() - peer.progress_at > args.stall_s:
                    complete = False
                    break
            peer.close_writes()
        while not peer.done.wait(0.2):
            if time.monotonic() - peer.progress_at > args.stall_s:
                complete = False
                break
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    finally:
        client.disconnect()
        client.loop_stop()
    peer.db.close()
    result = {
        "kind": peer.kind,
        "count": args.count,
        "received": peer.received,
        "applied": peer.applied,
        "write_errors": peer.errors,
        "complete": complete,
        "wall_s": wall,
        "cpu_s": cpu,
    }
    print("DONE " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("mode", choices=("setup", "drain"))
    parser.add_argument("--kind", choices=("naive", "batching"), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--count", type=int, default=0, help="messages to drain")
    parser.add_argument("--url", default="", help="victoria-metrics base URL")
    parser.add_argument("--measurement", default="peer")
    parser.add_argument("--stall-s", type=float, default=20.0, help="give up after no progress")
    args = parser.parse_args()
    if args.mode == "setup":
        setup(args.port, args.client_id)
    else:
        drain(args)


if __name__ == "__main__":
    main()
