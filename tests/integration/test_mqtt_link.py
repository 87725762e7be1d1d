"""MqttLink against a real mosquitto 2.0 on loopback, with paho-mqtt as the independent peer."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Self

import pytest

from devices.errors import DeviceConfigError, DeviceError, DeviceUnavailable, SessionTakenOver
from devices.link.mqtt import MqttLink, MqttLinkConfig, MqttMessage
from devices.link.state import LinkState
from tests.mosquitto import (
    MosquittoBroker,
    free_port,
    paho_collect,
    paho_publish,
    running_mosquitto,
)
from tests.waiting import wait_for_condition

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[MosquittoBroker]:
    async with running_mosquitto(tmp_path / "mosquitto") as running:
        try:
            yield running
        finally:
            print(f"--- mosquitto log tail ---\n{running.log_tail()}")


class Collector:
    """``on_messages`` for tests: records every batch and acks what ``should_ack`` allows."""

    def __init__(self, should_ack: Callable[[MqttMessage], bool] = lambda m: True) -> None:
        self.should_ack = should_ack
        self.messages: list[MqttMessage] = []
        self.link: MqttLink | None = None
        self._changed = asyncio.Event()

    def __call__(self, batch: list[MqttMessage]) -> None:
        self.messages.extend(batch)
        if self.link is not None:
            self.link.ack([m.packet_id for m in batch if self.should_ack(m)])
        self._changed.set()

    def payloads(self) -> list[bytes]:
        return [m.payload for m in self.messages]

    async def wait_until(
        self, predicate: Callable[[list[MqttMessage]], bool], timeout_s: float = 10.0
    ) -> None:
        await wait_for_condition(
            lambda: len(self.messages),
            timeout_s,
            what="the collected messages to satisfy the predicate (last observed: their count)",
            until=lambda _: predicate(self.messages),
            wake=self._changed,
        )

    async def wait_for_payload(self, payload: bytes, timeout_s: float = 10.0) -> None:
        await self.wait_until(lambda ms: any(m.payload == payload for m in ms), timeout_s)


def make_link(
    port: int,
    collector: Collector,
    *,
    name: str = "mqtt",
    on_oversize: Callable[[str, int], None] | None = None,
    **overrides: object,
) -> MqttLink:
    settings: dict[str, object] = {
        "port": port,
        "client_id": "floorhand-test",
        "subscriptions": (("shelf/#", 1),),
        "keepalive_s": 5.0,
        "connect_timeout_s": 2.0,
    }
    settings.update(overrides)
    link = MqttLink(
        MqttLinkConfig(**settings),  # type: ignore[arg-type]
        collector,
        name=name,
        on_oversize=on_oversize,
    )
    collector.link = link
    return link


def entered(link: MqttLink, state: LinkState, times: int) -> asyncio.Event:
    """An event set once the link has entered ``state`` ``times`` times from now on."""
    event = asyncio.Event()
    count = 0

    def on_change(old: LinkState, new: LinkState) -> None:
        nonlocal count
        if new is state:
            count += 1
            if count >= times:
                event.set()

    link.watch.add_listener(on_change)
    return event


@contextlib.asynccontextmanager
async def running(link: MqttLink) -> AsyncIterator[None]:
    """Run the link's supervisor for the block; leave with a clean DISCONNECT."""
    async with asyncio.TaskGroup() as tg:
        tg.create_task(link.run(), name=f"{link.name}.run")
        try:
            yield
        finally:
            await link.disconnect()


async def publish(port: int, messages: list[tuple[str, bytes]], protocol: int = 5) -> None:
    await asyncio.to_thread(paho_publish, port, messages, protocol=protocol)


def numbered(count: int, start: int = 0) -> list[tuple[str, bytes]]:
    return [(f"shelf/{i}/weight_g", str(i).encode()) for i in range(start, start + count)]


# -- 2 + 7: manual ack, redelivery of what was not acked -------------------------------------


@pytest.mark.parametrize("protocol", [5, 4])
async def test_unacked_messages_are_redelivered_and_acked_ones_are_not(
    broker: MosquittoBroker, protocol: int
) -> None:
    # 0..10 acked; 11 is not, so the acks of 12, 14, ... wait behind it (arrival order).
    first = Collector(should_ack=lambda m: int(m.payload) < 10 or int(m.payload) % 2 == 0)
    link = make_link(broker.port, first, protocol=protocol)
    async with running(link):
        await link.wait_up(5)
        assert link.state is LinkState.UP
        assert not link.session_present
        await publish(broker.port, numbered(20), protocol)
        await first.wait_until(lambda ms: len(ms) >= 20)
        assert link.acks_held == 4
    assert sorted(int(p) for p in first.payloads()) == list(range(20))
    assert not any(m.dup for m in first.messages)
    assert all(m.qos == 1 and m.packet_id for m in first.messages)
    assert link.stats.acks_sent == 11
    assert link.state is LinkState.DOWN

    second = Collector()
    relink = make_link(broker.port, second, protocol=protocol)
    async with running(relink):
        await relink.wait_up(5)
        assert relink.session_present
        await second.wait_until(lambda ms: len(ms) >= 9)
        await publish(broker.port, [("shelf/end", b"end")], protocol)
        await second.wait_for_payload(b"end")
    redelivered = [m for m in second.messages if m.payload != b"end"]
    assert sorted(int(m.payload) for m in redelivered) == list(range(11, 20))
    assert all(m.dup for m in redelivered)
    assert second.payloads().count(b"end") == 1


