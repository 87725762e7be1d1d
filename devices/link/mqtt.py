"""An asyncio-native MQTT 5 / 3.1.1 client link for high-rate QoS 1 ingest with manual acks.

The wire protocol runs on `asyncio.Protocol`: each `data_received` chunk is parsed in one pass
(`PacketParser`) and every complete PUBLISH in it goes to ``on_messages`` as one batch, so the
consumer can commit the batch durably and then `MqttLink.ack` it with a single write.

The supervisor loop (`devices.link.supervisor.LinkSupervisor`, shared with the Modbus link)
owns connecting, reconnecting with capped, jittered backoff, the state and its logging; this
module supplies the session: connect, subscribe, keepalive, serve. Callers never retry: they
watch `MqttLink.watch` or await `MqttLink.wait_up`.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import itertools
import logging
import math
import operator
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from devices.errors import (
    AuthError,
    DeviceConfigError,
    DeviceError,
    DeviceUnavailable,
    ProtocolError,
    SessionTakenOver,
)
from devices.link.backoff import Backoff
from devices.link.mqtt_codec import (
    CONNACK,
    DISCONNECT,
    DISCONNECT_PACKET,
    MAX_PACKET_ID,
    MAX_REMAINING_LENGTH,
    PINGREQ_PACKET,
    PINGRESP,
    PROP_MAXIMUM_PACKET_SIZE,
    PROP_MAXIMUM_QOS,
    PROP_RECEIVE_MAXIMUM,
    PROP_RETAIN_AVAILABLE,
    PROP_SERVER_KEEP_ALIVE,
    PROTOCOL_V5,
    PROTOCOL_V311,
    PUBACK,
    SUBACK,
    UNSUBACK,
    MqttMessage,
    PacketParser,
    Properties,
    decode_connack,
    decode_disconnect,
    decode_puback,
    decode_suback,
    encode_connect,
    encode_pubacks,
    encode_publish,
    encode_subscribe,
    encode_unsubscribe,
    prop_int,
)
from devices.link.supervisor import LinkSupervisor, SessionTasks, describe_error

__all__ = ["AckWindow", "MqttLink", "MqttLinkConfig", "MqttLinkStats", "MqttMessage"]

# CONNACK codes meaning "these credentials will never work" (v5: 0x86, 0x87; v3.1.1: 4, 5).
_AUTH_REFUSED = {PROTOCOL_V5: frozenset({0x86, 0x87}), PROTOCOL_V311: frozenset({0x04, 0x05})}
_PROP_SERVER_REFERENCE = 0x1C
_PROP_REASON_STRING = 0x1F
# CONNACK refusals that no retry can cure: what the broker objects to is in our configuration.
# (Temporary ones, retried: v5 0x80 unspecified, 0x88 unavailable, 0x89 busy, 0x97 quota,
# 0x9C use another server, 0x9F connection rate; v3.1.1 3 server unavailable.)
_V5_PERMANENT = {
    0x01: "it speaks only MQTT 3.1.1 (it answered MQTT 5 with the 3.1.1 code 1): set "
    "[mqtt] protocol = 4",
    0x81: "it found our CONNECT malformed",
    0x82: "it found a protocol error in our CONNECT",
    0x84: "it does not support MQTT 5: set [mqtt] protocol = 4 (3.1.1)",
    0x85: "it does not accept client id {client_id!r}: check [mqtt] client_id against the "
    "broker's rules (characters, length, required prefix, empty ids)",
    0x8A: "it has banned this client",
    0x8C: "it requires an authentication method we do not use (enhanced authentication); "
    "use username/password authentication for this client",
    0x90: "it refuses our will topic",
    0x95: "our CONNECT is larger than its maximum packet size",
    0x99: "it refuses our will payload",
    0x9A: "it does not allow a retained will",
    0x9B: "it does not allow our will's QoS",
    0x9D: "it has moved permanently{reference}: point [mqtt] url at the new server",
}
_V311_PERMANENT = {
    0x01: "it does not accept MQTT 3.1.1: set [mqtt] protocol = 5",
    0x02: "it does not accept client id {client_id!r}: check [mqtt] client_id against the "
    "broker's rules (characters, length, required prefix, empty ids)",
}
_V5_SESSION_TAKEN_OVER = 0x8E
_V5_DISCONNECT_PROTOCOL_ERROR = b"\xe0\x01\x82"
# Fixed header of a packet whose remaining length is at the MQTT maximum.
_MAX_FIXED_HEADER = 5
# MQTT 3.1.1 (and mosquitto 2.0.11 even over v5) signals a session takeover only by closing
# the old connection. Two clients sharing an id then evict each other in turn, forever. We
# call it a takeover when the broker cleanly closes this many connections in a row, each
# within the window after accepting it, with every reconnect accepted at the first attempt
# (a restarting broker refuses at least one attempt). The client evicted first reaches the
# count first and stops; the other one keeps the session.
_EVICTIONS_BEFORE_TAKEOVER = 3
_EVICTION_WINDOW_S = 10.0
_payload = operator.attrgetter("payload")

# The arrival rate that `MqttLinkConfig.coalesce_from_msg_s` is compared with is measured over
# windows of this length.
_RATE_WINDOW_S = 0.1


@dataclass(frozen=True, slots=True)
class MqttLinkConfig:
    """Connection settings of one `MqttLink`; checked when the link is built."""

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = "floorhand"
    username: str | None = None
    password: str | None = None
    ssl_context: ssl.SSLContext | None = None
    protocol: int = 5  # 5, or 4 for MQTT 3.1.1
    keepalive_s: float = 10.0
    session_expiry_s: int = 3600  # v5 Session Expiry Interval; v3.1.1: >0 means Clean Session 0
    clean_start: bool = False
    receive_maximum: int = 2000  # v5 window of unacked QoS 1 messages the broker may send us
    subscriptions: tuple[tuple[str, int], ...] = ()  # (topic filter, max QoS)
    connect_timeout_s: float = 5.0
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 2.0
    backoff_reset_after_s: float = 10.0
    """A connection must stay up this long before the reconnect backoff starts again from
    ``backoff_initial_s``; one that ends sooner (a server DISCONNECT or a close right after
    CONNACK) is followed by the next, longer delay, as a failed connect is."""
    max_packet_bytes: int = 1_048_576  # larger PUBLISHes are skipped, acked, reported
    max_queued_publishes: int = 10_000  # bound of the outgoing queue while down
    max_batch: int = 1024
    """Most messages handed to ``on_messages`` in one call. A socket read can hold thousands
    (a backlog after a reconnect); the rest is handed over in the next loop iterations, with
    reading paused meanwhile, so one read never holds the event loop for long."""
    max_batch_bytes: int = 262_144
    """Most payload bytes handed to ``on_messages`` in one call (at least one message): the
    consumer's work follows the bytes more than the messages (a message may carry 50
    readings, so ``max_batch`` of them would be 51,200)."""
    coalesce_s: float = 0.0
    """Under load, the longest a small read is held so that later reads join it: one larger
    call of ``on_messages`` costs the consumer less per message than several small ones (a
    journal commit per call). A read is held only while messages arrive faster than
    ``coalesce_from_msg_s`` and the held reads are smaller than ``coalesce_bytes``; 0 never
    holds (every read is handed over at once)."""
    coalesce_bytes: int = 16_384
    """Held reads are handed over as soon as they reach this many bytes together."""
    coalesce_from_msg_s: float = 8_000.0
    """The arrival rate (messages/s, measured over the last ~0.1 s) from which reads are
    held; below it every read is handed over at once."""
    will: tuple[str, bytes, int, bool] | None = None  # (topic, payload, qos, retain)

    def reconnect_backoff(self) -> Backoff:
        """The reconnect schedule: ``backoff_initial_s`` doubling to ``backoff_max_s``, 20 %
        jitter, reset only by a connection that stayed up ``backoff_reset_after_s``."""
        return Backoff(
            self.backoff_initial_s, self.backoff_max_s, reset_after_s=self.backoff_reset_after_s
        )


@dataclass(slots=True)
class MqttLinkStats:
    """Counters of one link (monotonic over its lifetime)."""

    connects: int = 0
    disconnects: int = 0
    messages_in: int = 0
    bytes_in: int = 0
    acks_sent: int = 0
    publishes_out: int = 0
    publish_acked: int = 0
    dropped_publishes: int = 0
    pings: int = 0
    last_rx_monotonic: float = 0.0
    invalid_in: int = 0  # PUBLISHes whose topic is not UTF-8: acked, not delivered
    oversize_in: int = 0  # PUBLISHes above max_packet_bytes: acked, reported, not delivered
    callback_errors: int = 0  # on_messages raised: batch not acked, connection closed
    publish_errors: int = 0  # PUBACK with a failure reason code, or a packet the broker refuses
    qos_downgraded: int = 0  # QoS 1 publishes sent as QoS 0: the broker's Maximum QoS is 0
    retain_dropped: int = 0  # retained publishes sent without retain: Retain Available is 0
    unsubacks: int = 0  # UNSUBACKs received (`MqttLink.unsubscribe`)
    reads_held: int = 0  # reads held under load for later ones to join (`coalesce_s`)


def _check_config(cfg: MqttLinkConfig) -> None:
    def bad(field: str, why: str) -> DeviceConfigError:
        return DeviceConfigError(f"mqtt config {field}: {why}")

    if cfg.protocol not in (PROTOCOL_V5, PROTOCOL_V311):
        raise bad("protocol", f"must be 5 or 4 (3.1.1), got {cfg.protocol}")
    if not 0 < cfg.port < 65536:
        raise bad("port", f"out of range: {cfg.port}")
    if len(cfg.client_id.encode("utf-8")) > 0xFFFF:
        raise bad("client_id", "longer than 65535 bytes")
    if not cfg.client_id and not cfg.clean_start:
        raise bad("client_id", "a persistent session needs a non-empty client id")
    if cfg.protocol == PROTOCOL_V311 and cfg.password is not None and cfg.username is None:
        raise bad("password", "MQTT 3.1.1 does not allow a password without a username")
    if not 0 < cfg.keepalive_s <= 0xFFFF:
        raise bad("keepalive_s", f"must be in (0, 65535], got {cfg.keepalive_s}")
    if not 0 <= cfg.session_expiry_s <= 0xFFFFFFFF:
        raise bad("session_expiry_s", f"out of range: {cfg.session_expiry_s}")
    if not 0 < cfg.receive_maximum <= 0xFFFF:
        raise bad("receive_maximum", f"must be in 1..65535, got {cfg.receive_maximum}")
    if cfg.connect_timeout_s <= 0:
        raise bad("connect_timeout_s", "must be > 0")
    if not 0 < cfg.backoff_initial_s <= cfg.backoff_max_s:
        raise bad("backoff_initial_s", "need 0 < backoff_initial_s <= backoff_max_s")
    if not cfg.backoff_reset_after_s >= 0:
        raise bad("backoff_reset_after_s", "must be >= 0")
    if not 16 <= cfg.max_packet_bytes <= MAX_REMAINING_LENGTH:
        raise bad("max_packet_bytes", f"must be in 16..{MAX_REMAINING_LENGTH}")
    if cfg.max_queued_publishes < 0:
        raise bad("max_queued_publishes", "must be >= 0")
    if cfg.max_batch < 1:
        raise bad("max_batch", "must be >= 1")
    if cfg.max_batch_bytes < 1:
        raise bad("max_batch_bytes", "must be >= 1")
    if not 0 <= cfg.coalesce_s <= 1:
        raise bad("coalesce_s", f"must be in [0, 1], got {cfg.coalesce_s}")
    if cfg.coalesce_bytes < 1:
        raise bad("coalesce_bytes", "must be >= 1")
    if not cfg.coalesce_from_msg_s >= 0:
        raise bad("coalesce_from_msg_s", "must be >= 0")
    for index, (topic_filter, qos) in enumerate(cfg.subscriptions):
        if not topic_filter or len(topic_filter.encode("utf-8")) > 0xFFFF:
            raise bad(f"subscriptions[{index}]", f"invalid topic filter {topic_filter!r}")
        if qos not in (0, 1, 2):
            raise bad(f"subscriptions[{index}]", f"QoS must be 0, 1 or 2, got {qos}")
    if cfg.will is not None:
        will_topic, _, will_qos, _ = cfg.will
        if not will_topic or "+" in will_topic or "#" in will_topic:
            raise bad("will", f"invalid will topic {will_topic!r}")
        if will_qos not in (0, 1, 2):
            raise bad("will", f"QoS must be 0, 1 or 2, got {will_qos}")


class AckWindow:
    """The PUBACK order of one connection (MQTT 5 and 3.1.1 §4.6: PUBACKs in the order the
    PUBLISHes arrived): QoS 1 packet ids in arrival order; acks given in any order are held
    until they form a contiguous run at the head, which `ack` and `release` return.

    A broker without a receive maximum (3.1.1) may reuse an id that is still unacked, so an id
    can stand more than once: the extra copies are counted apart, and any ack of that id
    settles one copy (on the wire they are indistinguishable anyway).
    """

    __slots__ = ("_arrivals", "_done", "_extra", "_pending")

    def __init__(self) -> None:
        self._arrivals: deque[int] = deque()  # ids whose PUBACK is not sent yet, in order
        self._pending: set[int] = set()  # waiting for the consumer's ack
        self._extra: collections.Counter[int] = collections.Counter()  # more pending copies
        self._done: collections.Counter[int] = collections.Counter()  # acked, held back

    @property
    def held(self) -> int:
        """Acks given but not sent: they wait for an earlier message's ack."""
        return self._done.total()

    def clear(self) -> None:
        self._arrivals.clear()
        self._pending.clear()
        self._extra.clear()
        self._done.clear()

    def arrive(self, packet_ids: Sequence[int]) -> None:
        """Record delivered QoS 1 ids (no zeros) in arrival order."""
        self._arrivals.extend(packet_ids)
        pending = self._pending
        if pending.isdisjoint(packet_ids):
            before = len(pending)
            pending.update(packet_ids)
            if len(pending) - before == len(packet_ids):
                return
            repeated = collections.Counter(packet_ids)
            self._extra.update({pid: n - 1 for pid, n in repeated.items() if n > 1})
            return
        for pid in packet_ids:
            if pid in pending:
                self._extra[pid] += 1
            else:
                pending.add(pid)

    def arrive_acked(self, packet_id: int) -> None:
        """Record an id that needs no consumer ack (skipped by the link), in its place."""
        self._arrivals.append(packet_id)
        self._done[packet_id] += 1

    def ack(self, packet_ids: Sequence[int]) -> list[int]:
        """Mark ids acked; return the ids whose PUBACK may go out now, in arrival order.
        Ids not pending (never delivered, already acked) are ignored."""
        arrivals = self._arrivals
        pending = self._pending
        n = len(packet_ids)
        if (
            n
            and not self._done
            and not self._extra
            and n <= len(arrivals)
            and arrivals[0] == packet_ids[0]
            and list(itertools.islice(arrivals, n)) == list(packet_ids)
        ):
            # The common case, a consumer acking what it got in order: all pending, no copies.
            pending.difference_update(packet_ids)
            popleft = arrivals.popleft
            for _ in range(n):
                popleft()
            return list(packet_ids)
        extra = self._extra
        done = self._done
        marked = False
        for pid in packet_ids:
            if pid in extra:
                extra[pid] -= 1
                if not extra[pid]:
                    del extra[pid]
            elif pid in pending:
                pending.discard(pid)
            else:
                continue
            done[pid] += 1
            marked = True
        return self.release() if marked else []

    def release(self) -> list[int]:
        """Remove and return the acked run at the head of the arrival order."""
        arrivals = self._arrivals
        done = self._done
        out: list[int] = []
        while arrivals:
            pid = arrivals[0]
            n = done.get(pid)
            if not n:
                break
            if n == 1:
                del done[pid]
            else:
                done[pid] = n - 1
            arrivals.popleft()
            out.append(pid)
        return out


