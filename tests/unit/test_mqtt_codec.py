"""MQTT codec: encoders, decoders and the incremental parser (plus the link's pure helpers)."""

from __future__ import annotations

import asyncio
import random
import re

import pytest

from devices.errors import DeviceConfigError, ProtocolError
from devices.link.mqtt import MqttLink, MqttLinkConfig
from devices.link.mqtt_codec import (
    PINGRESP,
    PROP_RECEIVE_MAXIMUM,
    PROP_SERVER_KEEP_ALIVE,
    PROP_TOPIC_ALIAS,
    PUBACK,
    MqttMessage,
    PacketParser,
    PropertyValue,
    decode_connack,
    decode_disconnect,
    decode_properties,
    decode_puback,
    decode_suback,
    decode_varint,
    encode_connect,
    encode_properties,
    encode_puback,
    encode_pubacks,
    encode_publish,
    encode_subscribe,
    encode_varint,
)
from devices.link.state import LinkState, StateWatch

# -- variable byte integers -------------------------------------------------------------------

VARINT_CASES = [
    (0, b"\x00"),
    (127, b"\x7f"),
    (128, b"\x80\x01"),
    (16_383, b"\xff\x7f"),
    (16_384, b"\x80\x80\x01"),
    (2_097_151, b"\xff\xff\x7f"),
    (2_097_152, b"\x80\x80\x80\x01"),
    (268_435_455, b"\xff\xff\xff\x7f"),
]


@pytest.mark.parametrize(("value", "encoded"), VARINT_CASES)
def test_varint_matches_spec_examples(value: int, encoded: bytes) -> None:
    assert encode_varint(value) == encoded
    assert decode_varint(b"\xaa" + encoded + b"\xbb", 1) == (value, 1 + len(encoded))


def test_varint_round_trips_random_values() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        value = rng.randrange(0, 268_435_456)
        encoded = encode_varint(value)
        assert decode_varint(encoded, 0) == (value, len(encoded))


@pytest.mark.parametrize("value", [-1, 268_435_456])
def test_varint_out_of_range_is_refused(value: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        encode_varint(value)


def test_varint_incomplete_returns_none() -> None:
    assert decode_varint(b"", 0) is None
    assert decode_varint(b"\x80", 0) is None
    assert decode_varint(b"\xff\xff\xff", 0) is None
    assert decode_varint(b"\xff\xff\x7f", 0, end=2) is None


def test_varint_longer_than_four_bytes_is_malformed() -> None:
    with pytest.raises(ProtocolError, match="more than 4 bytes"):
        decode_varint(b"\x80\x80\x80\x80\x01", 0)


# -- properties -------------------------------------------------------------------------------

ALL_KINDS: list[tuple[int, PropertyValue]] = [
    (0x01, 1),  # byte
    (0x02, 3600),  # u32
    (0x03, "application/json"),  # string
    (0x09, b"\x00\x01corr"),  # binary
    (0x0B, 300_000),  # varint
    (0x23, 7),  # u16
    (0x26, ("site", "dock-3")),  # string pair
]


def test_properties_round_trip_every_kind() -> None:
    encoded = encode_properties(ALL_KINDS)
    props, end = decode_properties(b"xx" + encoded + b"payload", 2)
    assert end == 2 + len(encoded)
    assert props == dict(ALL_KINDS)


def test_empty_properties_are_one_zero_byte() -> None:
    assert encode_properties([]) == b"\x00"
    assert decode_properties(b"\x00", 0) == ({}, 1)


def test_truncated_or_unknown_properties_are_protocol_errors() -> None:
    encoded = encode_properties([(0x03, "text/plain")])
    with pytest.raises(ProtocolError):
        decode_properties(encoded[:-1], 0)
    with pytest.raises(ProtocolError, match="unknown"):
        decode_properties(b"\x02\x7e\x00", 0)
    # Length prefix claims more than the property itself holds.
    with pytest.raises(ProtocolError):
        decode_properties(b"\x02\x23\x00", 0)


# -- encoders ---------------------------------------------------------------------------------


def test_connect_v311_layout() -> None:
    packet = encode_connect(
        protocol=4,
        client_id="fh",
        keepalive_s=10,
        clean_start=False,
        username="u",
        password="p",
        will=("w/t", b"gone", 1, True),
    )
    body = (
        b"\x00\x04MQTT\x04"
        + bytes([0x80 | 0x40 | 0x20 | (1 << 3) | 0x04])
        + b"\x00\x0a"
        + b"\x00\x02fh"
        + b"\x00\x03w/t"
        + b"\x00\x04gone"
        + b"\x00\x01u"
        + b"\x00\x01p"
    )
    assert packet == b"\x10" + encode_varint(len(body)) + body


def test_connect_v5_carries_session_expiry_receive_maximum_and_packet_size() -> None:
    packet = encode_connect(
        protocol=5,
        client_id="fh",
        keepalive_s=30,
        clean_start=True,
        session_expiry_s=3600,
        receive_maximum=2000,
        maximum_packet_size=1_048_581,
    )
    assert packet[0] == 0x10
    length, pos = decode_varint(packet, 1) or (0, 0)
    assert length == len(packet) - pos
    assert packet[pos : pos + 7] == b"\x00\x04MQTT\x05"
    assert packet[pos + 7] == 0x02  # clean start only
    assert packet[pos + 8 : pos + 10] == b"\x00\x1e"
    props, after = decode_properties(packet, pos + 10)
    assert props == {0x11: 3600, 0x21: 2000, 0x27: 1_048_581}
    assert packet[after:] == b"\x00\x02fh"


def test_connect_v5_will_has_its_own_empty_property_list() -> None:
    packet = encode_connect(
        protocol=5, client_id="c", keepalive_s=5, clean_start=False, will=("w", b"x", 0, False)
    )
    assert packet.endswith(b"\x00\x01c" + b"\x00" + b"\x00\x01w" + b"\x00\x01x")
    assert packet[9] == 0x04  # will flag only


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"protocol": 3}, "protocol"),
        ({"client_id": "", "clean_start": False}, "client_id"),
        ({"protocol": 4, "password": "secret"}, "password"),
        ({"keepalive_s": 0}, "keepalive_s"),
        ({"receive_maximum": 0}, "receive_maximum"),
        ({"subscriptions": (("a/#", 3),)}, "subscriptions[0]"),
        ({"will": ("a/+", b"", 0, False)}, "will"),
        ({"max_packet_bytes": 1}, "max_packet_bytes"),
    ],
)
def test_bad_link_config_is_refused_with_the_field_name(
    overrides: dict[str, object], field: str
) -> None:
    with pytest.raises(DeviceConfigError, match=re.escape(field)):
        MqttLink(MqttLinkConfig(**overrides), lambda batch: None)  # type: ignore[arg-type]