async def test_a_failing_callback_is_redelivered_and_does_not_kill_the_link(
    broker: MosquittoBroker,
) -> None:
    """A batch whose callback raised is not acked; since acks keep arrival order nothing after
    it could be, so the link reconnects and the broker redelivers it."""

    class FailingOnce(Collector):
        failed = False

        def __call__(self, batch: list[MqttMessage]) -> None:
            if not self.failed and any(m.payload == b"boom" for m in batch):
                self.failed = True
                self.messages.extend(batch)
                self._changed.set()
                raise RuntimeError("journal full")
            super().__call__(batch)

    collector = FailingOnce()
    link = make_link(broker.port, collector, client_id="cb")
    async with running(link):
        await link.wait_up(5)
        await publish(broker.port, [("shelf/x", b"boom")])
        await collector.wait_until(lambda ms: [m.payload for m in ms] == [b"boom"] * 2)
        await link.wait_up(5)
        await publish(broker.port, [("shelf/x", b"fine")])
        await collector.wait_for_payload(b"fine")
        assert link.state is LinkState.UP
        assert link.stats.callback_errors == 1
        assert link.stats.connects == 2
        assert link.stats.acks_sent == 2
    assert collector.payloads() == [b"boom", b"boom", b"fine"]
    assert collector.messages[1].dup

    again = Collector()
    relink = make_link(broker.port, again, client_id="cb")
    async with running(relink):
        await relink.wait_up(5)
        await publish(broker.port, [("shelf/end", b"end")])
        await again.wait_for_payload(b"end")
    assert again.payloads() == [b"end"]


# -- 3: broker restart ------------------------------------------------------------------------


async def test_broker_restart_resumes_session_without_loss(broker: MosquittoBroker) -> None:
    held = {b"45", b"46", b"47", b"48", b"49"}  # still unacked when the broker stops
    collector = Collector(should_ack=lambda m: m.payload not in held or m.dup)
    link = make_link(broker.port, collector, client_id="restart")
    retrying = entered(link, LinkState.CONNECTING, 7)  # the backoff has reached its cap
    async with running(link):
        await link.wait_up(5)
        await publish(broker.port, numbered(50))
        await collector.wait_until(lambda ms: len(ms) >= 50)

        await broker.stop()
        await link.watch.wait_for(LinkState.DOWN, 5)
        await asyncio.wait_for(retrying.wait(), 15)
        listening_at = await broker.start()
        await link.wait_up(5)
        reconnect_s = link.watch.since - listening_at
        print(f"reconnected {reconnect_s:.2f} s after the broker listened")
        assert reconnect_s <= 2.5, reconnect_s
        assert link.session_present

        await publish(broker.port, numbered(50, start=50))
        expected = {str(i).encode() for i in range(100)}
        await collector.wait_until(lambda ms: {m.payload for m in ms} >= expected)
        redelivered = {m.payload for m in collector.messages if m.dup}
        assert redelivered >= held
    assert link.stats.connects == 2
    assert link.stats.disconnects >= 1


# -- 4: outgoing QoS 1 survives a reconnect ---------------------------------------------------


async def test_retained_qos1_publishes_survive_a_reconnect(broker: MosquittoBroker) -> None:
    link = make_link(broker.port, Collector(), client_id="publisher", subscriptions=())
    async with running(link):
        await link.wait_up(5)
        link.publish("cfg/warm", b"W", qos=1, retain=True)
        assert await link.drain_publishes(5)

        # Frozen broker: the next publish reaches its socket but is never read.
        broker.freeze()
        link.publish("cfg/a", b"A", qos=1, retain=True)
        assert link.inflight_publishes == 1
        await broker.kill()
        await link.watch.wait_for(LinkState.DOWN, 5)
        link.publish("cfg/b", b"B", qos=1, retain=True)
        assert link.queued_publishes == 1

        await broker.start()
        assert await link.drain_publishes(10)
        assert link.inflight_publishes == 0
        assert link.queued_publishes == 0
        assert link.stats.publish_acked == 3
    # cfg/warm died with the SIGKILLed broker (never saved); a and b were re-sent.
    got = await asyncio.to_thread(paho_collect, broker.port, "cfg/#", 2)
    assert sorted(got) == [("cfg/a", b"A", True), ("cfg/b", b"B", True)]


async def test_inflight_publish_is_resent_with_dup_when_the_session_resumes(
    tmp_path: Path,
) -> None:
    async with running_mosquitto(tmp_path / "mosquitto", extra_config="log_type debug") as broker:
        link = make_link(
            broker.port, Collector(), client_id="dup-pub", subscriptions=(), keepalive_s=2.0
        )
        async with running(link):
            await link.wait_up(5)
            broker.freeze()
            try:
                link.publish("cfg/dup", b"D", qos=1, retain=True)
                await link.watch.wait_for(LinkState.DOWN, 5)  # keepalive gives up on it
            finally:
                broker.thaw()
            assert await link.drain_publishes(15)
            assert link.session_present
        log = broker.log_path.read_text()
        assert "Received PUBLISH from dup-pub (d1, q1, r1, m1, 'cfg/dup'" in log
        got = await asyncio.to_thread(paho_collect, broker.port, "cfg/#", 1)
        assert got == [("cfg/dup", b"D", True)]


