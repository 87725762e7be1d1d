"""A fast raw MQTT 3.1.1 load generator: pre-encoded PUBLISH packets written in big chunks.

paho-mqtt tops out near 25–30k msg/s QoS 1 on this machine (measured), below what the
controller is meant to ingest, so benchmarks publish with this instead. Every packet is encoded
before the clock starts and stored in one contiguous buffer; sending is ``sendall`` of a slice.
QoS 1 PUBACKs are counted by a reader thread (a v3.1.1 PUBACK is exactly 4 bytes and the broker
sends nothing else on this connection), which also bounds the publisher's own in-flight window
so packet ids (1..65535, assigned in order) are never reused while still unacknowledged.

Readings are native Floorhand payloads (docs/payloads.md) on ``fh/<site>/<zone>/scale/<device>``,
round-robin over the devices, each device with its own increasing ``seq``; ``--batch`` > 1 sends
JSON arrays of that many readings (consecutive seqs of one device).

Used in-process (`publish_all`, to pre-load a backlog) and as a child process (paced live
load): the child prints ``READY`` once connected and encoded, starts on a ``GO`` line on stdin,
stops early on ``STOP``, prints ``SENT {json}`` after its last write and ``DONE {json}`` once the
broker acknowledged everything.

    python benchmarks/loadgen.py --port 1883 --rate 20000 --duration 10 --devices 100
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from devices.link.mqtt_codec import encode_varint

TARE_G = 500.0  # tests/sites.py: tare 500 g, 100 g per unit, capacity 40
UNIT_G = 100.0
MAX_PACKET_ID = 65_535
TICK_S = 0.002  # pacing granularity of a live run
ACK_READ_PAUSE_S = 0.002


def device_names(count: int, first: int = 0) -> list[str]:
    """``s<first>`` … ``s<first+count-1>``: the scale ids of tests/sites.write_small_site."""
    return [f"s{i}" for i in range(first, first + count)]


def steady_grams(seq: int, step_every: int) -> float:
    """A shelf that loses one unit every ``step_every`` readings (39 → 15, then again), with
    ±1 g of noise: mostly settled readings, and a pick (two shelf events) now and then."""
    units = 39 - (seq // step_every) % 25 if step_every else 30
    return TARE_G + units * UNIT_G + ((seq * 7) % 5 - 2) * 0.5


@dataclass
class Encoded:
    """Packets laid end to end in ``buf``; packet ``i`` is ``buf[offsets[i]:offsets[i + 1]]``."""

    buf: bytes
    offsets: list[int]
    readings: int
    last_seq: dict[str, int]

    @property
    def count(self) -> int:
        return len(self.offsets) - 1


def encode_readings(
    devices: Sequence[str],
    count: int,
    *,
    qos: int = 1,
    batch: int = 1,
    site: str = "t",
    zone: str = "Z",
    first_seq: dict[str, int] | None = None,
    ts0: float | None = None,
    rate: float = 40_000.0,
    step_every: int = 500,
    first_packet_id: int = 1,
) -> Encoded:
    """``count`` PUBLISH packets round-robin over ``devices``.

    Reading ``i`` (over all devices) is stamped ``ts0 + i / rate`` (its planned send time for
    a paced run); ``seq`` continues from ``first_seq[device]`` (default 0).
    """
    ts0 = time.time() if ts0 is None else ts0
    seqs = {d: (first_seq or {}).get(d, 0) for d in devices}
    topics = [f"fh/{site}/{zone}/scale/{d}".encode() for d in devices]
    heads = [len(t).to_bytes(2, "big") + t for t in topics]
    n_dev = len(devices)
    parts: list[bytes] = []
    offsets = [0]
    pos = 0
    first = 0x30 | (qos << 1)
    packet_id = first_packet_id
    per_reading_s = 1.0 / (rate * batch)
    reading_index = 0
    for i in range(count):
        k = i % n_dev
        device = devices[k]
        seq = seqs[device]
        if batch == 1:
            payload = b'{"device":"%s","seq":%d,"ts":%.4f,"grams":%.1f}' % (
                device.encode(),
                seq,
                ts0 + reading_index * per_reading_s,
                steady_grams(seq, step_every),
            )
        else:
            items = [
                b'{"device":"%s","seq":%d,"ts":%.4f,"grams":%.1f}'
                % (
                    device.encode(),
                    seq + j,
                    ts0 + (reading_index + j) * per_reading_s,
                    steady_grams(seq + j, step_every),
                )
                for j in range(batch)
            ]
            payload = b"[" + b",".join(items) + b"]"
        seqs[device] = seq + batch
        reading_index += batch
        head = heads[k]
        if qos:
            body_len = len(head) + 2 + len(payload)
            packet = b"".join(
                (
                    bytes((first,)),
                    encode_varint(body_len),
                    head,
                    packet_id.to_bytes(2, "big"),
                    payload,
                )
            )
            packet_id = packet_id % MAX_PACKET_ID + 1
        else:
            packet = b"".join(
                (bytes((first,)), encode_varint(len(head) + len(payload)), head, payload)
            )
        parts.append(packet)
        pos += len(packet)
        offsets.append(pos)
    return Encoded(b"".join(parts), offsets, count * batch, {d: s - 1 for d, s in seqs.items()})


def _connect_packet(client_id: str, keepalive_s: int = 60) -> bytes:
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02" + keepalive_s.to_bytes(2, "big")
    body += len(cid).to_bytes(2, "big") + cid
    return b"\x10" + encode_varint(len(body)) + body


class RawPublisher:
    """One blocking MQTT 3.1.1 clean-session connection that only publishes."""

    def __init__(self, port: int, client_id: str, *, window: int = 30_000) -> None:
        if not 0 < window < MAX_PACKET_ID:
            raise ValueError("window must stay below the packet id space")
        self.window = window
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(_connect_packet(client_id))
        connack = self._recv_exactly(4)
        if connack[:2] != b"\x20\x02" or connack[3] != 0:
            raise RuntimeError(f"broker refused the load generator: {connack!r}")
        self._ack_bytes = 0
        self._acked = threading.Condition()
        self._closed = False
        self._reader = threading.Thread(target=self._read_acks, name="loadgen-acks", daemon=True)
        self._reader.start()

    def _recv_exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise RuntimeError("broker closed the load generator connection")
            data += chunk
        return data

    def _read_acks(self) -> None:
        while True:
            try:
                chunk = self.sock.recv(1 << 16)
            except OSError:
                chunk = b""
            if 0 < len(chunk) < 4096:
                # Let acks accumulate: fewer, larger reads keep the generator's CPU low.
                time.sleep(ACK_READ_PAUSE_S)
            with self._acked:
                if not chunk:
                    self._closed = True
                else:
                    self._ack_bytes += len(chunk)
                self._acked.notify_all()
            if not chunk:
                return

    @property
    def acked(self) -> int:
        return self._ack_bytes // 4

    def wait_acked(self, count: int, timeout_s: float) -> bool:
        """Wait until ``count`` PUBACKs arrived in total."""
        deadline = time.monotonic() + timeout_s
        with self._acked:
            while self._ack_bytes // 4 < count:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return False
                self._acked.wait(left)
        return True

    def sync(self, timeout_s: float = 60.0) -> None:
        """QoS 0 has no acks: a PINGREQ round trip (the broker handles packets in order) proves
        it processed everything sent before. Only for a connection that sent no QoS 1."""
        with self._acked:
            before = self._ack_bytes
        self.sock.sendall(b"\xc0\x00")
        deadline = time.monotonic() + timeout_s
        with self._acked:
            while self._ack_bytes < before + 2:  # PINGRESP: 2 bytes
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise RuntimeError("no PINGRESP from the broker")
                self._acked.wait(left)

    def send(self, enc: Encoded, start: int, stop: int, qos: int) -> None:
        """Send packets ``start:stop``, holding back while the in-flight window is full."""
        view = memoryview(enc.buf)
        offsets = enc.offsets
        while start < stop:
            end = stop
            if qos:
                with self._acked:
                    while start - self._ack_bytes // 4 >= self.window:
                        if self._closed:
                            raise RuntimeError("broker closed the load generator connection")
                        self._acked.wait(1.0)
                    end = min(stop, self._ack_bytes // 4 + self.window)
            self.sock.sendall(view[offsets[start] : offsets[end]])
            start = end

    def close(self) -> None:
        try:
            self.sock.sendall(b"\xe0\x00")
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._reader.join(5)
        self.sock.close()


def publish_all(port: int, enc: Encoded, *, qos: int = 1, client_id: str = "loadgen") -> float:
    """Publish every packet of ``enc`` as fast as the broker takes them (QoS 1: until all are
    acknowledged); return the seconds taken."""
    t0 = time.perf_counter()
    pub = RawPublisher(port, client_id)
    try:
        chunk = 5_000
        for start in range(0, enc.count, chunk):
            pub.send(enc, start, min(enc.count, start + chunk), qos)
        if qos and not pub.wait_acked(enc.count, 120):
            raise RuntimeError(f"only {pub.acked} of {enc.count} publishes acknowledged")
        if not qos:
            pub.sync()
    finally:
        pub.close()
    return time.perf_counter() - t0


def paced_run(
    pub: RawPublisher, enc: Encoded, rate: float, qos: int, stop: threading.Event
) -> dict[str, float]:
    """Send ``enc`` at ``rate`` packets/s in ``TICK_S`` ticks (a late tick catches up in one
    burst). ``cpu_s`` is the generator process's CPU over the run."""
    total = enc.count
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    sent = 0
    max_lag_s = 0.0
    while sent < total and not stop.is_set():
        now = time.perf_counter()
        due = min(total, int((now - t0) * rate) + 1)
        if due > sent and (due - sent >= rate * TICK_S or due == total):
            lag = (now - t0) - sent / rate
            max_lag_s = max(max_lag_s, lag)
            pub.send(enc, sent, due, qos)
            sent = due
        else:
            time.sleep(min(TICK_S, max(0.0, sent / rate + TICK_S - (now - t0))))
    wall = time.perf_counter() - t0
    return {
        "sent": sent,
        "send_s": wall,
        "send_rate": sent / wall if wall else 0.0,
        "max_lag_s": max_lag_s,
        "cpu_s": time.process_time() - cpu0,
    }


