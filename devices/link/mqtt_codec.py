"""MQTT 3.1.1 and 5.0 packet encoding, and an incremental parser tuned for QoS 1 ingest.

Pure: no sockets, no clock, no logging. `PacketParser.feed` takes whatever chunk the transport
delivered and returns every complete PUBLISH in it; other packets are queued on
`PacketParser.control` for the link to handle.

The parser works on immutable ``bytes``: slicing ``bytes`` copies once, where a ``bytearray``
slice turned into ``bytes`` copies twice. A packet split across chunks is kept as a list of
parts that is joined once, when enough bytes for the whole packet have arrived, so a large
packet arriving in many small chunks costs O(n), not O(n²).
"""

from __future__ import annotations

import array
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from devices.errors import ProtocolError

PROTOCOL_V311 = 4
PROTOCOL_V5 = 5

CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14
AUTH = 15

PINGREQ_PACKET = b"\xc0\x00"
# v5 allows omitting reason code 0 and empty properties; the v3.1.1 DISCONNECT is the same.
DISCONNECT_PACKET = b"\xe0\x00"

MAX_REMAINING_LENGTH = 268_435_455
MAX_PACKET_ID = 65_535

# MQTT 5 property identifiers used by the link.
PROP_SESSION_EXPIRY_INTERVAL = 0x11
PROP_ASSIGNED_CLIENT_ID = 0x12
PROP_SERVER_KEEP_ALIVE = 0x13
PROP_REASON_STRING = 0x1F
PROP_RECEIVE_MAXIMUM = 0x21
PROP_TOPIC_ALIAS_MAXIMUM = 0x22
PROP_TOPIC_ALIAS = 0x23
PROP_MAXIMUM_QOS = 0x24
PROP_RETAIN_AVAILABLE = 0x25
PROP_USER_PROPERTY = 0x26
PROP_MAXIMUM_PACKET_SIZE = 0x27

_BYTE, _U16, _U32, _VARINT, _STR, _BIN, _PAIR = range(7)
_PROPERTY_TYPES: dict[int, int] = {
    0x01: _BYTE,  # Payload Format Indicator
    0x02: _U32,  # Message Expiry Interval
    0x03: _STR,  # Content Type
    0x08: _STR,  # Response Topic
    0x09: _BIN,  # Correlation Data
    0x0B: _VARINT,  # Subscription Identifier
    0x11: _U32,  # Session Expiry Interval
    0x12: _STR,  # Assigned Client Identifier
    0x13: _U16,  # Server Keep Alive
    0x15: _STR,  # Authentication Method
    0x16: _BIN,  # Authentication Data
    0x17: _BYTE,  # Request Problem Information
    0x18: _U32,  # Will Delay Interval
    0x19: _BYTE,  # Request Response Information
    0x1A: _STR,  # Response Information
    0x1C: _STR,  # Server Reference
    0x1F: _STR,  # Reason String
    0x21: _U16,  # Receive Maximum
    0x22: _U16,  # Topic Alias Maximum
    0x23: _U16,  # Topic Alias
    0x24: _BYTE,  # Maximum QoS
    0x25: _BYTE,  # Retain Available
    0x26: _PAIR,  # User Property
    0x27: _U32,  # Maximum Packet Size
    0x28: _BYTE,  # Wildcard Subscription Available
    0x29: _BYTE,  # Subscription Identifier Available
    0x2A: _BYTE,  # Shared Subscription Available
}

PropertyValue = int | str | bytes | tuple[str, str]
# Repeatable properties (User Property, Subscription Identifier) keep their last value: the
# link never needs them, it only has to skip them correctly.
Properties = dict[int, PropertyValue]