def test_publish_queue_overflow_drops_oldest_qos0_then_rejects() -> None:
    link = MqttLink(MqttLinkConfig(port=free_port(), max_queued_publishes=3), lambda b: None)
    link.publish("t/a", b"0", qos=0)
    link.publish("t/b", b"1", qos=1)
    link.publish("t/c", b"2", qos=0)
    link.publish("t/d", b"3", qos=1)  # drops t/a
    link.publish("t/e", b"4", qos=1)  # drops t/c
    assert link.stats.dropped_publishes == 2
    with pytest.raises(DeviceUnavailable, match="queue is full"):
        link.publish("t/f", b"5", qos=1)
    assert link.stats.dropped_publishes == 3
    assert link.queued_publishes == 3
    with pytest.raises(ValueError, match="QoS"):
        link.publish("t/g", b"", qos=2)


# -- 5: keepalive notices a half-open link ----------------------------------------------------


async def test_keepalive_detects_a_frozen_broker(broker: MosquittoBroker) -> None:
    keepalive_s = 2.0
    link = make_link(broker.port, Collector(), keepalive_s=keepalive_s)
    async with running(link):
        await link.wait_up(5)
        broker.freeze()
        frozen_at = time.monotonic()
        try:
            await link.watch.wait_for(LinkState.DOWN, 1.5 * keepalive_s + 1)
            noticed_s = time.monotonic() - frozen_at
        finally:
            broker.thaw()
        print(f"half-open link noticed after {noticed_s:.2f} s")
        assert noticed_s <= 1.5 * keepalive_s + 1
        await link.wait_up(10)  # and it comes back once the broker answers again
    assert link.stats.pings >= 1


# -- 6: session taken over --------------------------------------------------------------------


async def test_session_taken_over_is_fatal_and_not_retried(broker: MosquittoBroker) -> None:
    first = make_link(broker.port, Collector(), name="first", client_id="twin")
    second_collector = Collector()
    second = make_link(broker.port, second_collector, name="second", client_id="twin")

    async def run_first() -> DeviceError:
        try:
            await first.run()
        except DeviceError as exc:
            return exc
        raise AssertionError("run() returned without an error")

    async with asyncio.TaskGroup() as tg:
        outcome = tg.create_task(run_first(), name="first.run")
        await first.wait_up(5)
        async with running(second):
            await second.wait_up(5)
            error = await asyncio.wait_for(outcome, 10)
            assert isinstance(error, SessionTakenOver)
            assert first.state is LinkState.DOWN
            first_connects = first.stats.connects
            # mosquitto 2.0.11 closes the old connection without DISCONNECT 0x8E, so each
            # client is evicted a few times before the first one recognises the pattern.
            assert first_connects <= 4
            # The survivor keeps the session.
            await second.wait_up(5)
            await publish(broker.port, [("shelf/after", b"after")])
            await second_collector.wait_for_payload(b"after")
            assert second.state is LinkState.UP
    assert first.stats.connects == first_connects


# -- 8: oversized payloads --------------------------------------------------------------------


async def test_oversized_publish_is_skipped_acked_and_reported_v311(
    broker: MosquittoBroker,
) -> None:
    oversized: list[tuple[str, int]] = []
    collector = Collector()
    settings: dict[str, object] = {"protocol": 4, "max_packet_bytes": 4_096, "client_id": "big"}
    link = make_link(
        broker.port, collector, on_oversize=lambda t, n: oversized.append((t, n)), **settings
    )
    big = b"x" * 300_000
    async with running(link):
        await link.wait_up(5)
        await publish(broker.port, [("shelf/big", big), ("shelf/small", b"small")], 4)
        await collector.wait_for_payload(b"small")
    assert collector.payloads() == [b"small"]
    assert oversized == [("shelf/big", 2 + len("shelf/big") + 2 + len(big))]
    assert link.stats.oversize_in == 1

    # It was acked: a resumed session does not bring it back.
    again = Collector()
    relink = make_link(
        broker.port, again, on_oversize=lambda t, n: oversized.append((t, n)), **settings
    )
    async with running(relink):
        await relink.wait_up(5)
        assert relink.session_present
        await publish(broker.port, [("shelf/end", b"end")], 4)
        await again.wait_for_payload(b"end")
    assert again.payloads() == [b"end"]
    assert len(oversized) == 1


async def test_oversized_publish_is_withheld_by_the_broker_v5(broker: MosquittoBroker) -> None:
    collector = Collector()
    link = make_link(broker.port, collector, max_packet_bytes=4_096, client_id="big5")
    async with running(link):
        await link.wait_up(5)
        await publish(broker.port, [("shelf/big", b"x" * 300_000), ("shelf/small", b"small")])
        await collector.wait_for_payload(b"small")
    assert collector.payloads() == [b"small"]


# -- odds and ends ----------------------------------------------------------------------------


async def test_wait_up_fails_fast_without_a_broker() -> None:
    link = make_link(free_port(), Collector())
    states: list[LinkState] = []
    link.watch.add_listener(lambda old, new: states.append(new))
    async with asyncio.TaskGroup() as tg:
        tg.create_task(link.run(), name="mqtt.run")
        with pytest.raises(DeviceUnavailable, match="not up"):
            await link.wait_up(0.3)
        await link.disconnect()
    assert LinkState.CONNECTING in states
    assert link.state is LinkState.DOWN
    link.ack([1, 2])  # down: silently ignored


async def test_pause_reading_holds_messages_until_resumed(broker: MosquittoBroker) -> None:
    collector = Collector()
    link = make_link(broker.port, collector, client_id="paused")
    async with running(link):
        await link.wait_up(5)
        link.pause_reading()
        await publish(broker.port, numbered(10))
        assert collector.messages == []
        link.resume_reading()
        await collector.wait_until(lambda ms: len(ms) >= 10)