def test_subscribe_v5_sets_retain_handling_and_v311_does_not() -> None:
    v5 = encode_subscribe(9, [("a/#", 1), ("b", 0)], 5)
    assert v5 == b"\x82\x0d\x00\x09\x00" + b"\x00\x03a/#\x11" + b"\x00\x01b\x10"
    v4 = encode_subscribe(9, [("a/#", 1)], 4)
    assert v4 == b"\x82\x08\x00\x09\x00\x03a/#\x01"


def test_pubacks_are_concatenated_four_byte_packets() -> None:
    ids = [1, 2, 255, 256, 65_535]
    assert encode_pubacks(ids) == b"".join(encode_puback(i) for i in ids)
    assert encode_puback(0x1234) == b"\x40\x02\x12\x34"
    assert encode_pubacks([]) == b""


# -- control packet decoders ------------------------------------------------------------------


def test_decode_connack_v5_with_properties() -> None:
    props = encode_properties([(PROP_RECEIVE_MAXIMUM, 20), (PROP_SERVER_KEEP_ALIVE, 60)])
    connack = decode_connack(b"\x01\x00" + props, 5)
    assert connack.session_present
    assert connack.reason_code == 0
    assert connack.properties == {PROP_RECEIVE_MAXIMUM: 20, PROP_SERVER_KEEP_ALIVE: 60}
    refused = decode_connack(b"\x00\x05", 4)
    assert (refused.session_present, refused.reason_code) == (False, 5)


def test_decode_suback_puback_disconnect() -> None:
    assert decode_suback(b"\x00\x07\x00\x01\x80", 5) == (7, [1, 0x80])
    assert decode_suback(b"\x00\x07\x01", 4) == (7, [1])
    assert decode_puback(b"\x00\x09", 5) == (9, 0)
    assert decode_puback(b"\x00\x09\x10\x00", 5) == (9, 0x10)
    assert decode_disconnect(b"", 5) == (0, "")
    reason = encode_properties([(0x1F, "Session taken over")])
    assert decode_disconnect(b"\x8e" + reason, 5) == (0x8E, "Session taken over")
    with pytest.raises(ProtocolError):
        decode_connack(b"\x00", 5)


# -- parser -----------------------------------------------------------------------------------


def v5_publish(
    topic: str,
    payload: bytes,
    packet_id: int,
    props: list[tuple[int, PropertyValue]],
    *,
    qos: int = 1,
) -> bytes:
    """A v5 PUBLISH with properties (our encoder only writes empty property lists)."""
    body = len(topic.encode()).to_bytes(2, "big") + topic.encode()
    if qos:
        body += packet_id.to_bytes(2, "big")
    body += encode_properties(props) + payload
    return bytes([0x30 | (qos << 1)]) + encode_varint(len(body)) + body


