"""Drain a pre-loaded persistent MQTT session with MqttLink; report msg/s and CPU µs/message.

Starts a fresh mosquitto on 127.0.0.1, creates a persistent session subscribed to
``bench/#``, pre-loads N QoS 1 messages of ~60 bytes into it with a raw publisher (pre-encoded
PUBLISH packets written in big batches: paho is too slow as a load generator), then times how
long MqttLink takes to receive and PUBACK all of them, acking once per received batch.

CPU is this process's ``time.process_time()`` (the link, the event loop, the acks); the
broker's CPU is reported separately.

    python benchmarks/mqtt_link_drain.py [-n 200000] [--runs 3] [--protocol 5] [--work json]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson
import psutil

from devices.link.mqtt import MqttLink, MqttLinkConfig, MqttMessage
from devices.link.mqtt_codec import encode_connect, encode_publish
from tests.mosquitto import MosquittoBroker

CLIENT_ID = "bench-sub"
TOPIC_FILTER = "bench/#"


def payload(seq: int) -> bytes:
    body = b'{"seq":%d,"weight_g":%d,"ts":%.3f}' % (seq, 1000 + seq % 5000, 1.7e9 + seq / 1e3)
    return body.ljust(60, b" ")


async def preload(port: int, count: int, window: int = 20_000) -> float:
    """Publish ``count`` QoS 1 messages over a raw MQTT 3.1.1 socket; return seconds taken."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        encode_connect(protocol=4, client_id="bench-loader", keepalive_s=60, clean_start=True)
    )
    await writer.drain()
    connack = await reader.readexactly(4)
    if connack[3] != 0:
        raise RuntimeError(f"loader refused: {connack!r}")
    acked_bytes = 0  # v3.1.1 PUBACKs are exactly 4 bytes and nothing else is sent to us
    sent = 0
    while sent < count:
        batch = min(5_000, count - sent)
        writer.write(
            b"".join(
                encode_publish(
                    f"bench/{seq % 100}/weight_g", payload(seq), 1, False, seq % 65_535 + 1, 4
                )
                for seq in range(sent, sent + batch)
            )
        )
        sent += batch
        await writer.drain()
        while sent - acked_bytes // 4 > window:
            acked_bytes += len(await reader.read(1 << 16))
    while acked_bytes // 4 < count:
        chunk = await reader.read(1 << 16)
        if not chunk:
            raise RuntimeError("broker closed the loader connection")
        acked_bytes += len(chunk)
    writer.write(b"\xe0\x00")
    writer.close()
    await writer.wait_closed()
    return time.perf_counter() - started


async def drain_once(
    port: int, count: int, protocol: int, receive_maximum: int, work: str
) -> dict[str, float]:
    received = 0
    batches = 0
    done = asyncio.Event()
    link: MqttLink

    def on_messages(batch: list[MqttMessage]) -> None:
        nonlocal received, batches
        if work == "json":
            for m in batch:
                orjson.loads(m.payload)
        link.ack([m.packet_id for m in batch])
        received += len(batch)
        batches += 1
        if received >= count:
            done.set()

    config = MqttLinkConfig(
        port=port,
        client_id=CLIENT_ID,
        protocol=protocol,
        subscriptions=((TOPIC_FILTER, 1),),
        receive_maximum=receive_maximum,
    )
    link = MqttLink(config, on_messages, name="bench")
    wall0 = time.perf_counter()
    cpu0 = time.process_time()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(link.run(), name="bench.run")
        await asyncio.wait_for(done.wait(), 600)
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
        if not link.session_present:
            raise RuntimeError("persistent session was not resumed")
        await link.disconnect()
    return {
        "msgs": received,
        "wall_s": wall,
        "cpu_s": cpu,
        "msg_per_s": received / wall,
        "cpu_us_per_msg": cpu / received * 1e6,
        "avg_batch": received / batches,
    }


async def create_session(port: int, protocol: int) -> None:
    link = MqttLink(
        MqttLinkConfig(
            port=port, client_id=CLIENT_ID, protocol=protocol, subscriptions=((TOPIC_FILTER, 1),)
        ),
        lambda batch: None,
        name="bench-setup",
    )
    async with asyncio.TaskGroup() as tg:
        tg.create_task(link.run(), name="bench-setup.run")
        await link.wait_up(5)
        await link.disconnect()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--messages", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--protocol", type=int, choices=(4, 5), default=5)
    parser.add_argument("--receive-maximum", type=int, default=2000)
    parser.add_argument("--work", choices=("none", "json"), default="none")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mqtt-drain-") as folder:
        # Saving the database every N changes rewrites it whole: keep it out of the timing.
        broker = MosquittoBroker(Path(folder), autosave_interval=1_000_000_000)
        await broker.start()
        try:
            assert broker.pid is not None
            broker_proc = psutil.Process(broker.pid)
            await create_session(broker.port, args.protocol)
            results = []
            for run in range(1, args.runs + 1):
                load_s = await preload(broker.port, args.messages)
                broker_cpu0 = sum(broker_proc.cpu_times()[:2])
                result = await drain_once(
                    broker.port, args.messages, args.protocol, args.receive_maximum, args.work
                )
                broker_cpu = sum(broker_proc.cpu_times()[:2]) - broker_cpu0
                results.append(result)
                print(
                    f"run {run}: preload {args.messages} in {load_s:.1f} s; drained "
                    f"{result['msgs']:.0f} in {result['wall_s']:.2f} s = "
                    f"{result['msg_per_s']:,.0f} msg/s, link CPU "
                    f"{result['cpu_us_per_msg']:.2f} µs/msg, avg batch "
                    f"{result['avg_batch']:.0f}, mosquitto CPU "
                    f"{broker_cpu / result['msgs'] * 1e6:.2f} µs/msg",
                    flush=True,
                )
        finally:
            await broker.close()
    print(
        f"median of {len(results)} (MQTT {args.protocol if args.protocol == 5 else '3.1.1'}, "
        f"work={args.work}, receive_maximum={args.receive_maximum}): "
        f"{statistics.median(r['msg_per_s'] for r in results):,.0f} msg/s, "
        f"{statistics.median(r['cpu_us_per_msg'] for r in results):.2f} µs CPU/msg"
    )


if __name__ == "__main__":
    asyncio.run(main())