async def test_stale_epoch_acks_are_ignored(broker: MosquittoBroker) -> None:
    epochs: list[int] = []
    got = asyncio.Event()
    link: MqttLink | None = None

    def on_messages(batch: list[MqttMessage]) -> None:
        assert link is not None
        epochs.append(link.epoch)
        link.ack([m.packet_id for m in batch], epoch=link.epoch - 1)  # a late, stale ack
        got.set()

    link = MqttLink(
        MqttLinkConfig(port=broker.port, client_id="epoch", subscriptions=(("shelf/#", 1),)),
        on_messages,
    )
    async with running(link):
        await link.wait_up(5)
        await publish(broker.port, [("shelf/e", b"e")])
        await asyncio.wait_for(got.wait(), 10)
        assert link.stats.acks_sent == 0
        link.ack([999])  # never delivered: ignored
        assert link.stats.acks_sent == 0
    assert epochs == [1]


@pytest.mark.parametrize(
    ("max_batch", "max_batch_bytes"), [(100, 1 << 20), (100_000, 250)], ids=["messages", "bytes"]
)
async def test_a_large_backlog_is_handed_over_in_bounded_slices_in_order(
    broker: MosquittoBroker, max_batch: int, max_batch_bytes: int
) -> None:
    """A resumed session's backlog arrives in large socket reads; ``on_messages`` never gets
    more than ``max_batch`` messages or ``max_batch_bytes`` of payload at once, and gets all
    of them in the broker's order."""
    first = Collector()
    link = make_link(broker.port, first)
    async with running(link):
        await link.wait_up(5)
    await publish(broker.port, numbered(3000))  # queued in the session while we are away

    batches: list[list[MqttMessage]] = []

    class Slices(Collector):
        def __call__(self, batch: list[MqttMessage]) -> None:
            batches.append(batch)
            super().__call__(batch)

    second = Slices()
    relink = make_link(broker.port, second, max_batch=max_batch, max_batch_bytes=max_batch_bytes)
    async with running(relink):
        await relink.wait_up(5)
        await second.wait_until(lambda ms: len(ms) >= 3000, 20)
    assert max(map(len, batches)) <= max_batch
    assert max(sum(len(m.payload) for m in b) for b in batches) <= max_batch_bytes
    assert len(batches) >= 30
    assert [int(p) for p in second.payloads()] == list(range(3000))
    assert relink.stats.acks_sent == 3000


async def test_a_resumed_backlog_is_handed_over_before_the_suback_while_connecting(
    broker: MosquittoBroker,
) -> None:
    """mosquitto sends a resumed session's queued messages right after the CONNACK, before
    it answers our SUBSCRIBE: the link hands them over (and acks them) while its state is
    still CONNECTING, and is UP once the SUBACK arrives. So "every message applied" does not
    imply "the link is up": a caller that needs UP waits for it (the broker-restart test in
    test_ingest_faults.py read health in between once)."""
    link = make_link(broker.port, Collector())
    async with running(link):
        await link.wait_up(5)
    await publish(broker.port, numbered(2000))  # queued in the session while we are away

    states: list[LinkState] = []
    relink: MqttLink | None = None

    class States(Collector):
        def __call__(self, batch: list[MqttMessage]) -> None:
            assert relink is not None
            states.append(relink.state)
            super().__call__(batch)

    second = States()
    relink = make_link(broker.port, second)
    async with running(relink):
        await second.wait_until(lambda ms: len(ms) >= 2000, 20)
        await relink.wait_up(5)
    assert relink.session_present
    assert states[0] == LinkState.CONNECTING, states[:5]
    assert [int(p) for p in second.payloads()] == list(range(2000))
    assert relink.stats.acks_sent == 2000


# -- small reads held under load (`coalesce_s`) -------------------------------------------------