def msg(
    topic: str, payload: bytes, qos: int = 1, packet_id: int = 0, *, retain: bool = False
) -> MqttMessage:
    return MqttMessage(topic, payload, qos, retain, packet_id, False)


@pytest.mark.parametrize("protocol", [4, 5])
def test_publish_round_trips(protocol: int) -> None:
    cases = [
        MqttMessage("shelf/1/weight", b'{"g":1200}', 1, False, 1, False),
        MqttMessage("shelf/2/weight", b"", 0, True, 0, False),
        MqttMessage("bay/é/ü", b"\x00\xff" * 100, 1, True, 65_535, True),
        MqttMessage("x", b"y" * 20_000, 1, False, 42, False),  # 3-byte remaining length
    ]
    stream = b"".join(
        encode_publish(m.topic, m.payload, m.qos, m.retain, m.packet_id, protocol, dup=m.dup)
        for m in cases
    )
    parser = PacketParser(protocol)
    assert parser.feed(stream) == cases
    assert parser.control == []
    assert parser.buffered_bytes == 0


def mixed_v5_stream() -> tuple[bytes, list[MqttMessage], list[tuple[int, int, bytes]]]:
    packets = [
        encode_publish("a/b", b"one", 1, False, 1, 5),
        b"\xd0\x00",  # PINGRESP
        v5_publish(
            "a/c",
            b"two",
            2,
            [(0x02, 60), (0x03, "text/plain"), (0x26, ("k", "v")), (0x0B, 1_000)],
        ),
        b"\x40\x02\x00\x05",  # PUBACK for our publish 5
        encode_publish("big", bytes(range(256)) * 4, 1, True, 3, 5),
        encode_publish("q0", b"zero", 0, False, 0, 5),
    ]
    expected = [
        msg("a/b", b"one", packet_id=1),
        msg("a/c", b"two", packet_id=2),
        msg("big", bytes(range(256)) * 4, packet_id=3, retain=True),
        msg("q0", b"zero", qos=0),
    ]
    control = [(PINGRESP, 0, b""), (PUBACK, 0, b"\x00\x05")]
    return b"".join(packets), expected, control


def test_v5_properties_are_skipped() -> None:
    stream, expected, control = mixed_v5_stream()
    parser = PacketParser(5)
    assert parser.feed(stream) == expected
    assert parser.control == control


def test_split_at_every_byte_boundary_gives_the_same_packets() -> None:
    stream, expected, control = mixed_v5_stream()
    for cut in range(len(stream) + 1):
        parser = PacketParser(5)
        got = parser.feed(stream[:cut]) + parser.feed(stream[cut:])
        assert got == expected, cut
        assert parser.control == control, cut
        assert parser.buffered_bytes == 0


def test_split_into_three_chunks_and_byte_by_byte() -> None:
    stream, expected, _ = mixed_v5_stream()
    rng = random.Random(3)
    for _ in range(300):
        a, b = sorted(rng.sample(range(len(stream) + 1), 2))
        parser = PacketParser(5)
        got = parser.feed(stream[:a]) + parser.feed(stream[a:b]) + parser.feed(stream[b:])
        assert got == expected
    parser = PacketParser(5)
    got = []
    for i in range(len(stream)):
        got += parser.feed(stream[i : i + 1])
    assert got == expected


@pytest.mark.parametrize("protocol", [4, 5])
def test_oversized_publish_is_skipped_acked_and_reported(protocol: int) -> None:
    big_payload = b"B" * 5_000
    stream = (
        encode_publish("ok/1", b"first", 1, False, 1, protocol)
        + encode_publish("too/big", big_payload, 1, False, 2, protocol)
        + encode_publish("ok/2", b"second", 1, False, 3, protocol)
    )
    big_remaining = 2 + len("too/big") + 2 + (1 if protocol == 5 else 0) + len(big_payload)
    expected = [msg("ok/1", b"first", packet_id=1), msg("ok/2", b"second", packet_id=3)]
    for chunk_size in (1, 7, 100, 4_096, len(stream)):
        parser = PacketParser(protocol, max_packet_bytes=1_000)
        got: list[MqttMessage] = []
        peak = 0
        for i in range(0, len(stream), chunk_size):
            got += parser.feed(stream[i : i + chunk_size])
            peak = max(peak, parser.buffered_bytes)
        assert got == expected, chunk_size
        assert parser.oversized == [("too/big", big_remaining, 2)], chunk_size
        # The oversized packet is never held in memory.
        assert peak < 1_000 + chunk_size, chunk_size