def _child_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True, help="messages/s")
    parser.add_argument("--duration", type=float, required=True, help="seconds (at most)")
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--first-device", type=int, default=0)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--qos", type=int, choices=(0, 1), default=1)
    parser.add_argument("--client-id", default="loadgen")
    parser.add_argument("--step-every", type=int, default=500)
    parser.add_argument("--start-delay", type=float, default=0.0, help="ts offset of reading 0")
    args = parser.parse_args(argv)

    devices = device_names(args.devices, args.first_device)
    count = int(args.rate * args.duration)
    pub = RawPublisher(args.port, args.client_id)
    stop = threading.Event()
    go = threading.Event()

    def read_stdin() -> None:
        for line in sys.stdin:
            word = line.strip()
            if word == "GO":
                go.set()
            elif word == "STOP":
                stop.set()
                go.set()
        stop.set()
        go.set()

    threading.Thread(target=read_stdin, name="loadgen-stdin", daemon=True).start()
    # Timestamps are planned send times: encode for "now + a little", refreshed at GO below
    # only in the sense that the controller accepts readings up to its clock-skew limit.
    t_enc = time.perf_counter()
    enc = encode_readings(
        devices,
        count,
        qos=args.qos,
        batch=args.batch,
        ts0=time.time() + args.start_delay,
        rate=args.rate,
        step_every=args.step_every,
    )
    encode_s = time.perf_counter() - t_enc
    print(f"READY {json.dumps({'packets': enc.count, 'encode_s': encode_s})}", flush=True)
    go.wait()
    result: dict[str, float] = {"packets": enc.count, "readings_per_msg": args.batch}
    if not stop.is_set():
        result.update(paced_run(pub, enc, args.rate, args.qos, stop))
    print(f"SENT {json.dumps(result)}", flush=True)
    sent = int(result.get("sent", 0))
    if args.qos:
        t_ack = time.perf_counter()
        result["all_acked"] = float(pub.wait_acked(sent, 60))
        result["ack_wait_s"] = time.perf_counter() - t_ack
    else:
        pub.sync()
    pub.close()
    print(f"DONE {json.dumps(result)}", flush=True)


if __name__ == "__main__":
    _child_main()