class Batches(Collector):
    """A `Collector` that also records the size of every ``on_messages`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def __call__(self, batch: list[MqttMessage]) -> None:
        self.batches.append(len(batch))
        super().__call__(batch)


async def publish_apart(link: MqttLink, port: int, count: int, start: int = 0) -> None:
    """``count`` messages, each published once the link has read the one before: they reach
    it in separate socket reads."""
    for i in range(start, start + count):
        seen = link.stats.messages_in
        await publish(port, numbered(1, i))
        await wait_for_condition(
            lambda: link.stats.messages_in,
            5,
            what=f"message {i} read",
            until=lambda n, seen=seen: n > seen,
        )


@pytest.mark.parametrize(
    ("from_msg_s", "batches", "held"), [(0.0, [3], 1), (1e9, [1, 1, 1], 0)], ids=["above", "below"]
)
async def test_under_load_small_reads_are_held_and_handed_over_as_one_batch(
    broker: MosquittoBroker, from_msg_s: float, batches: list[int], held: int
) -> None:
    """Above ``coalesce_from_msg_s`` (0: always) a small read waits up to ``coalesce_s`` for
    the next ones, which join it: one ``on_messages`` call, in arrival order, all acked.
    Below it (1e9: never) every read is handed over at once."""
    collector = Batches()
    link = make_link(broker.port, collector, coalesce_s=1.0, coalesce_from_msg_s=from_msg_s)
    async with running(link):
        await link.wait_up(5)
        await publish_apart(link, broker.port, 3)
        await collector.wait_until(lambda ms: len(ms) >= 3)
        await wait_for_condition(
            lambda: link.stats.acks_sent, 5, what="3 acks", until=lambda n: n >= 3
        )
    assert collector.batches == batches
    assert collector.payloads() == [b"0", b"1", b"2"]
    assert link.stats.reads_held == held


async def test_held_reads_go_as_soon_as_they_reach_coalesce_bytes(
    broker: MosquittoBroker,
) -> None:
    """Two reads of one PUBLISH each pass ``coalesce_bytes`` together: handed over then, not
    when the (1 s) hold ends; the third read starts a new hold."""
    collector = Batches()
    one_read = len(b"shelf/0/weight_g") + 1 + 2 + 2 + 1  # topic, payload, lengths, id, props
    link = make_link(
        broker.port,
        collector,
        coalesce_s=1.0,
        coalesce_from_msg_s=0.0,
        coalesce_bytes=one_read * 2 - 4,
    )
    async with running(link):
        await link.wait_up(5)
        await publish_apart(link, broker.port, 2)
        # Well within the hold: these come from the bytes threshold, not from its end.
        await collector.wait_until(lambda ms: len(ms) >= 2, timeout_s=0.8)
        await publish_apart(link, broker.port, 1, start=2)
        await collector.wait_until(lambda ms: len(ms) >= 3)
    assert collector.batches == [2, 1]
    assert link.stats.reads_held == 2


async def test_held_reads_are_delivered_when_the_link_stops(broker: MosquittoBroker) -> None:
    """Messages received are handed over at a close, not dropped with the hold's timer
    (at QoS 0 the broker would not send them again)."""
    collector = Batches()
    link = make_link(
        broker.port,
        collector,
        coalesce_s=1.0,
        coalesce_from_msg_s=0.0,
        subscriptions=(("shelf/#", 0),),
    )
    async with running(link):
        await link.wait_up(5)
        await publish_apart(link, broker.port, 2)
        await wait_for_condition(
            lambda: link.stats.messages_in, 5, what="2 messages in", until=lambda n: n >= 2
        )
        assert collector.batches == []  # held
    assert collector.batches == [2]
    assert collector.payloads() == [b"0", b"1"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("coalesce_s", -0.001),
        ("coalesce_s", 1.5),
        ("coalesce_bytes", 0),
        ("coalesce_from_msg_s", -1.0),
    ],
)
def test_bad_slice_and_coalesce_settings_are_configuration_errors(field: str, value: float) -> None:
    with pytest.raises(DeviceConfigError, match=field):
        MqttLink(MqttLinkConfig(**{field: value}), Collector())  # type: ignore[arg-type]


# -- PUBACK order (MQTT 5 §4.6, 3.1.1 §4.6) ---------------------------------------------------


def wire_order(log: str, client_id: str) -> tuple[list[int], list[int]]:
    """The message ids mosquitto sent to ``client_id`` (QoS 1) and the ids of the PUBACKs it
    received from it, each in log order."""
    sent: list[int] = []
    acked: list[int] = []
    for line in log.splitlines():
        if f"Sending PUBLISH to {client_id} (" in line and ", q1, " in line:
            sent.append(int(line.split(", m", 1)[1].split(",", 1)[0]))
        elif f"Received PUBACK from {client_id} (Mid: " in line:
            acked.append(int(line.split("(Mid: ", 1)[1].split(",", 1)[0].rstrip(")")))
    return sent, acked


@pytest.mark.parametrize("max_batch", [512, 3])
async def test_pubacks_leave_in_arrival_order_whatever_order_the_consumer_acks(
    tmp_path: Path, max_batch: int
) -> None:
    """The consumer acks commands at once and readings after its "commit" (the runtime's
    split); an oversized message in the middle is acked by the link itself. On the wire the
    PUBACKs must still follow the order the PUBLISHes arrived in."""
    async with running_mosquitto(tmp_path / "mosquitto", extra_config="log_type all") as broker:

        class CommandsFirst(Collector):
            def __call__(self, batch: list[MqttMessage]) -> None:
                self.messages.extend(batch)
                assert self.link is not None
                self.link.ack([m.packet_id for m in batch if m.topic.startswith("cmd/")])
                self.link.ack([m.packet_id for m in batch if not m.topic.startswith("cmd/")])
                self._changed.set()

        collector = CommandsFirst()
        link = make_link(
            broker.port,
            collector,
            client_id="order",
            protocol=4,  # the broker does not know our packet limit: it sends the big one
            max_packet_bytes=4_096,
            max_batch=max_batch,
            subscriptions=(("shelf/#", 1), ("cmd/#", 1)),
        )
        mixed: list[tuple[str, bytes]] = []
        for i in range(6):
            mixed.append((f"shelf/{i}/weight_g", str(i).encode()))
            if i % 2:
                mixed.append((f"cmd/{i}", b"pick"))
            if i == 2:
                mixed.append(("shelf/big", b"x" * 5_000))
        async with running(link):
            await link.wait_up(5)
            link.pause_reading()  # let them pile up: one read holds the whole mix
            await publish(broker.port, mixed, 4)
            link.resume_reading()
            await collector.wait_until(lambda ms: len(ms) >= len(mixed) - 1)
            assert link.stats.oversize_in == 1
        sent, acked = wire_order(broker.log_path.read_text(), "order")
    assert len(sent) == len(mixed)
    assert acked == sent


# -- reconnect backoff after short-lived connections -------------------------------------------


class StandInBroker:
    """A TCP server on 127.0.0.1 speaking just enough MQTT for one fault that no broker we can
    run produces; subclasses answer each connection in `answer`."""

    def __init__(self) -> None:
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.answer(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    @staticmethod
    async def packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
        """The next packet: its first byte and its body."""
        first = (await reader.readexactly(1))[0]
        length = shift = 0
        while True:
            byte = (await reader.readexactly(1))[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        return first, await reader.readexactly(length)


class ServerBusyBroker(StandInBroker):
    """For one fault mosquitto never produces: it accepts every connection (CONNACK, SUBACK)
    and, as soon as the test saw the link up (``served``), sends an MQTT 5 DISCONNECT 0x89
    "Server busy", as an overloaded broker does. While ``hold`` is set it keeps the connection
    until ``release``."""

    def __init__(self) -> None:
        super().__init__()
        self.served = asyncio.Event()
        self.hold = asyncio.Event()
        self.release = asyncio.Event()

    async def __aexit__(self, *exc: object) -> None:
        await super().__aexit__(*exc)
        self.release.set()

    async def answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.packet(reader)  # CONNECT
        writer.write(b"\x20\x03\x00\x00\x00")  # CONNACK, accepted, no properties
        first, body = await self.packet(reader)  # SUBSCRIBE
        assert first >> 4 == 8, first
        writer.write(b"\x90\x04" + body[:2] + b"\x00\x01")  # SUBACK: QoS 1 granted
        await self.served.wait()
        self.served.clear()
        if self.hold.is_set():
            await self.release.wait()
        writer.write(b"\xe0\x01\x89")  # DISCONNECT 0x89 Server busy
        await writer.drain()


def record_retry_delays(link: MqttLink) -> list[float]:
    """The delay the link waited before each reconnect attempt (0 for the first connect)."""
    delays: list[float] = []
    link.watch.add_listener(
        lambda old, new: delays.append(link.retry_delay_s) if new is LinkState.CONNECTING else None
    )
    return delays


async def test_server_disconnect_right_after_connack_backs_off() -> None:
    """A broker that accepts and then drops every connection must not be hammered: the
    backoff is reset only by a connection that stayed up ``backoff_reset_after_s``."""
    async with ServerBusyBroker() as fake:
        link = make_link(fake.port, Collector(), backoff_reset_after_s=0.5)
        delays = record_retry_delays(link)
        ups = 0
        six_up = asyncio.Event()

        def count_ups(old: LinkState, new: LinkState) -> None:
            nonlocal ups
            if new is LinkState.UP:
                fake.served.set()
                ups += 1
                if ups == 6:
                    fake.hold.set()  # the sixth connection stays up
                    six_up.set()

        link.watch.add_listener(count_ups)
        async with running(link):
            await asyncio.wait_for(six_up.wait(), 20)
            # Exponential from backoff_initial_s (0.1 s, jitter shortens by up to 20 %).
            assert delays[0] == 0.0
            for n, delay in enumerate(delays[1:6]):
                assert delay >= 0.8 * min(0.1 * 2**n, 2.0), delays
            await asyncio.sleep(0.6)  # the scenario: this connection stays up long enough
            fake.hold.clear()
            fake.release.set()
            await link.watch.wait_for(LinkState.CONNECTING, 5)
            assert link.retry_delay_s <= 0.1, delays  # a stable connection reset the backoff
        assert link.stats.connects == 6
        assert fake.connections >= 6


async def test_evictions_by_another_client_back_off_before_the_takeover_is_recognised(
    broker: MosquittoBroker,
) -> None:
    """Real mosquitto: a paho client takes our client id over each time we come back (each
    takeover closes our connection right after it was accepted)."""
    import paho.mqtt.client as mqtt

    link = make_link(broker.port, Collector(), client_id="stolen")
    delays = record_retry_delays(link)

    def steal() -> None:
        thief = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="stolen")
        thief.connect("127.0.0.1", broker.port, keepalive=30)
        thief.loop_start()
        try:
            thief.publish("x/steal", b"", qos=1).wait_for_publish(5)  # connected and served
        finally:
            thief.disconnect()
            thief.loop_stop()

    async def run_link() -> BaseException | None:
        try:
            await link.run()
        except DeviceError as exc:
            return exc
        return None

    async with asyncio.TaskGroup() as tg:
        outcome = tg.create_task(run_link())
        for _ in range(3):
            await link.wait_up(10)
            await asyncio.to_thread(steal)
            await link.watch.wait_for(LinkState.DOWN, 5)
        error = await asyncio.wait_for(outcome, 10)
    assert isinstance(error, SessionTakenOver), error
    assert delays[0] == 0.0
    assert delays[1] <= 0.1, delays
    assert delays[2] >= 0.8 * 0.2, delays  # not reset by the short-lived connection


# -- permanent CONNACK refusals are configuration errors ---------------------------------------


async def run_until_error(link: MqttLink, timeout_s: float = 10.0) -> BaseException | None:
    """Run the link's supervisor until it raises (returned) or ``timeout_s`` passes (None)."""
    task = asyncio.create_task(link.run())
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout_s)
    except DeviceError as exc:
        return exc
    except TimeoutError:
        await link.disconnect()
        with contextlib.suppress(DeviceError):
            await task
    return None