@dataclass(frozen=True, slots=True)
class MqttMessage:
    """One received PUBLISH."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    packet_id: int  # 0 for QoS 0
    dup: bool


# A frozen dataclass __init__ goes through object.__setattr__ per field (~1.7 µs for six
# fields); setting the slots through their descriptors builds the same object in ~0.6 µs.
_new_object = object.__new__
_set_topic, _set_payload, _set_qos, _set_retain, _set_packet_id, _set_dup = (
    MqttMessage.__dict__[field].__set__
    for field in ("topic", "payload", "qos", "retain", "packet_id", "dup")
)


def _make_message(
    topic: str, payload: bytes, qos: int, retain: bool, packet_id: int, dup: bool
) -> MqttMessage:
    msg: MqttMessage = _new_object(MqttMessage)
    _set_topic(msg, topic)
    _set_payload(msg, payload)
    _set_qos(msg, qos)
    _set_retain(msg, retain)
    _set_packet_id(msg, packet_id)
    _set_dup(msg, dup)
    return msg


# ---------------------------------------------------------------------------------------------
# Primitives


def encode_varint(value: int) -> bytes:
    """Encode a Variable Byte Integer (0 .. 268,435,455)."""
    if not 0 <= value <= MAX_REMAINING_LENGTH:
        raise ValueError(f"variable byte integer out of range: {value}")
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(buf: bytes, pos: int, end: int | None = None) -> tuple[int, int] | None:
    """Decode a Variable Byte Integer at ``buf[pos:]``.

    Returns ``(value, position after it)``, or None when ``buf`` ends before the integer
    does. Raises `ProtocolError` for an integer longer than four bytes.
    """
    if end is None:
        end = len(buf)
    value = 0
    shift = 0
    for i in range(pos, pos + 4):
        if i >= end:
            return None
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    raise ProtocolError("malformed variable byte integer (more than 4 bytes)")


def _str(value: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise ValueError(f"string too long for MQTT ({len(raw)} bytes)")
    return len(raw).to_bytes(2, "big") + raw


def _bin(value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"binary field too long for MQTT ({len(value)} bytes)")
    return len(value).to_bytes(2, "big") + value


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + encode_varint(len(body)) + body


def encode_properties(props: Iterable[tuple[int, PropertyValue]]) -> bytes:
    """Encode an MQTT 5 property list, length prefix included."""
    parts: list[bytes] = []
    for ident, value in props:
        kind = _PROPERTY_TYPES.get(ident)
        if kind is None:
            raise ValueError(f"unknown MQTT 5 property 0x{ident:02x}")
        parts.append(encode_varint(ident))
        if kind == _PAIR:
            if not isinstance(value, tuple):
                raise TypeError(f"property 0x{ident:02x} needs a (name, value) pair")
            parts.append(_str(value[0]) + _str(value[1]))
        elif kind == _STR:
            if not isinstance(value, str):
                raise TypeError(f"property 0x{ident:02x} needs a str")
            parts.append(_str(value))
        elif kind == _BIN:
            if not isinstance(value, bytes):
                raise TypeError(f"property 0x{ident:02x} needs bytes")
            parts.append(_bin(value))
        else:
            if not isinstance(value, int):
                raise TypeError(f"property 0x{ident:02x} needs an int")
            if kind == _VARINT:
                parts.append(encode_varint(value))
            else:
                parts.append(value.to_bytes({_BYTE: 1, _U16: 2, _U32: 4}[kind], "big"))
    body = b"".join(parts)
    return encode_varint(len(body)) + body


def decode_properties(buf: bytes, pos: int, end: int | None = None) -> tuple[Properties, int]:
    """Decode an MQTT 5 property list (length prefix first) at ``buf[pos:]``.

    Returns the properties and the position after them; raises `ProtocolError` if the list
    is truncated or holds an unknown property.
    """
    if end is None:
        end = len(buf)
    decoded = decode_varint(buf, pos, end)
    if decoded is None:
        raise ProtocolError("truncated property length")
    length, pos = decoded
    stop = pos + length
    if stop > end:
        raise ProtocolError("property list runs past the packet")
    props: Properties = {}
    while pos < stop:
        ident = buf[pos]
        if ident >= 0x80:
            decoded = decode_varint(buf, pos, stop)
            if decoded is None:
                raise ProtocolError("truncated property identifier")
            ident, pos = decoded
        else:
            pos += 1
        kind = _PROPERTY_TYPES.get(ident)
        if kind is None:
            raise ProtocolError(f"unknown MQTT 5 property 0x{ident:02x}")
        value: PropertyValue
        if kind == _BYTE:
            nxt = pos + 1
            value = buf[pos] if nxt <= stop else -1
        elif kind == _U16:
            nxt = pos + 2
            value = int.from_bytes(buf[pos:nxt], "big")
        elif kind == _U32:
            nxt = pos + 4
            value = int.from_bytes(buf[pos:nxt], "big")
        elif kind == _VARINT:
            decoded = decode_varint(buf, pos, stop)
            if decoded is None:
                raise ProtocolError("truncated property")
            value, nxt = decoded
        elif kind == _PAIR:
            name, mid = _read_str(buf, pos, stop)
            text, nxt = _read_str(buf, mid, stop)
            value = (name, text)
        else:
            if pos + 2 > stop:
                raise ProtocolError("truncated property")
            nxt = pos + 2 + int.from_bytes(buf[pos : pos + 2], "big")
            raw = bytes(buf[pos + 2 : nxt])
            value = raw if kind == _BIN else raw.decode("utf-8", "replace")
        if nxt > stop:
            raise ProtocolError(f"truncated property 0x{ident:02x}")
        props[ident] = value
        pos = nxt
    return props, stop


def _read_str(buf: bytes, pos: int, stop: int) -> tuple[str, int]:
    if pos + 2 > stop:
        raise ProtocolError("truncated string")
    nxt = pos + 2 + int.from_bytes(buf[pos : pos + 2], "big")
    if nxt > stop:
        raise ProtocolError("truncated string")
    return bytes(buf[pos + 2 : nxt]).decode("utf-8", "replace"), nxt


def prop_int(props: Properties, ident: int, default: int) -> int:
    """An integer property, or ``default`` when absent."""
    value = props.get(ident)
    return value if isinstance(value, int) else default


# ---------------------------------------------------------------------------------------------
# Encoders


def encode_connect(
    *,
    protocol: int,
    client_id: str,
    keepalive_s: int,
    clean_start: bool,
    session_expiry_s: int = 0,
    receive_maximum: int = 65_535,
    maximum_packet_size: int = 0,
    username: str | None = None,
    password: str | None = None,
    will: tuple[str, bytes, int, bool] | None = None,
) -> bytes:
    """CONNECT. For v3.1.1, ``clean_start`` is the Clean Session flag and the v5-only
    arguments are ignored; ``maximum_packet_size`` 0 means "no limit announced"."""
    if protocol not in (PROTOCOL_V311, PROTOCOL_V5):
        raise ValueError(f"unsupported MQTT protocol level {protocol}")
    flags = 0x02 if clean_start else 0
    payload = [_str(client_id)]
    if will is not None:
        will_topic, will_payload, will_qos, will_retain = will
        flags |= 0x04 | (will_qos << 3) | (0x20 if will_retain else 0)
        if protocol == PROTOCOL_V5:
            payload.append(b"\x00")
        payload.append(_str(will_topic))
        payload.append(_bin(will_payload))
    if username is not None:
        flags |= 0x80
        payload.append(_str(username))
    if password is not None:
        flags |= 0x40
        payload.append(_bin(password.encode("utf-8")))
    header = b"\x00\x04MQTT" + bytes((protocol, flags)) + keepalive_s.to_bytes(2, "big")
    if protocol == PROTOCOL_V5:
        props: list[tuple[int, PropertyValue]] = []
        if session_expiry_s:
            props.append((PROP_SESSION_EXPIRY_INTERVAL, session_expiry_s))
        if receive_maximum != 65_535:
            props.append((PROP_RECEIVE_MAXIMUM, receive_maximum))
        if maximum_packet_size:
            props.append((PROP_MAXIMUM_PACKET_SIZE, maximum_packet_size))
        header += encode_properties(props)
    return _packet(0x10, header + b"".join(payload))


def encode_subscribe(
    packet_id: int, filters: Sequence[tuple[str, int]], protocol: int, *, retain_handling: int = 1
) -> bytes:
    """SUBSCRIBE for all ``(filter, max_qos)`` pairs in one packet.

    v5 subscription options use ``retain_handling`` (default 1: retained messages only when
    the subscription is new, so re-subscribing on every reconnect does not replay them).
    """
    if not filters:
        raise ValueError("SUBSCRIBE needs at least one filter")
    body = [packet_id.to_bytes(2, "big")]
    if protocol == PROTOCOL_V5:
        body.append(b"\x00")
    for topic_filter, qos in filters:
        options = qos | (retain_handling << 4) if protocol == PROTOCOL_V5 else qos
        body.append(_str(topic_filter) + bytes((options,)))
    return _packet(0x82, b"".join(body))


def encode_unsubscribe(packet_id: int, filters: Sequence[str], protocol: int) -> bytes:
    """UNSUBSCRIBE from every filter in ``filters`` in one packet."""
    if not filters:
        raise ValueError("UNSUBSCRIBE needs at least one filter")
    body = [packet_id.to_bytes(2, "big")]
    if protocol == PROTOCOL_V5:
        body.append(b"\x00")
    body.extend(_str(topic_filter) for topic_filter in filters)
    return _packet(0xA2, b"".join(body))


def encode_publish(
    topic: str,
    payload: bytes,
    qos: int,
    retain: bool,
    packet_id: int,
    protocol: int,
    *,
    dup: bool = False,
) -> bytes:
    """PUBLISH (QoS 0 or 1; ``packet_id`` is ignored for QoS 0)."""
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    parts = [_str(topic)]
    if qos:
        parts.append(packet_id.to_bytes(2, "big"))
    if protocol == PROTOCOL_V5:
        parts.append(b"\x00")
    head = b"".join(parts)
    return bytes((first,)) + encode_varint(len(head) + len(payload)) + head + payload


def encode_puback(packet_id: int) -> bytes:
    """PUBACK with reason 0 (v5 may omit the reason code, so v3.1.1 and v5 are the same)."""
    return b"\x40\x02" + packet_id.to_bytes(2, "big")


_PUBACK_HEADER = array.array("H", [0x4002])


def encode_pubacks(packet_ids: Sequence[int]) -> bytes:
    """One PUBACK per id, concatenated (ids must be 1..65535)."""
    count = len(packet_ids)
    words = _PUBACK_HEADER * (2 * count)
    words[1::2] = array.array("H", packet_ids)
    if sys.byteorder == "little":
        words.byteswap()
    return words.tobytes()


# ---------------------------------------------------------------------------------------------
# Decoders for control packets (``body`` is the packet after its fixed header)


@dataclass(frozen=True, slots=True)
class Connack:
    session_present: bool
    reason_code: int
    properties: Properties


def decode_connack(body: bytes, protocol: int) -> Connack:
    """CONNACK: session present flag, reason (v5) or return (v3.1.1) code, properties."""
    if len(body) < 2:
        raise ProtocolError("CONNACK too short")
    props: Properties = {}
    if protocol == PROTOCOL_V5 and len(body) > 2:
        props, _ = decode_properties(body, 2)
    return Connack(bool(body[0] & 0x01), body[1], props)


def decode_suback(body: bytes, protocol: int) -> tuple[int, list[int]]:
    """SUBACK: packet id and one reason code per filter."""
    if len(body) < 3:
        raise ProtocolError("SUBACK too short")
    pos = 2
    if protocol == PROTOCOL_V5:
        _, pos = decode_properties(body, 2)
    return int.from_bytes(body[0:2], "big"), list(body[pos:])


def decode_puback(body: bytes, protocol: int) -> tuple[int, int]:
    """PUBACK: packet id and reason code (0 when omitted)."""
    if len(body) < 2:
        raise ProtocolError("PUBACK too short")
    reason = body[2] if protocol == PROTOCOL_V5 and len(body) > 2 else 0
    return int.from_bytes(body[0:2], "big"), reason


def decode_disconnect(body: bytes, protocol: int) -> tuple[int, str]:
    """DISCONNECT: reason code (0 when omitted) and reason string ("" when absent)."""
    if protocol != PROTOCOL_V5 or not body:
        return 0, ""
    reason_string = ""
    if len(body) > 1:
        props, _ = decode_properties(body, 1)
        text = props.get(PROP_REASON_STRING)
        if isinstance(text, str):
            reason_string = text
    return body[0], reason_string


# ---------------------------------------------------------------------------------------------
# Incremental parser


class PacketParser:
    """Splits a byte stream from the broker into packets.

    `feed` returns the decodable PUBLISH packets of the bytes seen so far, in order. Side
    channels, which the caller drains after each `feed`:

    * `control`: ``(packet type, flags, body)`` of every non-PUBLISH packet;
    * `skipped`: ``(position, packet id)`` of QoS 1 PUBLISHes that will not be delivered
      (topic not UTF-8, or oversized) but must still be acknowledged, in arrival order;
      ``position`` is the index, in the list the same `feed` returned, of the first message
      that arrived after it (PUBACKs must follow the arrival order of all PUBLISHes);
    * `oversized`: ``(topic, remaining length, packet id)`` of PUBLISHes longer than
      ``max_packet_bytes``; their bytes are skipped as they stream in, never buffered;
    * `invalid`: running count of PUBLISHes dropped for a topic that is not UTF-8.

    One parser serves one connection: after a `ProtocolError` it must be discarded.
    """

    __slots__ = (
        "_aliases",
        "_have",
        "_max_packet_bytes",
        "_need",
        "_parts",
        "_skip",
        "_skip_record",
        "_v5",
        "control",
        "invalid",
        "oversized",
        "skipped",
    )

    def __init__(self, protocol: int, max_packet_bytes: int = 1_048_576) -> None:
        if protocol not in (PROTOCOL_V311, PROTOCOL_V5):
            raise ValueError(f"unsupported MQTT protocol level {protocol}")
        self._v5 = protocol == PROTOCOL_V5
        self._max_packet_bytes = max_packet_bytes
        self._parts: list[bytes] = []
        self._have = 0
        self._need = 0
        self._skip = 0
        self._skip_record: tuple[str, int, int] = ("", 0, 0)
        self._aliases: dict[int, str] = {}
        self.control: list[tuple[int, int, bytes]] = []
        self.skipped: list[tuple[int, int]] = []
        self.oversized: list[tuple[str, int, int]] = []
        self.invalid = 0

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for an incomplete packet."""
        return self._have

    def feed(self, data: bytes) -> list[MqttMessage]:
        """Consume one chunk; return the PUBLISH packets it completed."""
        if self._skip:
            if len(data) < self._skip:
                self._skip -= len(data)
                return []
            data = data[self._skip :]
            self._skip = 0
            self.oversized.append(self._skip_record)
            if self._skip_record[2]:
                self.skipped.append((0, self._skip_record[2]))
        if self._parts:
            self._parts.append(data)
            self._have += len(data)
            if self._have < self._need:
                return []
            data = b"".join(self._parts)
            self._parts = []
            self._have = 0

        messages: list[MqttMessage] = []
        append = messages.append
        make = _make_message
        v5 = self._v5
        max_bytes = self._max_packet_bytes
        end = len(data)
        pos = 0
        need = 0
        while True:
            avail = end - pos
            if avail < 2:
                need = 2
                break
            first = data[pos]
            length = data[pos + 1]
            if length < 0x80:
                head_len = 2
            else:
                decoded = decode_varint(data, pos + 1, end)
                if decoded is None:
                    need = avail + 1
                    break
                length, after = decoded
                head_len = after - pos
            total = head_len + length
            if length > max_bytes:
                skipped_to = self._start_skip(data, pos, head_len, length, len(messages))
                if skipped_to < 0:
                    need = -skipped_to
                    break
                pos = skipped_to
                continue
            if avail < total:
                need = total
                break
            if first >> 4 == PUBLISH:
                qos = (first >> 1) & 0x03
                stop = pos + total
                p = pos + head_len
                topic_len = (data[p] << 8) | data[p + 1] if length >= 2 else 0xFFFFFF
                p += 2
                topic_end = p + topic_len
                if qos:
                    if qos != 1:
                        raise ProtocolError(f"PUBLISH with QoS {qos} (we subscribe with QoS <= 1)")
                    if topic_end + 2 > stop:
                        raise ProtocolError("malformed PUBLISH: topic runs past the packet")
                    packet_id = (data[topic_end] << 8) | data[topic_end + 1]
                    if not packet_id:
                        raise ProtocolError("malformed PUBLISH: QoS 1 with packet id 0")
                    p = topic_end + 2
                else:
                    if topic_end > stop:
                        raise ProtocolError("malformed PUBLISH: topic runs past the packet")
                    packet_id = 0
                    p = topic_end
                alias = 0
                if v5:
                    if p >= stop:
                        raise ProtocolError("malformed PUBLISH: missing properties")
                    if data[p] == 0:
                        p += 1
                    else:
                        props, p = decode_properties(data, p, stop)
                        alias = prop_int(props, PROP_TOPIC_ALIAS, 0)
                try:
                    topic = data[pos + head_len + 2 : topic_end].decode()
                except UnicodeDecodeError:
                    self.invalid += 1
                    if packet_id:
                        self.skipped.append((len(messages), packet_id))
                    pos = stop
                    continue
                if alias:
                    topic = self._resolve_alias(alias, topic)
                append(
                    make(
                        topic, data[p:stop], qos, bool(first & 0x01), packet_id, bool(first & 0x08)
                    )
                )
                pos = stop
            else:
                self.control.append((first >> 4, first & 0x0F, data[pos + head_len : pos + total]))
                pos += total
        if pos < end:
            self._parts = [data[pos:] if pos else data]
            self._have = end - pos
            self._need = need
        return messages

    def _resolve_alias(self, alias: int, topic: str) -> str:
        if topic:
            self._aliases[alias] = topic
            return topic
        known = self._aliases.get(alias)
        if known is None:
            raise ProtocolError(f"PUBLISH uses unknown topic alias {alias}")
        return known

    def _start_skip(self, data: bytes, pos: int, head_len: int, length: int, position: int) -> int:
        """Handle a PUBLISH longer than the limit whose fixed header starts at ``pos``
        (``position``: how many messages this `feed` returned before it).

        Returns the position to continue parsing at, or ``-need`` when more bytes are
        needed to read its topic and packet id.
        """
        first = data[pos]
        if first >> 4 != PUBLISH:
            raise ProtocolError(f"packet type {first >> 4} of {length} bytes exceeds the limit")
        qos = (first >> 1) & 0x03
        if qos > 1:
            raise ProtocolError(f"PUBLISH with QoS {qos} (we subscribe with QoS <= 1)")
        p = pos + head_len
        end = len(data)
        if end - p < 2:
            return -(head_len + 2)
        topic_len = (data[p] << 8) | data[p + 1]
        header_len = 2 + topic_len + (2 if qos else 0)
        if header_len > length:
            raise ProtocolError("malformed PUBLISH: topic runs past the packet")
        if end - p < header_len:
            return -(head_len + header_len)
        topic = data[p + 2 : p + 2 + topic_len].decode("utf-8", "replace")
        packet_id = 0
        if qos:
            packet_id = (data[p + 2 + topic_len] << 8) | data[p + 3 + topic_len]
            if not packet_id:
                raise ProtocolError("malformed PUBLISH: QoS 1 with packet id 0")
        record = (topic, length, packet_id)
        total = head_len + length
        if end - pos >= total:
            self.oversized.append(record)
            if packet_id:
                self.skipped.append((position, packet_id))
            return pos + total
        self._skip = total - (end - pos)
        self._skip_record = record
        return end