class _Connection(asyncio.Protocol):
    """One TCP/TLS connection to the broker; forwards everything to its link."""

    def __init__(self, link: MqttLink, parser: PacketParser, tasks: SessionTasks) -> None:
        self.link = link
        self.parser = parser
        self.tasks = tasks
        self.transport: asyncio.Transport | None = None
        self.connected = False  # CONNACK accepted: acks and publishes may be written
        self.up = False  # SUBACK received
        self.closing = False
        self.evicted = False  # the broker closed it cleanly while we were connected
        self.close_reason = ""
        self.fatal: DeviceError | None = None
        self.expect_type = 0
        self.expect_fut: asyncio.Future[bytes] | None = None
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        # The session's timers, as tasks of the session (`SessionTasks`): cancelled when the
        # connection ends, awaited by `MqttLink._finish`, so a closed link leaves none behind.
        self.keepalive: asyncio.Task[None] | None = None
        self.linger: asyncio.Task[None] | None = None
        self.keepalive_s = 0.0
        self.last_ping = 0.0
        self.backlog: collections.deque[MqttMessage] = collections.deque()
        self.draining = False  # a backlog hand-over is scheduled
        self.held: list[MqttMessage] = []  # small reads held under load (`coalesce_s`)
        self.held_bytes = 0
        self.hold: asyncio.TimerHandle | None = None  # hands `held` over when it fires

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.link._on_connection_made(self)

    def data_received(self, data: bytes) -> None:
        self.link._on_data(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.link._on_connection_lost(self, exc)

    def expect(self, packet_type: int) -> asyncio.Future[bytes]:
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.expect_type = packet_type
        self.expect_fut = fut
        return fut


class MqttLink(LinkSupervisor):
    """A supervised MQTT client connection with manual QoS 1 acknowledgement.

    ``on_messages`` is called synchronously from the transport's data callback with every
    complete PUBLISH of one received chunk. It may call `ack` itself (e.g. after a group
    commit), in any order: the link sends the PUBACKs in arrival order (see `ack`). If it
    raises, the batch is logged, counted and not acked, and the link reconnects so the broker
    redelivers it (acks must keep arrival order, so nothing after it could be acked).
    ``on_oversize(topic, size)`` reports PUBLISHes whose remaining length exceeds
    ``max_packet_bytes``; they are skipped and acked in their place.

    `run` raises `SessionTakenOver`, `AuthError` or `DeviceConfigError` (refused
    credentials or configuration, a refused subscription) without reconnecting.
    """

    _fatal_errors = (AuthError, DeviceConfigError, SessionTakenOver)

    def __init__(
        self,
        config: MqttLinkConfig,
        on_messages: Callable[[list[MqttMessage]], None],
        *,
        name: str = "mqtt",
        on_oversize: Callable[[str, int], None] | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        _check_config(config)
        super().__init__(
            name=name,
            endpoint=f"{config.host}:{config.port}",
            logger=logger if logger is not None else logging.getLogger(__name__),
        )
        self._config = config
        self._on_messages = on_messages
        self._on_oversize = on_oversize
        self.stats = MqttLinkStats()
        self.session_present = False
        self.server_max_qos = 2
        """Maximum QoS the broker accepts from us (MQTT 5 CONNACK; 2 when not announced)."""
        self.retain_available = True
        """Whether the broker accepts retained publishes (MQTT 5 CONNACK; True when absent)."""
        self.granted_qos: dict[str, int] = {}
        """QoS the broker granted to each subscription at the last SUBACK."""
        self._connack_warnings: list[str] = []
        self._suback_warnings: list[str] = []
        self._subscriptions = tuple((flt, min(qos, 1)) for flt, qos in config.subscriptions)
        self._will = config.will  # as the broker takes it (see `_refusal`)
        self._will_warnings: list[str] = []
        self._connect_packet = self._encode_connect()
        self._conn: _Connection | None = None  # from the TCP connect until it is lost
        self._session_conn: _Connection | None = None  # of the current attempt
        self._evictions = 0  # clean closes right after an accept, in a row (`_count_eviction`)
        self._acks = AckWindow()  # of the current connection
        self._inflight: dict[int, bytes] = {}
        self._queue: deque[tuple[str, bytes, int, bool]] = deque()
        self._queued_qos0 = 0
        self._next_packet_id = 1
        self._send_window = MAX_PACKET_ID - 1
        self._server_max_packet = 0
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._paused = False
        self._logged_queue_full = False
        self.arrival_rate = 0.0
        """Messages/s received over the last ~0.1 s (measured while ``coalesce_s`` is set)."""
        self._rate_since = 0.0
        self._rate_n = 0

    def _encode_connect(self) -> bytes:
        config = self._config
        return encode_connect(
            protocol=config.protocol,
            client_id=config.client_id,
            keepalive_s=min(0xFFFF, max(1, math.ceil(config.keepalive_s))),
            clean_start=config.clean_start
            or (config.protocol == PROTOCOL_V311 and config.session_expiry_s == 0),
            session_expiry_s=config.session_expiry_s,
            receive_maximum=config.receive_maximum,
            maximum_packet_size=min(config.max_packet_bytes + _MAX_FIXED_HEADER, 0xFFFFFFFF),
            username=config.username,
            password=config.password,
            will=self._will,
        )

    # -- public surface -------------------------------------------------------------------

    @property
    def config(self) -> MqttLinkConfig:
        return self._config

    @property
    def warnings(self) -> list[str]:
        """Guarantees the broker weakened on the current (or last) connection: a Maximum QoS
        of 0, no retained messages, a subscription granted a lower QoS than asked."""
        return self._will_warnings + self._connack_warnings + self._suback_warnings

    @property
    def epoch(self) -> int:
        """Deprecated alias of `connection_number` (still read by the controller's runtime and
        ingest service and by ``controller.ports``' link port).

        Packet ids are only meaningful within one connection. A consumer that acks after an
        ``await`` should read the connection number inside ``on_messages`` and pass it to
        `ack`, so a late ack cannot acknowledge a different message that reuses the id after
        a reconnect.
        """
        return self._connection_number

    @property
    def inflight_publishes(self) -> int:
        """Outgoing QoS 1 publishes sent and not yet PUBACKed."""
        return len(self._inflight)

    @property
    def queued_publishes(self) -> int:
        """Outgoing publishes waiting for the link (or for the broker's receive window)."""
        return len(self._queue)

    # -- the session (driven by `LinkSupervisor.run`) ---------------------------------------

    def _reconnect_backoff(self) -> Backoff:
        return self._config.reconnect_backoff()

    async def _open_session(self, tasks: SessionTasks) -> None:
        cfg = self._config
        conn = _Connection(self, PacketParser(cfg.protocol, cfg.max_packet_bytes), tasks)
        self._session_conn = conn
        await self._handshake(conn)

    async def _serve_session(self, tasks: SessionTasks) -> str:
        conn = self._session_conn
        assert conn is not None
        reason = await conn.closed
        accepted_at_once = self._attempts_before_up == 0
        self._evictions = self._count_eviction(conn, accepted_at_once, self._evictions)
        if conn.fatal is not None:
            self._evictions = 0
            raise conn.fatal
        return reason

    async def _close_session(self, reason: str) -> None:
        conn, self._session_conn = self._session_conn, None
        if conn is None:
            return
        if not conn.closing:
            # Cancellation is our shutdown: leave politely so the broker keeps the session
            # and does not publish the will.
            self._close(conn, reason, polite=True)
        await self._finish(conn)

    async def _stop_session(self) -> None:
        """Send DISCONNECT (reason 0: the session is kept) and wait for the close."""
        conn = self._conn
        if conn is None:
            return
        if not conn.closing:
            self._close(conn, "disconnect requested", polite=True)
        try:
            async with asyncio.timeout(self._config.connect_timeout_s + 1.0):
                await asyncio.shield(conn.closed)
        except TimeoutError:
            if conn.transport is not None:
                conn.transport.abort()

    def _describe_failure(self, exc: Exception) -> tuple[str, int]:
        reason = _describe(exc)
        if (
            self._config.ssl_context is not None
            and "TLS" not in reason
            and reason.startswith(("connection lost", "connection closed"))
        ):
            # A broker refusing our client certificate (or its absence) often just resets
            # the connection before its TLS alert can be read.
            reason = (
                f"{reason} (TLS handshake failed? a broker that requires a client "
                "certificate closes the connection like this: check [mqtt.tls] cert_file "
                "and key_file)"
            )
        # A TLS failure is a configuration problem more often than a network one.
        return reason, logging.ERROR if "TLS handshake failed" in reason else logging.WARNING

    def _up_note(self, first: bool) -> tuple[int, str]:
        cfg = self._config
        if first:
            version = "5" if cfg.protocol == PROTOCOL_V5 else "3.1.1"
            return logging.INFO, f", MQTT {version}, session present: {self.session_present}"
        if not cfg.clean_start and not self.session_present:
            return logging.WARNING, ": the broker did not keep our session"
        return logging.INFO, ""

    def _on_up(self) -> None:
        self._logged_queue_full = False

    def _count_eviction(self, conn: _Connection, accepted_at_once: bool, evictions: int) -> int:
        """The count of evictions in a row after ``conn`` ended; at the threshold ``conn``
        gets a fatal `SessionTakenOver`."""
        if conn.fatal is not None or not conn.evicted or not accepted_at_once:
            return 0
        if time.monotonic() - self.watch.since < _EVICTION_WINDOW_S:
            evictions += 1
        else:
            evictions = 1
        if evictions >= _EVICTIONS_BEFORE_TAKEOVER:
            cfg = self._config
            other = ""
            if self._inflight and cfg.protocol == PROTOCOL_V311:
                # 3.1.1 cannot say why; a refused publish looks the same.
                other = (
                    ", or the broker refuses a publish of ours that is "
                    "re-sent after every connect (QoS 1 above its max_qos, a "
                    "retained message it does not allow, a topic it denies)"
                )
            conn.fatal = SessionTakenOver(
                f"{self.name}: the broker closed the connection right after "
                f"accepting it {evictions} times in a row: another client is "
                f"probably using client id {cfg.client_id!r}{other}"
            )
        return evictions

    async def _finish(self, conn: _Connection) -> None:
        """Wait until ``conn`` is closed and its timer tasks have ended, so a session leaves
        nothing behind. A polite close waits for the broker's close at most the linger
        (``connect_timeout_s``), any close at most a second more; a cancellation meanwhile
        aborts the connection at once, and is raised again once its tasks are gone."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.connect_timeout_s + 1.0
        cancelled = False
        while True:
            pending = [
                f
                for f in (conn.closed, conn.keepalive, conn.linger)
                if f is not None and not f.done()
            ]
            if not pending:
                break
            try:
                await asyncio.wait(pending, timeout=max(0.0, deadline - loop.time()))
            except asyncio.CancelledError:
                cancelled = True
                deadline = 0.0
            if deadline <= loop.time() and conn.transport is not None:
                conn.transport.abort()  # connection_lost follows and ends the tasks
        if cancelled:
            raise asyncio.CancelledError

    def ack(self, packet_ids: Sequence[int], epoch: int | None = None) -> None:
        """Acknowledge these QoS 1 packet ids, in any order.

        PUBACKs go out in the order the PUBLISHes arrived (MQTT 5 and 3.1.1 §4.6): an ack is
        held until every message that arrived before it on this connection was acked too,
        then the whole contiguous run is written at once. Ids of 0, ids not delivered on the
        current connection or already acked, and (when given) an ``epoch`` other than the
        current one are ignored; when the link is down nothing is sent: the broker
        redelivers. ``epoch`` is a `connection_number` (the parameter keeps its old name:
        ``controller.ports`` declares it so).
        """
        conn = self._conn
        if (
            conn is None
            or not conn.connected
            or (epoch is not None and epoch != self._connection_number)
        ):
            return
        out = self._acks.ack(packet_ids)
        if out:
            self._write_acks(conn, out)

    @property
    def acks_held(self) -> int:
        """Acks given but not yet sent: they wait for an earlier message's ack."""
        return self._acks.held

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Send a PUBLISH without waiting (QoS 0 or 1).

        QoS 1 stays in flight until PUBACKed and is re-sent after a reconnect. While the link
        is down publishes are queued; when the queue is full the oldest queued QoS 0 publish
        is dropped, and if there is none the new publish is rejected with `DeviceUnavailable`
        (both counted in ``stats.dropped_publishes``).
        """
        if qos not in (0, 1):
            raise ValueError(f"{self.name}: publish supports QoS 0 and 1, got {qos}")
        if not topic or "+" in topic or "#" in topic:
            raise ValueError(f"{self.name}: invalid topic name {topic!r}")
        conn = self._conn
        if (
            conn is not None
            and conn.connected
            and not self._queue
            and (qos == 0 or len(self._inflight) < self._send_window)
        ):
            packet = self._encode_publish(topic, payload, qos, retain)
            if packet is not None:
                assert conn.transport is not None
                conn.transport.write(packet)
            return
        self._enqueue(topic, payload, qos, retain)

    def unsubscribe(self, topic_filters: Sequence[str]) -> bool:
        """Send UNSUBSCRIBE for ``topic_filters`` on the current connection, without waiting
        for the UNSUBACK (a filter the session does not hold is answered all the same);
        whether it was sent (False while the link is down). Filters of the link's own
        ``subscriptions`` come back at the next connect."""
        conn = self._conn
        if not topic_filters or conn is None or not conn.connected or conn.transport is None:
            return False
        packet = encode_unsubscribe(
            self._allocate_packet_id(), topic_filters, self._config.protocol
        )
        conn.transport.write(packet)
        return True

    def pause_reading(self) -> None:
        """Stop reading from the broker (backpressure) until `resume_reading`.

        Stays in force across reconnects (reading resumes only for each handshake). While
        paused the keepalive does not declare the link dead for lack of incoming data.
        """
        self._paused = True
        conn = self._conn
        if conn is not None and conn.up and conn.transport is not None and not conn.closing:
            conn.transport.pause_reading()

    def resume_reading(self) -> None:
        """Undo `pause_reading`."""
        if not self._paused:
            return
        self._paused = False
        self.stats.last_rx_monotonic = time.monotonic()
        conn = self._conn
        if conn is not None and conn.transport is not None and not conn.closing:
            conn.transport.resume_reading()

    async def drain_publishes(self, timeout_s: float) -> bool:
        """Wait until every QoS 1 publish was PUBACKed; False if ``timeout_s`` passed first."""
        if self._drained():
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(fut)
        try:
            async with asyncio.timeout(timeout_s):
                await fut
            return True
        except TimeoutError:
            return False
        finally:
            if fut in self._drain_waiters:
                self._drain_waiters.remove(fut)

    # -- supervisor helpers ---------------------------------------------------------------

    async def _handshake(self, conn: _Connection) -> None:
        """Connect ``conn``, CONNECT and SUBSCRIBE; raise if it is not up at the end (it is
        closed then)."""
        cfg = self._config
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(cfg.connect_timeout_s):
                await loop.create_connection(
                    lambda: conn,
                    cfg.host,
                    cfg.port,
                    ssl=cfg.ssl_context,
                    server_hostname=cfg.host if cfg.ssl_context is not None else None,
                )
                assert conn.transport is not None
                if self._closing:
                    raise DeviceUnavailable("disconnect requested")
                connack = conn.expect(CONNACK)
                conn.transport.write(self._connect_packet)
                await connack
            if self._subscriptions and not conn.closing:
                suback = conn.expect(SUBACK)
                packet_id = self._allocate_packet_id()
                assert conn.transport is not None
                conn.transport.write(encode_subscribe(packet_id, self._subscriptions, cfg.protocol))
                await self._await_while_receiving(suback, cfg.connect_timeout_s)
        except TimeoutError:
            self._close(conn, "handshake timed out", abort=True)
            raise TimeoutError(
                f"no answer from {cfg.host}:{cfg.port} within {cfg.connect_timeout_s:g} s"
            ) from None
        except BaseException:
            self._close(conn, "handshake failed", abort=True)
            raise
        if self._closing:
            self._close(conn, "disconnect requested", polite=True)
        if conn.closing:
            raise DeviceUnavailable(conn.close_reason or "connection closed during handshake")
        conn.up = True
        if self._paused and conn.transport is not None:
            conn.transport.pause_reading()

    async def _await_while_receiving(self, fut: asyncio.Future[bytes], timeout_s: float) -> None:
        """Wait for ``fut`` while the broker keeps talking. A resumed session's backlog can
        arrive before the SUBACK (mosquitto sends queued messages first): that traffic proves
        the link alive, so the deadline runs from the last byte received, not from the
        request. Aborting here would drop the backlog's QoS 0 messages and reconnect for
        nothing."""
        while True:
            done, _ = await asyncio.wait({fut}, timeout=timeout_s)
            if done:
                fut.result()
                return
            if time.monotonic() - self.stats.last_rx_monotonic > timeout_s:
                raise TimeoutError

    # -- protocol callbacks ---------------------------------------------------------------

    def _on_connection_made(self, conn: _Connection) -> None:
        self._conn = conn
        self._acks.clear()
        self.stats.last_rx_monotonic = time.monotonic()

    def _on_connection_lost(self, conn: _Connection, exc: Exception | None) -> None:
        if conn.keepalive is not None:
            conn.keepalive.cancel()
        if conn.linger is not None:
            conn.linger.cancel()
        if not conn.closing:
            self._release(conn)
            conn.closing = True
            conn.evicted = exc is None and conn.connected
            conn.close_reason = (
                f"connection lost: {_describe(exc)}" if exc else "connection closed by the broker"
            )
        if conn.connected:
            self.stats.disconnects += 1
        conn.connected = False
        if self._conn is conn:
            self._conn = None
        fut = conn.expect_fut
        if fut is not None and not fut.done():
            fut.set_exception(conn.fatal or DeviceUnavailable(conn.close_reason))
        if not conn.closed.done():
            conn.closed.set_result(conn.close_reason)

    def _close(
        self, conn: _Connection, reason: str, *, abort: bool = False, polite: bool = False
    ) -> None:
        """Close ``conn`` for ``reason``; `_on_connection_lost` finishes the bookkeeping."""
        if conn.closing:
            return
        self._release(conn)
        if conn.closing:  # the consumer failed on them and closed it
            return
        conn.closing = True
        conn.close_reason = reason
        transport = conn.transport
        was_connected = conn.connected
        conn.connected = False
        if conn.keepalive is not None:
            conn.keepalive.cancel()
        if polite and was_connected and transport is not None:
            transport.write(DISCONNECT_PACKET)
            # Let the broker close first. Closing now would make our kernel answer anything
            # the broker still sends with a RST, and a RST discards whatever the broker has
            # not read yet: our last PUBACKs (redelivered next session) and the DISCONNECT.
            if transport.can_write_eof():
                transport.write_eof()
            transport.resume_reading()  # the broker's EOF must be read even if paused
            conn.linger = conn.tasks.spawn(f"{self.name}.linger", self._linger, transport)
            return
        if transport is None:
            if not conn.closed.done():
                conn.closed.set_result(reason)
            return
        if abort:
            transport.abort()
        else:
            transport.close()

    async def _linger(self, transport: asyncio.Transport) -> None:
        """After a polite close: abort if the broker has not closed within the connect
        timeout (cancelled when it does)."""
        await asyncio.sleep(self._config.connect_timeout_s)
        transport.abort()

    def _protocol_error(self, conn: _Connection, exc: ProtocolError) -> None:
        if conn.closing:
            return
        self._log.error("%s protocol error from the broker: %s", self.name, exc)
        if self._config.protocol == PROTOCOL_V5 and conn.transport is not None:
            conn.transport.write(_V5_DISCONNECT_PROTOCOL_ERROR)
        self._close(conn, f"protocol error: {exc}")

    def _on_data(self, conn: _Connection, data: bytes) -> None:
        if conn.closing:
            return
        stats = self.stats
        stats.bytes_in += len(data)
        now = stats.last_rx_monotonic = time.monotonic()
        parser = conn.parser
        try:
            messages = parser.feed(data)
            if parser.control:
                control = parser.control
                parser.control = []
                for packet_type, flags, body in control:
                    self._on_control(conn, packet_type, flags, body)
        except ProtocolError as exc:
            self._protocol_error(conn, exc)
            return
        if conn.closing:
            return
        if messages or parser.skipped:
            self._arrive(messages, parser)
        if messages:
            stats.messages_in += len(messages)
            if not (self._config.coalesce_s and self._held(conn, messages, len(data), now)):
                self._hand_over(conn, messages)
        if parser.oversized or parser.invalid:
            self._on_undeliverable(parser)

    def _hand_over(self, conn: _Connection, messages: list[MqttMessage]) -> None:
        first: list[MqttMessage] = []
        if not conn.backlog:
            n = self._slice_len(messages)
            if n == len(messages):
                self._deliver(conn, messages)
                return
            first = messages[:n]
        # Keep arrival order behind an earlier backlog; hand over a slice now and the rest in
        # later loop iterations, not reading more meanwhile.
        conn.backlog.extend(messages[len(first) :])
        if first:
            self._deliver(conn, first)
        if conn.backlog and not conn.draining:
            conn.draining = True
            if conn.transport is not None:
                conn.transport.pause_reading()
            asyncio.get_running_loop().call_soon(self._drain_backlog, conn)

    def _slice_len(self, messages: Sequence[MqttMessage] | deque[MqttMessage]) -> int:
        """How many of the first ``messages`` one call of ``on_messages`` takes: at most
        ``max_batch`` of them and ``max_batch_bytes`` of payload, at least one."""
        config = self._config
        n = min(len(messages), config.max_batch)
        if not n:
            return 0
        sizes = list(itertools.accumulate(map(len, map(_payload, itertools.islice(messages, n)))))
        return max(1, min(n, bisect.bisect_right(sizes, config.max_batch_bytes)))

    def _held(self, conn: _Connection, messages: list[MqttMessage], size: int, now: float) -> bool:
        """Hold a small read under load (``coalesce_s``), or add it to the held ones; True if
        it is held. Arrival order is kept: while reads are held, every read joins them."""
        config = self._config
        self._rate_n += len(messages)
        span = now - self._rate_since
        if span >= _RATE_WINDOW_S:
            self.arrival_rate = self._rate_n / span
            self._rate_since = now
            self._rate_n = 0
        held = conn.held
        if held:
            held.extend(messages)
            conn.held_bytes += size
            if conn.held_bytes >= config.coalesce_bytes or len(held) >= config.max_batch:
                self._release(conn)
            return True
        if (
            self.arrival_rate < config.coalesce_from_msg_s
            or size >= config.coalesce_bytes
            or len(messages) >= config.max_batch
            or conn.backlog
        ):
            return False
        conn.held = messages
        conn.held_bytes = size
        conn.hold = asyncio.get_running_loop().call_later(config.coalesce_s, self._release, conn)
        self.stats.reads_held += 1
        return True

    def _drop_held(self, conn: _Connection) -> None:
        """Forget the held reads (the consumer failed: they are not acked, the broker sends
        them again) and their timer."""
        if conn.hold is not None:
            conn.hold.cancel()
            conn.hold = None
        conn.held = []
        conn.held_bytes = 0

    def _release(self, conn: _Connection) -> None:
        """Hand the held reads over (the hold's time is up, they are large enough, or the
        connection is closing: they were received, so they are delivered)."""
        held = conn.held
        self._drop_held(conn)
        if held:
            self._hand_over(conn, held)

    def _arrive(self, messages: list[MqttMessage], parser: PacketParser) -> None:
        """Record the QoS 1 packet ids of one read in arrival order; skipped ones (oversized,
        topic not UTF-8) count as acked at once, in their place."""
        acks = self._acks
        skipped = parser.skipped
        if not skipped:
            acks.arrive([m.packet_id for m in messages if m.packet_id])
            return
        parser.skipped = []
        at = 0
        for position, packet_id in skipped:
            acks.arrive([m.packet_id for m in messages[at:position] if m.packet_id])
            acks.arrive_acked(packet_id)
            at = max(at, position)
        acks.arrive([m.packet_id for m in messages[at:] if m.packet_id])
        conn = self._conn
        if conn is not None and conn.connected:
            out = acks.release()
            if out:
                self._write_acks(conn, out)

    def _write_acks(self, conn: _Connection, packet_ids: list[int]) -> None:
        assert conn.transport is not None
        conn.transport.write(encode_pubacks(packet_ids))
        self.stats.acks_sent += len(packet_ids)

    def _deliver(self, conn: _Connection, messages: list[MqttMessage]) -> None:
        try:
            self._on_messages(messages)
        except Exception as exc:
            # The batch stays unacked, and PUBACKs must keep arrival order, so nothing after
            # it could be acked on this connection either: close it (acks already sent stay
            # valid) and let the broker redeliver the batch and everything after it.
            self.stats.callback_errors += 1
            self._drop_held(conn)
            if self.stats.callback_errors == 1:
                self._log.exception(
                    "%s on_messages failed; batch of %d not acked, reconnecting for its "
                    "redelivery (later failures are logged without traceback)",
                    self.name,
                    len(messages),
                )
            else:
                self._log.error("%s on_messages failed again: %s", self.name, _describe(exc))
            self._close(conn, "on_messages failed: its batch is redelivered", polite=True)

    def _drain_backlog(self, conn: _Connection) -> None:
        """Hand the next slice of a large read to ``on_messages``; resume reading when done
        (unless `pause_reading` asked for backpressure meanwhile)."""
        if conn.closing:
            conn.backlog.clear()
            conn.draining = False
            return
        backlog = conn.backlog
        batch = [backlog.popleft() for _ in range(self._slice_len(backlog))]
        if batch:
            self._deliver(conn, batch)
        if backlog and not conn.closing:
            asyncio.get_running_loop().call_soon(self._drain_backlog, conn)
            return
        conn.draining = False
        if not self._paused and conn.transport is not None and not conn.closing:
            conn.transport.resume_reading()

    def _on_undeliverable(self, parser: PacketParser) -> None:
        """Count and report PUBLISHes that were skipped (already acked by `_arrive`)."""
        if parser.invalid:
            if not self.stats.invalid_in:
                self._log.warning("%s dropped a PUBLISH whose topic is not UTF-8", self.name)
            self.stats.invalid_in += parser.invalid
            parser.invalid = 0
        oversized = parser.oversized
        parser.oversized = []
        for topic, size, _ in oversized:
            self.stats.oversize_in += 1
            if self._on_oversize is not None:
                try:
                    self._on_oversize(topic, size)
                except Exception:
                    self._log.exception("%s on_oversize failed", self.name)

    def _on_control(self, conn: _Connection, packet_type: int, flags: int, body: bytes) -> None:
        proto = self._config.protocol
        if packet_type == PUBACK:
            packet_id, reason = decode_puback(body, proto)
            if self._inflight.pop(packet_id, None) is None:
                return
            self.stats.publish_acked += 1
            if reason >= 0x80:
                self.stats.publish_errors += 1
                self._log.warning(
                    "%s broker refused publish %d: reason 0x%02x", self.name, packet_id, reason
                )
            if self._queue:
                self._flush_queue(conn)
            if self._drain_waiters and self._drained():
                self._wake_drainers()
        elif packet_type == PINGRESP:
            pass
        elif packet_type == CONNACK and conn.expect_type == CONNACK:
            self._on_connack(conn, body)
        elif packet_type == SUBACK and conn.expect_type == SUBACK:
            packet_id, codes = decode_suback(body, proto)
            refused = [
                (flt, code)
                for (flt, _), code in zip(self._subscriptions, codes, strict=False)
                if code >= 0x80
            ]
            if refused:
                listing = ", ".join(f"{flt!r} (0x{code:02x})" for flt, code in refused)
                self._resolve_expect(
                    conn, DeviceConfigError(f"{self.name}: broker refused subscription {listing}")
                )
                self._close(conn, "subscription refused")
            else:
                self._on_granted(codes)
                self._resolve_expect(conn, body)
        elif packet_type == DISCONNECT:
            reason, text = decode_disconnect(body, proto)
            detail = f"0x{reason:02x}" + (f" {text}" if text else "")
            if reason == _V5_SESSION_TAKEN_OVER:
                conn.fatal = SessionTakenOver(
                    f"{self.name}: session taken over by another client with id "
                    f"{self._config.client_id!r}"
                )
                self._resolve_expect(conn, conn.fatal)
            self._close(conn, f"broker sent DISCONNECT {detail}")
        elif packet_type == UNSUBACK:
            self.stats.unsubacks += 1
        else:
            raise ProtocolError(f"unexpected packet type {packet_type} from the broker")

    def _on_granted(self, codes: list[int]) -> None:
        granted = {flt: code for (flt, _), code in zip(self._subscriptions, codes, strict=False)}
        self.granted_qos = granted
        self._set_warnings(
            "_suback_warnings",
            [
                f"subscription {flt!r} granted QoS {granted[flt]} instead of {qos}: delivery "
                "is at most once (messages can be lost); raise the broker's max_qos"
                for flt, qos in self._subscriptions
                if flt in granted and granted[flt] < qos
            ],
        )

    def _set_warnings(self, attr: str, warnings: list[str]) -> None:
        """Replace one group of `warnings`; log the new ones as errors (once, not on every
        reconnect) and say when one went away."""
        old: list[str] = getattr(self, attr)
        for text in warnings:
            if text not in old:
                self._log.error("%s: %s", self.name, text)
        for text in old:
            if text not in warnings:
                self._log.info("%s: resolved: %s", self.name, text)
        setattr(self, attr, warnings)

    def _resolve_expect(self, conn: _Connection, outcome: bytes | BaseException) -> None:
        fut = conn.expect_fut
        conn.expect_type = 0
        conn.expect_fut = None
        if fut is None or fut.done():
            return
        if isinstance(outcome, BaseException):
            fut.set_exception(outcome)
        else:
            fut.set_result(outcome)

    def _on_connack(self, conn: _Connection, body: bytes) -> None:
        cfg = self._config
        connack = decode_connack(body, cfg.protocol)
        code = connack.reason_code
        if code:
            error = self._refusal(code, connack.properties)
            self._resolve_expect(conn, error)
            self._close(conn, str(error))
            return
        self.session_present = connack.session_present
        props = connack.properties
        self._send_window = min(prop_int(props, PROP_RECEIVE_MAXIMUM, 0xFFFF), MAX_PACKET_ID - 1)
        self._server_max_packet = prop_int(props, PROP_MAXIMUM_PACKET_SIZE, 0)
        self.server_max_qos = prop_int(props, PROP_MAXIMUM_QOS, 2)
        self.retain_available = bool(prop_int(props, PROP_RETAIN_AVAILABLE, 1))
        warnings: list[str] = []
        if self.server_max_qos == 0:
            warnings.append(
                "broker Maximum QoS 0: QoS 1 publishes are sent as QoS 0 (at most once, "
                "may be lost); raise the broker's max_qos"
            )
        if not self.retain_available:
            warnings.append(
                "broker has no retained messages (Retain Available 0): retained publishes "
                "are sent without retain; enable retain_available on the broker"
            )
        self._set_warnings("_connack_warnings", warnings)
        keepalive_s = float(prop_int(props, PROP_SERVER_KEEP_ALIVE, 0)) or cfg.keepalive_s
        conn.connected = True
        self.stats.connects += 1
        self._resend(conn)
        self._start_keepalive(conn, keepalive_s)
        self._resolve_expect(conn, body)

    def _refusal(self, code: int, props: Properties) -> DeviceError:
        """The error for a CONNACK refusal: fatal `AuthError` or `DeviceConfigError` (with a
        hint at the setting to change) when retrying cannot help, else `DeviceUnavailable`."""
        cfg = self._config
        text = props.get(_PROP_REASON_STRING)
        detail = f"0x{code:02x}" + (f" {text!r}" if isinstance(text, str) and text else "")
        if code in _AUTH_REFUSED[cfg.protocol]:
            return AuthError(f"{self.name}: broker refused our credentials ({detail})")
        will = self._will
        if cfg.protocol == PROTOCOL_V5 and will is not None and code in (0x9A, 0x9B):
            topic, payload, qos, retain = will
            weaker = (topic, payload, 0, retain) if code == 0x9B else (topic, payload, qos, False)
            if weaker != will:
                # As with publishes: send the will as the broker allows it, and say so.
                self._will = weaker
                self._connect_packet = self._encode_connect()
                what = "QoS 0" if code == 0x9B else "not retained"
                self._set_warnings(
                    "_will_warnings",
                    [
                        *self._will_warnings,
                        f"broker refused our will as it was ({detail}): "
                        f"the will on {topic!r} is sent {what}",
                    ],
                )
                return DeviceUnavailable(f"broker refused our will ({detail}); retrying {what}")
        table = _V5_PERMANENT if cfg.protocol == PROTOCOL_V5 else _V311_PERMANENT
        why = table.get(code)
        if why is None:
            return DeviceUnavailable(f"broker refused the connection ({detail})")
        reference = props.get(_PROP_SERVER_REFERENCE)
        hint = why.format(
            client_id=cfg.client_id,
            reference=f" to {reference}" if isinstance(reference, str) and reference else "",
        )
        return DeviceConfigError(
            f"{self.name}: broker {cfg.host}:{cfg.port} refused the connection ({detail}): "
            f"{hint}; not retrying"
        )

    # -- keepalive ------------------------------------------------------------------------

    def _start_keepalive(self, conn: _Connection, keepalive_s: float) -> None:
        conn.keepalive_s = keepalive_s
        conn.last_ping = time.monotonic()
        conn.keepalive = conn.tasks.spawn(f"{self.name}.keepalive", self._keepalive, conn)

    async def _keepalive(self, conn: _Connection) -> None:
        """Every quarter keepalive: a PINGREQ when half a keepalive passed since the last,
        and the connection closed after a whole keepalive without a byte from the broker
        (unless reading is paused). Ends with the connection (cancelled by `_close`)."""
        keepalive_s = conn.keepalive_s
        while True:
            await asyncio.sleep(keepalive_s / 4)
            transport = conn.transport
            if conn.closing or transport is None:
                return
            now = time.monotonic()
            silent_s = now - self.stats.last_rx_monotonic
            if not self._paused and silent_s >= keepalive_s:
                self._close(
                    conn,
                    f"nothing received for {silent_s:.1f} s (keepalive {keepalive_s:g} s)",
                    abort=True,
                )
                return
            if now - conn.last_ping >= keepalive_s / 2:
                transport.write(PINGREQ_PACKET)
                conn.last_ping = now
                self.stats.pings += 1

    # -- outgoing publishes ---------------------------------------------------------------

    def _allocate_packet_id(self) -> int:
        packet_id = self._next_packet_id
        inflight = self._inflight
        while packet_id in inflight:
            packet_id = packet_id % MAX_PACKET_ID + 1
        self._next_packet_id = packet_id % MAX_PACKET_ID + 1
        return packet_id

    def _encode_publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> bytes | None:
        # A broker disconnects a client that exceeds what its CONNACK announced.
        if qos > self.server_max_qos:
            qos = self.server_max_qos
            self.stats.qos_downgraded += 1
        if retain and not self.retain_available:
            retain = False
            self.stats.retain_dropped += 1
        packet_id = self._allocate_packet_id() if qos else 0
        packet = encode_publish(topic, payload, qos, retain, packet_id, self._config.protocol)
        if self._server_max_packet and len(packet) > self._server_max_packet:
            self.stats.publish_errors += 1
            self._log.warning(
                "%s dropped a %d-byte publish to %r: above the broker's maximum packet size %d",
                self.name,
                len(packet),
                topic,
                self._server_max_packet,
            )
            return None
        if qos:
            self._inflight[packet_id] = packet
        self.stats.publishes_out += 1
        return packet

    def _enqueue(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        queue = self._queue
        if len(queue) >= self._config.max_queued_publishes:
            self.stats.dropped_publishes += 1
            if self._queued_qos0:
                for index, item in enumerate(queue):
                    if item[2] == 0:
                        del queue[index]
                        self._queued_qos0 -= 1
                        break
            else:
                if not self._logged_queue_full:
                    self._logged_queue_full = True
                    self._log.warning(
                        "%s publish queue full (%d); rejecting publishes until the link is back",
                        self.name,
                        len(queue),
                    )
                raise DeviceUnavailable(
                    f"{self.name} is {self.state.value} and its publish queue is full"
                )
        queue.append((topic, payload, qos, retain))
        if qos == 0:
            self._queued_qos0 += 1

    def _resend(self, conn: _Connection) -> None:
        """After CONNACK: re-send in-flight QoS 1 (DUP if the session survived), then the queue."""
        if self._inflight and (self.server_max_qos == 0 or not self.retain_available):
            # The broker no longer takes what they were encoded as: re-queue them in order,
            # `_flush_queue` encodes them as it now allows.
            parser = PacketParser(self._config.protocol, MAX_REMAINING_LENGTH)
            again = parser.feed(b"".join(self._inflight.values()))
            self._inflight.clear()
            self._queue.extendleft((m.topic, m.payload, m.qos, m.retain) for m in reversed(again))
        packets = list(self._inflight.values())
        if packets and self.session_present:
            packets = [bytes((packet[0] | 0x08,)) + packet[1:] for packet in packets]
        if packets:
            assert conn.transport is not None
            conn.transport.write(b"".join(packets))
        self._flush_queue(conn)

    def _flush_queue(self, conn: _Connection) -> None:
        queue = self._queue
        window = self._send_window
        packets: list[bytes] = []
        while queue and conn.connected:
            topic, payload, qos, retain = queue[0]
            if qos and len(self._inflight) >= window:
                break
            queue.popleft()
            if qos == 0:
                self._queued_qos0 -= 1
            packet = self._encode_publish(topic, payload, qos, retain)
            if packet is not None:
                packets.append(packet)
        if packets and conn.transport is not None:
            conn.transport.write(b"".join(packets))
        if self._drain_waiters and self._drained():
            self._wake_drainers()

    def _drained(self) -> bool:
        return not self._inflight and len(self._queue) == self._queued_qos0

    def _wake_drainers(self) -> None:
        for fut in self._drain_waiters:
            if not fut.done():
                fut.set_result(None)
        self._drain_waiters = []


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, ssl.SSLError):
        return _describe_tls(exc)
    return describe_error(exc)


def _describe_tls(exc: ssl.SSLError) -> str:
    """A TLS failure with a hint at the site file setting that usually causes it."""
    text = f"TLS handshake failed: {exc.reason or type(exc).__name__}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"{text}: {exc.verify_message} (certificate verify failed); check [mqtt.tls] "
            "ca_file (the CA that signed the broker's certificate) and that the certificate "
            "names the host of [mqtt] url"
        )
    reason = (exc.reason or "").upper()
    if any(key in reason for key in ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNKNOWN_CA")):
        return (
            f"{text}: the broker refused our client certificate (or its absence); check "
            "[mqtt.tls] cert_file and key_file (a certificate the broker's CA signed)"
        )
    return f"{text} ({exc})"