async def test_refused_client_id_is_a_configuration_error_not_retried(tmp_path: Path) -> None:
    """mosquitto with ``allow_zero_length_clientid false`` refuses an empty 3.1.1 client id
    with return code 2 (identifier rejected); retrying cannot help. (Over MQTT 5 mosquitto
    2.0.11 answers 0x80 "unspecified", which stays a temporary refusal; 0x85 is tested with
    a stand-in below.)"""
    protocol = 4
    async with running_mosquitto(
        tmp_path / "mosquitto", extra_config="allow_zero_length_clientid false"
    ) as broker:
        link = make_link(
            broker.port, Collector(), client_id="", clean_start=True, protocol=protocol
        )
        attempts = record_retry_delays(link)
        error = await run_until_error(link)
    assert isinstance(error, DeviceConfigError), error
    assert "client id" in str(error), error
    assert "client_id" in str(error), error
    assert len(attempts) == 1
    assert link.state is LinkState.DOWN


class RefusingBroker(StandInBroker):
    """Answers every CONNECT with one fixed CONNACK: for refusals that neither mosquitto,
    aedes nor amqtt send (amqtt closes an MQTT 5 CONNECT without any answer)."""

    def __init__(self, connack: bytes) -> None:
        super().__init__()
        self.connack = connack

    async def answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.packet(reader)
        writer.write(self.connack)
        await writer.drain()