def test_oversized_split_at_every_boundary() -> None:
    stream = encode_publish("too/big", b"x" * 300, 1, False, 9, 4) + encode_publish(
        "ok", b"y", 0, False, 0, 4
    )
    for cut in range(len(stream) + 1):
        parser = PacketParser(4, max_packet_bytes=100)
        got = parser.feed(stream[:cut]) + parser.feed(stream[cut:])
        assert got == [msg("ok", b"y", qos=0)], cut
        assert parser.oversized == [("too/big", 2 + 7 + 2 + 300, 9)], cut


def test_invalid_utf8_topic_is_skipped_but_acked() -> None:
    bad = b"\x32\x09\x00\x03a\xffb\x00\x07xy"  # QoS 1, topic b"a\xffb", id 7
    stream = bad + encode_publish("good", b"z", 1, False, 8, 4)
    parser = PacketParser(4)
    assert parser.feed(stream) == [msg("good", b"z", packet_id=8)]
    assert parser.skipped == [(0, 7)]
    assert parser.invalid == 1


def test_skipped_publishes_keep_their_place_in_arrival_order() -> None:
    """PUBACKs follow arrival order, so the link must know where the skipped ones arrived."""
    bad = b"\x32\x09\x00\x03a\xffb\x00\x07xy"  # QoS 1, topic not UTF-8, id 7
    stream = (
        encode_publish("ok/1", b"1", 1, False, 1, 4)
        + encode_publish("too/big", b"x" * 300, 1, False, 2, 4)
        + encode_publish("ok/3", b"3", 1, False, 3, 4)
        + bad
        + encode_publish("ok/4", b"4", 0, False, 0, 4)
        + encode_publish("too/big", b"y" * 300, 1, False, 5, 4)
    )
    for cut in range(len(stream) + 1):
        parser = PacketParser(4, max_packet_bytes=100)
        first = parser.feed(stream[:cut])
        skipped_first = parser.skipped
        parser.skipped = []
        second = parser.feed(stream[cut:])
        order: list[object] = []
        for got, skipped in ((first, skipped_first), (second, parser.skipped)):
            for index, message in enumerate([*got, None]):
                order += [pid for position, pid in skipped if position == index]
                if message is not None:
                    order.append(message.topic)
        assert order == ["ok/1", 2, "ok/3", 7, "ok/4", 5], cut


def test_topic_alias_is_resolved() -> None:
    stream = v5_publish("long/topic/name", b"1", 1, [(PROP_TOPIC_ALIAS, 3)]) + v5_publish(
        "", b"2", 2, [(PROP_TOPIC_ALIAS, 3)]
    )
    parser = PacketParser(5)
    assert [m.topic for m in parser.feed(stream)] == ["long/topic/name"] * 2
    with pytest.raises(ProtocolError, match="unknown topic alias"):
        PacketParser(5).feed(v5_publish("", b"x", 1, [(PROP_TOPIC_ALIAS, 4)]))


@pytest.mark.parametrize(
    ("packet", "error"),
    [
        (b"\x34\x07\x00\x01a\x00\x01\x00x", "QoS 2"),  # QoS 2
        (b"\x36\x05\x00\x01a\x00\x01", "QoS 3"),
        (b"\x32\x05\x00\x01a\x00\x00", "packet id 0"),
        (b"\x30\x03\x00\x09a", "runs past"),
        (b"\x30\xff\xff\xff\xff\x7f", "more than 4 bytes"),
    ],
)
def test_malformed_packets_raise_protocol_error(packet: bytes, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        PacketParser(4).feed(packet)


def test_oversized_non_publish_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        PacketParser(4, max_packet_bytes=16).feed(b"\x90\x20" + b"\x00" * 32)


# -- state watch (pure helper of the links) ---------------------------------------------------


async def test_state_watch_notifies_listeners_and_waiters() -> None:
    watch = StateWatch()
    seen: list[tuple[LinkState, LinkState]] = []
    watch.add_listener(lambda old, new: seen.append((old, new)))
    watch.add_listener(lambda old, new: 1 / 0)  # a failing listener is only logged
    async with asyncio.TaskGroup() as tg:
        waiter = tg.create_task(watch.wait_for(LinkState.UP, 5.0))
        await asyncio.sleep(0)  # let the waiter register
        watch.set(LinkState.CONNECTING, now=1.0)
        watch.set(LinkState.CONNECTING, now=2.0)  # no change, no event
        watch.set(LinkState.UP, now=3.0)
    assert waiter.done()
    assert seen == [
        (LinkState.DOWN, LinkState.CONNECTING),
        (LinkState.CONNECTING, LinkState.UP),
    ]
    assert watch.since == 3.0
    await watch.wait_for(LinkState.UP, 0.0)  # already there
    with pytest.raises(TimeoutError):
        await watch.wait_for(LinkState.DOWN, 0.01)
    assert LinkState("up") is LinkState.UP