@pytest.mark.parametrize(
    ("protocol", "connack", "hint"),
    [
        (5, b"\x20\x03\x00\x84\x00", "protocol = 4"),  # unsupported protocol version
        (5, b"\x20\x02\x00\x01", "protocol = 4"),  # a 3.1.1-only broker's answer to MQTT 5
        (4, b"\x20\x02\x00\x01", "protocol"),  # unacceptable protocol version
        (5, b"\x20\x03\x00\x85\x00", "client_id"),  # client identifier not valid
        (5, b"\x20\x03\x00\x8c\x00", "authentication method"),  # bad authentication method
        # server moved, with a Server Reference property (0x1C) "mqtt.example:8883"
        (5, b"\x20\x17\x00\x9d\x14\x1c\x00\x11mqtt.example:8883", "mqtt.example:8883"),
    ],
)
async def test_permanent_refusals_are_configuration_errors_with_a_hint(
    protocol: int, connack: bytes, hint: str
) -> None:
    async with RefusingBroker(connack) as fake:
        link = make_link(fake.port, Collector(), protocol=protocol)
        error = await run_until_error(link, timeout_s=5)
    assert isinstance(error, DeviceConfigError), error
    assert hint in str(error), error
    assert fake.connections == 1


async def test_a_temporary_refusal_is_retried() -> None:
    async with RefusingBroker(b"\x20\x03\x00\x89\x00") as fake:  # 0x89 server busy
        link = make_link(fake.port, Collector())
        attempts = record_retry_delays(link)
        retried = asyncio.Event()
        link.watch.add_listener(lambda old, new: retried.set() if len(attempts) >= 3 else None)
        async with running(link):
            await asyncio.wait_for(retried.wait(), 10)
    assert fake.connections >= 3


# -- what the broker announces: Maximum QoS, Retain Available, granted QoS ----------------------


async def test_broker_maximum_qos_and_retain_available_are_honoured(tmp_path: Path) -> None:
    """mosquitto with ``max_qos 0`` and ``retain_available false`` announces both in its MQTT 5
    CONNACK and disconnects a client that publishes QoS 1 or retained anyway. The link sends
    such publishes as QoS 0 without retain, counts them and says so in ``warnings``."""
    async with running_mosquitto(
        tmp_path / "mosquitto", extra_config="max_qos 0\nretain_available false"
    ) as broker:
        collector = Collector()
        link = make_link(broker.port, collector, subscriptions=(("alerts/#", 1),))
        async with running(link):
            await link.wait_up(5)
            assert link.server_max_qos == 0
            assert not link.retain_available
            link.publish("alerts/a", b"A", qos=1, retain=True)
            await collector.wait_for_payload(b"A")
            assert link.stats.connects == 1
            assert link.state is LinkState.UP
        assert link.stats.qos_downgraded == 1
        assert link.stats.retain_dropped == 1
        warnings = " ".join(link.warnings)
        assert "Maximum QoS 0" in warnings, warnings
        assert "retain" in warnings, warnings


async def test_a_subscription_granted_a_lower_qos_is_reported(tmp_path: Path) -> None:
    """A QoS 1 subscription granted QoS 0 (mosquitto ``max_qos 0``) makes delivery at most
    once: the link logs it as an error and reports it in ``granted_qos`` and ``warnings``."""
    async with running_mosquitto(tmp_path / "mosquitto", extra_config="max_qos 0") as broker:
        for protocol in (5, 4):
            collector = Collector()
            link = make_link(broker.port, collector, protocol=protocol)
            async with running(link):
                await link.wait_up(5)
                # (paho's QoS 1 would get it disconnected too)
                await asyncio.to_thread(
                    paho_publish, broker.port, [("shelf/1", b"one")], qos=0, protocol=protocol
                )
                await collector.wait_for_payload(b"one")
            assert collector.messages[0].qos == 0
            assert link.granted_qos == {"shelf/#": 0}, protocol
            assert any("shelf/#" in w and "at most once" in w for w in link.warnings), (
                protocol,
                link.warnings,
            )


async def test_inflight_qos1_is_resent_as_the_restarted_broker_now_allows(tmp_path: Path) -> None:
    """A QoS 1 retained publish in flight when the broker went away; the broker comes back
    with ``max_qos 0`` and ``retain_available false``. Re-sending it as it was would get the
    link disconnected after every CONNACK; it goes out as QoS 0 without retain instead."""
    async with running_mosquitto(tmp_path / "mosquitto", extra_config="log_type all") as broker:
        link = make_link(broker.port, Collector(), client_id="resend", subscriptions=())
        async with running(link):
            await link.wait_up(5)
            broker.freeze()
            link.publish("alerts/late", b"L", qos=1, retain=True)
            assert link.inflight_publishes == 1
            await broker.kill()
            await link.watch.wait_for(LinkState.DOWN, 5)
            broker.extra_config = "log_type all\nmax_qos 0\nretain_available false"
            await broker.start()
            await link.wait_up(5)
            assert await link.drain_publishes(5)
            link.publish("alerts/next", b"N", qos=1)  # the link is still up and usable
            assert await link.drain_publishes(5)
            assert link.stats.connects == 2
            assert link.state is LinkState.UP
        log = broker.log_path.read_text()
    assert "Received PUBLISH from resend (d0, q0, r0, m0, 'alerts/late'" in log, log
    assert "Received PUBLISH from resend (d0, q0, r0, m0, 'alerts/next'" in log, log
    assert link.stats.qos_downgraded == 2
    assert link.stats.retain_dropped == 1


async def test_a_3_1_1_broker_closing_on_our_publish_is_not_called_only_a_takeover(
    tmp_path: Path,
) -> None:
    """mosquitto ``max_qos 0`` closes a 3.1.1 client that publishes QoS 1 (3.1.1 has no way to
    say why, nor to announce the limit). Right after every CONNACK the link re-sends it and is
    closed again: that looks like a takeover, and the error must name the other cause too."""
    async with running_mosquitto(tmp_path / "mosquitto", extra_config="max_qos 0") as broker:
        link = make_link(broker.port, Collector(), client_id="q1", protocol=4, subscriptions=())
        task = asyncio.create_task(link.run())
        await link.wait_up(5)
        link.publish("alerts/x", b"X", qos=1, retain=True)
        with pytest.raises(SessionTakenOver) as caught:
            await asyncio.wait_for(task, 20)
    assert "max_qos" in str(caught.value), caught.value
    assert "client id" in str(caught.value), caught.value


async def test_a_will_the_broker_cannot_take_is_downgraded_not_fatal(tmp_path: Path) -> None:
    """mosquitto ``max_qos 0`` / ``retain_available false`` refuses an MQTT 5 CONNECT whose
    will is QoS 1 (0x9B) or retained (0x9A). Like publishes, the will is sent as the broker
    allows (QoS 0, not retained), with a warning, instead of the link giving up."""
    async with running_mosquitto(
        tmp_path / "mosquitto", extra_config="max_qos 0\nretain_available false"
    ) as broker:
        link = make_link(
            broker.port, Collector(), client_id="willing", will=("site/owner", b"", 1, True)
        )
        async with running(link):
            await link.wait_up(10)
        warnings = " ".join(link.warnings)
    assert "will" in warnings, warnings
    assert link.stats.connects == 1


# -- mosquitto 2.0.11: a queued QoS 0 strands the QoS 1 message just past the receive maximum --


@pytest.mark.parametrize("queue_qos0", [True, False])
async def test_a_queued_qos0_strands_one_message_past_the_receive_maximum_until_a_reconnect(
    tmp_path: Path, queue_qos0: bool
) -> None:
    # mosquitto 2.0.11, db__message_reconnect_reset_outgoing: on a resumed MQTT 5 session, a
    # queued QoS 0 message is marked for sending but `db__message_dequeue_first` moves the
    # queue's HEAD (the first QoS 1 message past our receive maximum) into the in-flight list,
    # still in state "queued", which is never sent on that connection. The next connection
    # resets it to "publish" and sends it, so nothing is lost, but a drain stalls one message
    # short. The shipped broker config sets queue_qos0_messages false, which avoids it.
    receive_maximum = 10
    config = f"queue_qos0_messages {'true' if queue_qos0 else 'false'}"
    async with running_mosquitto(tmp_path / "mosquitto", extra_config=config) as broker:
        setup = make_link(broker.port, Collector(), receive_maximum=receive_maximum)
        async with running(setup):
            await setup.wait_up(5)
        qos1 = numbered(receive_maximum + 3)
        await publish(broker.port, qos1)  # into the offline session
        await asyncio.to_thread(paho_publish, broker.port, [("shelf/q0", b"q0")], qos=0)

        first = Collector()
        link = make_link(broker.port, first, receive_maximum=receive_maximum)
        async with running(link):
            await link.wait_up(5)
            assert link.session_present
            # With the QoS 0 queued: 12 of the 13 QoS 1 and the QoS 0. "end" then shows that
            # the broker has sent everything it is going to send on this connection.
            await first.wait_until(lambda ms: len(ms) >= len(qos1))
            await publish(broker.port, [("shelf/end", b"end")])
            await first.wait_for_payload(b"end")
        got = {p for p in first.payloads() if p not in (b"q0", b"end")}
        missing = {p for _, p in qos1} - got
        if queue_qos0:
            assert b"q0" in first.payloads()
            assert missing == {str(receive_maximum).encode()}, (
                "mosquitto no longer strands the message past the receive maximum: update "
                "firmware-configs/mosquitto/README.md (queue_qos0_messages) and this test"
            )
        else:
            assert b"q0" not in first.payloads()  # not queued for an offline session
            assert not missing

        second = Collector()
        relink = make_link(broker.port, second, receive_maximum=receive_maximum)
        async with running(relink):
            await relink.wait_up(5)
            await publish(broker.port, [("shelf/end2", b"end2")])
            await second.wait_for_payload(b"end2")
        assert {p for p in second.payloads() if p != b"end2"} == missing
