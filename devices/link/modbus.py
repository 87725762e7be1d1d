"""A supervised Modbus TCP client link to one PLC endpoint (pymodbus underneath).

One `ModbusLink` per endpoint (host:port). Its supervisor loop, `ModbusLink.run` (the one
`devices.link.supervisor.LinkSupervisor`, shared with the MQTT link), connects, writes the
heartbeat registers every 250 ms, watches liveness and reconnects with capped, jittered
backoff (reset only by a connection that stayed up ``backoff_reset_after_s``). Requests are
serialised (a Modbus TCP server answers one request at a time per connection, and pymodbus
keeps one in flight) through three lanes served in priority order: ``STOP`` (stop commands),
``HEARTBEAT`` (the watchdog must never starve behind a backlog), then ``NORMAL``. A STOP waits
at most for the one request already on the wire.

Failure semantics, the only exceptions that leave this module (`devices.errors`):

* link not UP → `DeviceUnavailable` at once, nothing sent (fail fast);
* sent, no reply within ``request_timeout_s`` or connection lost → `NoReply`: the request may
  have run, never re-sent here (pymodbus's own retries are off: ``retries=0``);
* exception 06 (busy) → retried with a short backoff within ``busy_retry_s``, then `DeviceBusy`;
* exception 02 → `IllegalAddress`, 01/03 → `DeviceConfigError`: never retried;
* exception 04 or a malformed reply (bad MBAP header, wrong unit, wrong function code, short
  frame, wrong write echo, unknown transaction id) → `DeviceFaulty` with the reason; the
  device is marked FAULTY (``health``) for ``fault_hold_s`` and, for malformed frames, the
  connection is dropped and re-established.

Replies are checked before pymodbus decodes them (its ``trace_packet`` hook): a reply must
match the transaction id, unit, function code and size of the request on the wire. A late
reply to a request that already timed out carries that older transaction id and is
discarded, so it is never taken for a newer request.

Cancellation always ends `ModbusLink.run` and every request. pymodbus awaits connects and
replies through ``asyncio.wait_for``, which on Python 3.11 returns the inner result and drops a
cancellation that arrives in the same loop step as that result; the link notices such a lost
cancellation (the task's ``cancelling()`` count went up during the call) and raises it again.

Logging: the link logs its state changes once ("cannot connect to", once per reason while
down; "up", "down after", "back after", "heartbeat failing"). pymodbus's own lines about a
link's connection (a warning per failed connect attempt, errors with frame dumps) are dropped
by a filter on its logger while a link is at work (a context variable marks the link's tasks
and calls); set the ``pymodbus`` logger to DEBUG explicitly to see them again.

Liveness: any well-formed reply counts. With nothing received for ``liveness_timeout_s``
(1 s; heartbeats go out every 250 ms) the connection is declared dead and the link goes DOWN,
so a PLC that vanished or a half-open connection is noticed within ~1.0–1.2 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import logging
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException

from devices.errors import (
    DeviceBusy,
    DeviceConfigError,
    DeviceError,
    DeviceFaulty,
    DeviceUnavailable,
    IllegalAddress,
    NoReply,
)
from devices.link.backoff import Backoff
from devices.link.state import LinkState
from devices.link.supervisor import (
    LinkSupervisor,
    SessionTasks,
    cancel_requests,
    describe_error,
    raise_lost_cancel,
)

__all__ = [
    "DeviceFault",
    "DeviceHealth",
    "ModbusLink",
    "ModbusLinkConfig",
    "ModbusLinkStats",
    "Priority",
]

FC_READ_HOLDING = 3
FC_WRITE_SINGLE = 6
FC_WRITE_MULTIPLE = 16
EXC_ILLEGAL_FUNCTION = 0x01
EXC_ILLEGAL_ADDRESS = 0x02
EXC_ILLEGAL_VALUE = 0x03
EXC_DEVICE_FAILURE = 0x04
EXC_DEVICE_BUSY = 0x06
_MBAP = struct.Struct(">HHHB")
_STALE_TIDS_KEPT = 32
_BUSY_BACKOFF_MAX_S = 0.1
_PYMODBUS_LOGGER = "pymodbus.logging"
_IN_LINK: contextvars.ContextVar[str | None] = contextvars.ContextVar("modbus_link", default=None)


class _QuietPymodbus(logging.Filter):
    """Drops pymodbus's log records emitted on behalf of a `ModbusLink` (the link translates
    every failure and logs state changes itself), unless pymodbus was asked for DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _IN_LINK.get() is None:
            return True
        return logging.getLogger("pymodbus").level == logging.DEBUG


_QUIET = _QuietPymodbus()


def _quiet_pymodbus() -> None:
    logger = logging.getLogger(_PYMODBUS_LOGGER)
    if _QUIET not in logger.filters:
        logger.addFilter(_QUIET)


class Priority(enum.IntEnum):
    """Request lanes, served lowest value first."""

    STOP = 0
    HEARTBEAT = 1
    NORMAL = 2


class DeviceHealth(enum.Enum):
    """Whether the device's answers can be trusted (separate from reachability)."""

    OK = "ok"
    FAULTY = "faulty"


@dataclass(frozen=True, slots=True)
class DeviceFault:
    """The last fault: what was wrong and when (``time.monotonic()``)."""

    reason: str
    at: float


HealthListener = Callable[[DeviceHealth, "DeviceFault | None"], None]
UpHook = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ModbusLinkConfig:
    """Settings of one `ModbusLink`; checked when the link is built."""

    host: str = "127.0.0.1"
    port: int = 502
    connect_timeout_s: float = 1.0
    request_timeout_s: float = 0.5
    heartbeat_interval_s: float = 0.25
    liveness_timeout_s: float = 1.0
    busy_retry_s: float = 1.0  # budget for retrying exception 06 answers
    busy_backoff_s: float = 0.01  # first delay between busy retries (doubles, ≤ 0.1 s)
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 1.0
    backoff_reset_after_s: float = 1.0
    """A connection must stay up this long (the liveness timeout: four heartbeats) before the
    reconnect backoff starts again from ``backoff_initial_s``; a PLC (or gateway) that
    accepts and drops us at once gets the next, longer delay, as a refused connect does."""
    max_queued: int = 1000  # NORMAL lane bound; beyond it requests fail with DeviceBusy
    fault_hold_s: float = 5.0  # FAULTY lasts this long after the last bad reply

    def reconnect_backoff(self) -> Backoff:
        """The reconnect schedule: ``backoff_initial_s`` doubling to ``backoff_max_s``, 20 %
        jitter, reset only by a connection that stayed up ``backoff_reset_after_s``."""
        return Backoff(
            self.backoff_initial_s, self.backoff_max_s, reset_after_s=self.backoff_reset_after_s
        )

    def busy_backoff(self) -> Backoff:
        """Delays between retries of a busy answer (exception 06): ``busy_backoff_s``
        doubling to 0.1 s, no jitter (the retries of one request, within ``busy_retry_s``)."""
        max_s = _BUSY_BACKOFF_MAX_S
        return Backoff(min(self.busy_backoff_s, max_s), max_s, jitter=0.0)


@dataclass(slots=True)
class ModbusLinkStats:
    """Counters of one link (monotonic over its lifetime)."""

    connects: int = 0
    disconnects: int = 0
    requests: int = 0
    replies: int = 0
    timeouts: int = 0
    busy_retries: int = 0
    exceptions: int = 0  # Modbus exception replies of any code
    malformed: int = 0
    stale_replies: int = 0  # late replies to requests that had timed out, discarded
    heartbeats: int = 0
    heartbeat_failures: int = 0
    queue_full: int = 0
    max_queued: int = 0
    last_reply_monotonic: float = 0.0


def _check_config(cfg: ModbusLinkConfig) -> None:
    def bad(name: str, why: str) -> DeviceConfigError:
        return DeviceConfigError(f"modbus config {name}: {why}")

    if not 0 < cfg.port < 65536:
        raise bad("port", f"out of range: {cfg.port}")
    for name in (
        "connect_timeout_s",
        "request_timeout_s",
        "heartbeat_interval_s",
        "liveness_timeout_s",
        "busy_backoff_s",
    ):
        if getattr(cfg, name) <= 0:
            raise bad(name, "must be > 0")
    if cfg.liveness_timeout_s < cfg.heartbeat_interval_s:
        raise bad("liveness_timeout_s", "must be >= heartbeat_interval_s")
    if cfg.busy_retry_s < 0 or cfg.fault_hold_s < 0:
        raise bad("busy_retry_s", "busy_retry_s and fault_hold_s must be >= 0")
    if not 0 < cfg.backoff_initial_s <= cfg.backoff_max_s:
        raise bad("backoff_initial_s", "need 0 < backoff_initial_s <= backoff_max_s")
    if not cfg.backoff_reset_after_s >= 0:
        raise bad("backoff_reset_after_s", "must be >= 0")
    if cfg.max_queued < 1:
        raise bad("max_queued", "must be >= 1")


class _Lanes:
    """A priority lock: one holder; waiters served by lane, FIFO within a lane."""

    __slots__ = ("_busy", "_waiters")

    def __init__(self) -> None:
        self._busy = False
        self._waiters: tuple[deque[asyncio.Future[None]], ...] = tuple(deque() for _ in Priority)

    def queued(self, lane: Priority) -> int:
        return len(self._waiters[lane])

    async def acquire(self, lane: Priority) -> None:
        if not self._busy and not any(self._waiters):
            self._busy = True
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._waiters[lane]
        queue.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # granted, then cancelled: pass the turn on
            else:
                with contextlib.suppress(ValueError):
                    queue.remove(fut)
            raise

    def release(self) -> None:
        for queue in self._waiters:
            while queue:
                fut = queue.popleft()
                if not fut.done():
                    fut.set_result(None)  # still busy: the turn goes to this waiter
                    return
        self._busy = False

    def fail_waiters(self, exc: BaseException) -> None:
        for queue in self._waiters:
            while queue:
                fut = queue.popleft()
                if not fut.done():
                    fut.set_exception(exc)


@dataclass(slots=True)
class _Expect:
    unit: int
    fc: int
    address: int
    count: int
    values: tuple[int, ...]
    tid: int = -1


class _Connection:
    """One TCP connection (one pymodbus client) and what we know about it."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.client: AsyncModbusTcpClient | None = None
        self.lost = asyncio.Event()
        self.lost_reason = ""
        self.fault: str | None = None  # set when a malformed reply arrived
        self.expect: _Expect | None = None
        self.inflight: asyncio.Timeout | None = None
        self.stale_tids: deque[int] = deque(maxlen=_STALE_TIDS_KEPT)
        self.closed = False


class ModbusLink(LinkSupervisor):
    """A supervised Modbus TCP connection to one endpoint; see the module docstring.

    Drivers register what the supervisor does for them: `add_heartbeat` (a register written
    with an incrementing counter every ``heartbeat_interval_s``; the first heartbeat round
    must succeed before the link is UP) and `add_up_hook` (an async callable run after every
    (re)connection, e.g. to re-read the PLC epoch and resync).
    """

    def __init__(
        self,
        config: ModbusLinkConfig,
        *,
        name: str = "modbus",
        logger: logging.Logger | None = None,
    ) -> None:
        _check_config(config)
        _quiet_pymodbus()
        super().__init__(
            name=name,
            endpoint=f"{config.host}:{config.port}",
            logger=logger if logger is not None else logging.getLogger(__name__),
        )
        self._config = config
        self.stats = ModbusLinkStats()
        self._lanes = _Lanes()
        self._conn: _Connection | None = None
        self._heartbeats: list[tuple[int, int]] = []
        self._heartbeat_value = 0
        self._up_hooks: list[tuple[str, UpHook]] = []
        self._health = DeviceHealth.OK
        self._fault: DeviceFault | None = None
        self._fault_until = 0.0
        self._health_listeners: list[HealthListener] = []
        self._heartbeat_failing = False

    # -- public surface -------------------------------------------------------------------

    @property
    def config(self) -> ModbusLinkConfig:
        return self._config

    @property
    def health(self) -> DeviceHealth:
        """FAULTY for ``fault_hold_s`` after a malformed reply or a device-failure answer."""
        self._refresh_health()
        return self._health

    @property
    def fault(self) -> DeviceFault | None:
        """The last fault seen (kept after the health is OK again)."""
        return self._fault

    def add_health_listener(self, callback: HealthListener) -> None:
        """Call ``callback(health, last_fault)`` whenever the health changes."""
        self._health_listeners.append(callback)

    def add_heartbeat(self, unit: int, address: int) -> None:
        """Write an incrementing counter to ``address`` of ``unit`` every heartbeat interval."""
        if (unit, address) not in self._heartbeats:
            self._heartbeats.append((unit, address))

    def remove_heartbeat(self, unit: int, address: int) -> None:
        """Stop writing the heartbeat registered for ``unit``/``address`` (unknown: no-op)."""
        if (unit, address) in self._heartbeats:
            self._heartbeats.remove((unit, address))

    def add_up_hook(self, name: str, hook: UpHook) -> None:
        """Run ``await hook()`` after every connection is up (errors are logged, not fatal)."""
        self._up_hooks.append((name, hook))

    def queued(self, priority: Priority = Priority.NORMAL) -> int:
        """Requests waiting in one lane."""
        return self._lanes.queued(priority)

    async def read(
        self, unit: int, address: int, count: int, *, priority: Priority = Priority.NORMAL
    ) -> list[int]:
        """Read ``count`` holding registers (FC3)."""
        if not 1 <= count <= 125:
            raise ValueError(f"read count must be 1..125, got {count}")
        _check_range(address, count)
        return await self._call(priority, unit, FC_READ_HOLDING, address, count, ())

    async def write(
        self,
        unit: int,
        address: int,
        values: Sequence[int],
        *,
        priority: Priority = Priority.NORMAL,
    ) -> None:
        """Write registers with one FC16 request (atomic on the PLC side)."""
        count = len(values)
        if not 1 <= count <= 123:
            raise ValueError(f"write count must be 1..123, got {count}")
        _check_range(address, count)
        if any(not 0 <= v <= 0xFFFF for v in values):
            raise ValueError("register values must be within 0..65535")
        await self._call(priority, unit, FC_WRITE_MULTIPLE, address, count, tuple(values))

    async def run(self) -> None:
        """Connect, heartbeat, serve and reconnect until cancelled or `disconnect`-ed."""
        # Marks this task, the tasks it starts and the transports it opens (their callbacks
        # run in this context) for the pymodbus log filter.
        in_link = _IN_LINK.set(self.name)
        try:
            await super().run()
        finally:
            _IN_LINK.reset(in_link)

    # -- requests -------------------------------------------------------------------------

    async def _call(
        self,
        priority: Priority,
        unit: int,
        fc: int,
        address: int,
        count: int,
        values: tuple[int, ...],
        *,
        internal: bool = False,
    ) -> list[int]:
        if not internal and self.watch.state is not LinkState.UP:
            raise DeviceUnavailable(f"{self.name} is {self.watch.state.value}")
        if priority is Priority.NORMAL and self._lanes.queued(priority) >= self._config.max_queued:
            self.stats.queue_full += 1
            raise DeviceBusy(f"{self.name}: {self._config.max_queued} requests already queued")
        busy_deadline = 0.0
        busy: Backoff | None = None  # built at the first busy answer: requests rarely see one
        while True:
            await self._lanes.acquire(priority)
            self.stats.max_queued = max(self.stats.max_queued, self._lanes.queued(priority))
            try:
                reply = await self._exchange(unit, fc, address, count, values)
            finally:
                self._lanes.release()
            if isinstance(reply, list):
                return reply
            code = reply
            if code != EXC_DEVICE_BUSY:
                raise self._exception_error(code, unit, fc, address, count)
            now = time.monotonic()
            if busy is None:
                busy_deadline = now + self._config.busy_retry_s
                busy = self._config.busy_backoff()
            delay = busy.next_delay()
            if now + delay > busy_deadline:
                raise DeviceBusy(
                    f"{self.name}: unit {unit} busy for {self._config.busy_retry_s:g} s "
                    f"({_fc_name(fc)} at {address})"
                )
            self.stats.busy_retries += 1
            await asyncio.sleep(delay)
            if not internal and self.watch.state is not LinkState.UP:
                raise DeviceUnavailable(f"{self.name} is {self.watch.state.value}")

    async def _exchange(
        self, unit: int, fc: int, address: int, count: int, values: tuple[int, ...]
    ) -> list[int] | int:
        """One request on the wire; the registers read (or []) or a Modbus exception code."""
        conn = self._conn
        if conn is None or conn.client is None or conn.lost.is_set():
            raise DeviceUnavailable(f"{self.name} is not connected")
        client = conn.client
        self.stats.requests += 1
        cancels = cancel_requests()
        expect = _Expect(unit, fc, address, count, values)
        conn.expect = expect
        in_link = _IN_LINK.set(self.name)  # a driver's caller runs in its own task
        try:
            async with asyncio.timeout(self._config.request_timeout_s) as timeout:
                conn.inflight = timeout
                if fc == FC_READ_HOLDING:
                    pdu = await client.read_holding_registers(address, count=count, device_id=unit)
                elif fc == FC_WRITE_SINGLE:
                    pdu = await client.write_register(address, values[0], device_id=unit)
                else:
                    pdu = await client.write_registers(address, list(values), device_id=unit)
        except TimeoutError:
            if conn.fault is not None:
                raise DeviceFaulty(conn.fault) from None
            if conn.lost.is_set():
                raise NoReply(f"{self.name}: connection lost ({conn.lost_reason})") from None
            self.stats.timeouts += 1
            if expect.tid >= 0:
                conn.stale_tids.append(expect.tid)
            raise NoReply(
                f"{self.name}: no reply within {self._config.request_timeout_s:g} s "
                f"({_fc_name(fc)} at {address}, unit {unit})"
            ) from None
        except asyncio.CancelledError:
            if expect.tid >= 0:
                conn.stale_tids.append(expect.tid)  # its reply may still come: not a fault
            raise
        except ConnectionException as exc:
            raise DeviceUnavailable(f"{self.name}: not connected ({exc})") from None
        except ModbusException as exc:
            if conn.fault is not None:
                raise DeviceFaulty(conn.fault) from None
            raise NoReply(f"{self.name}: {describe_error(exc)}") from None
        finally:
            conn.inflight = None
            conn.expect = None
            _IN_LINK.reset(in_link)
        raise_lost_cancel(cancels)  # the reply came, but pymodbus's wait_for dropped a cancel
        if conn.fault is not None:  # a later frame of the same chunk was malformed
            raise DeviceFaulty(conn.fault)
        self.stats.replies += 1
        self.stats.last_reply_monotonic = time.monotonic()
        if pdu.isError():
            self.stats.exceptions += 1
            return int(getattr(pdu, "exception_code", 0))
        if fc == FC_READ_HOLDING:
            registers: list[int] = list(pdu.registers)
            return registers
        return []

    def _exception_error(
        self, code: int, unit: int, fc: int, address: int, count: int
    ) -> DeviceError:
        where = f"{self.name}: unit {unit} {_fc_name(fc)} at {address} (+{count})"
        if code == EXC_ILLEGAL_ADDRESS:
            return IllegalAddress(f"{where}: illegal data address (exception 02)")
        if code == EXC_ILLEGAL_FUNCTION:
            return DeviceConfigError(f"{where}: illegal function (exception 01)")
        if code == EXC_ILLEGAL_VALUE:
            return DeviceConfigError(f"{where}: illegal data value (exception 03)")
        reason = f"{where}: " + (
            "device failure (exception 04)"
            if code == EXC_DEVICE_FAILURE
            else f"unexpected exception code 0x{code:02x}"
        )
        self._set_fault(reason)
        return DeviceFaulty(reason)

    # -- reply checks (pymodbus trace hooks) ----------------------------------------------

    def _trace_packet(self, conn: _Connection, sending: bool, data: bytes) -> bytes:
        if sending:
            expect = conn.expect
            if expect is not None and len(data) >= 2:
                expect.tid = int.from_bytes(data[:2], "big")
            return data
        if conn.closed:
            return b""
        pos = 0
        size = len(data)
        while size - pos >= _MBAP.size:
            tid, protocol, length, unit = _MBAP.unpack_from(data, pos)
            if protocol != 0:
                return self._malformed(conn, f"protocol id {protocol} in the reply header")
            if not 2 <= length <= 254:
                return self._malformed(conn, f"MBAP length {length} out of range")
            end = pos + 6 + length
            if end > size:
                break  # incomplete: wait for more bytes
            problem = self._check_frame(conn, tid, unit, data[pos + 7 : end])
            if problem:
                return self._malformed(conn, problem)
            pos = end
        return data

    def _check_frame(self, conn: _Connection, tid: int, unit: int, pdu: bytes) -> str | None:
        expect = conn.expect
        if expect is None or tid != expect.tid:
            if tid in conn.stale_tids:
                conn.stale_tids.remove(tid)
                self.stats.stale_replies += 1
                return None  # pymodbus skips it: its transaction id is not the current one
            return f"reply with unexpected transaction id {tid}"
        if unit != expect.unit:
            return f"reply from unit {unit}, expected unit {expect.unit}"
        fc = pdu[0]
        if fc == expect.fc | 0x80:
            return None if len(pdu) == 2 else f"exception reply of {len(pdu)} bytes"
        if fc != expect.fc:
            return f"function code {fc} in the reply to {_fc_name(expect.fc)}"
        if fc == FC_READ_HOLDING:
            wanted = 2 * expect.count
            if len(pdu) < 2 or pdu[1] != wanted or len(pdu) != 2 + wanted:
                got = max(0, len(pdu) - 2)
                return f"short or long frame: {got} data bytes for {expect.count} registers"
        elif fc == FC_WRITE_MULTIPLE:
            if len(pdu) != 5 or struct.unpack(">HH", pdu[1:5]) != (expect.address, expect.count):
                return "write reply does not echo the address and count written"
        elif fc == FC_WRITE_SINGLE:
            echo = (expect.address, expect.values[0])
            if len(pdu) != 5 or struct.unpack(">HH", pdu[1:5]) != echo:
                return "write reply does not echo the address and value written"
        return None

    def _malformed(self, conn: _Connection, reason: str) -> bytes:
        self.stats.malformed += 1
        full = f"{self.name}: malformed reply: {reason}"
        if conn.fault is None:
            conn.fault = full
        self._set_fault(full)
        self._mark_lost(conn, f"malformed reply ({reason})")
        return b""

    def _on_trace_connect(self, conn: _Connection, connected: bool) -> None:
        if not connected:
            self._mark_lost(conn, "connection closed by the PLC")

    def _mark_lost(self, conn: _Connection, reason: str) -> None:
        if not conn.lost.is_set():
            conn.lost_reason = reason
            conn.lost.set()
        inflight = conn.inflight
        if inflight is not None and not inflight.expired():
            inflight.reschedule(asyncio.get_running_loop().time())

    # -- health ---------------------------------------------------------------------------

    def _set_fault(self, reason: str) -> None:
        now = time.monotonic()
        self._fault = DeviceFault(reason, now)
        self._fault_until = now + self._config.fault_hold_s
        if self._health is DeviceHealth.OK:
            self._health = DeviceHealth.FAULTY
            self._log.warning("%s FAULTY: %s", self.name, reason)
            self._notify_health()

    def _refresh_health(self) -> None:
        if self._health is DeviceHealth.FAULTY and time.monotonic() >= self._fault_until:
            self._health = DeviceHealth.OK
            self._log.info(
                "%s healthy again (no bad reply for %g s)", self.name, self._config.fault_hold_s
            )
            self._notify_health()

    def _notify_health(self) -> None:
        for callback in tuple(self._health_listeners):
            try:
                callback(self._health, self._fault)
            except Exception:
                self._log.exception("health listener %r failed", callback)

    # -- the session (driven by `LinkSupervisor.run`) ---------------------------------------

    def _reconnect_backoff(self) -> Backoff:
        return self._config.reconnect_backoff()

    async def _open_session(self, tasks: SessionTasks) -> None:
        await self._connect()

    async def _serve_session(self, tasks: SessionTasks) -> str:
        """Run heartbeats and up hooks until the connection is lost; return why."""
        conn = self._conn
        assert conn is not None
        tasks.spawn(f"{self.name}.heartbeat", self._heartbeat_loop, conn)
        for hook_name, hook in self._up_hooks:
            tasks.spawn(hook_name, self._run_hook, hook_name, hook)
        try:
            return await self._watch_liveness(conn)
        finally:
            await tasks.stop()  # before the connection closes under them

    async def _close_session(self, reason: str) -> None:
        conn = self._conn
        if conn is not None:
            self._drop(conn, reason)

    async def _stop_session(self) -> None:
        conn = self._conn
        if conn is not None:
            self._mark_lost(conn, "disconnect requested")

    def _on_down(self, reason: str, was_up: bool) -> None:
        if was_up:
            self.stats.disconnects += 1
        self._lanes.fail_waiters(DeviceUnavailable(f"{self.name} went down: {reason}"))

    async def _connect(self) -> _Connection:
        cfg = self._config
        conn = _Connection(self.connection_number)
        client = AsyncModbusTcpClient(
            cfg.host,
            port=cfg.port,
            name=self.name,
            # Our own timeouts run around every call; pymodbus's must never fire first.
            timeout=max(cfg.connect_timeout_s, cfg.request_timeout_s) * 4,
            retries=0,  # pymodbus would re-send timed-out writes otherwise
            reconnect_delay=0,  # the supervisor reconnects, not pymodbus
            trace_packet=lambda sending, data: self._trace_packet(conn, sending, data),
            trace_connect=lambda connected: self._on_trace_connect(conn, connected),
        )
        conn.client = client
        cancels = cancel_requests()
        try:
            async with asyncio.timeout(cfg.connect_timeout_s):
                connected = await client.connect()
            raise_lost_cancel(cancels)  # pymodbus's wait_for may have dropped it
        except BaseException:
            client.close()
            raise
        if not connected:
            client.close()
            raise DeviceUnavailable("connection refused or unreachable")
        self._conn = conn
        self.stats.connects += 1
        self.stats.last_reply_monotonic = time.monotonic()
        try:
            await self._heartbeat_round(conn, first=True)
        except BaseException:
            self._drop(conn, "first heartbeat failed")
            raise
        return conn

    async def _watch_liveness(self, conn: _Connection) -> str:
        """Until the connection is lost; with heartbeats registered, silence for
        ``liveness_timeout_s`` counts as lost (without any, silence is normal)."""
        limit = self._config.liveness_timeout_s
        while True:
            if conn.lost.is_set():
                return conn.lost_reason
            silent = time.monotonic() - self.stats.last_reply_monotonic
            if not self._heartbeats:
                silent = 0.0
            elif silent >= limit:
                return f"no reply for {silent:.2f} s"
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(limit - silent):
                    await conn.lost.wait()

    async def _heartbeat_loop(self, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        interval = self._config.heartbeat_interval_s
        next_at = loop.time()
        cancels = cancel_requests()
        while not conn.lost.is_set():
            raise_lost_cancel(cancels)
            next_at += interval
            now = loop.time()
            if next_at < now:
                next_at = now
            await asyncio.sleep(next_at - now)
            self._refresh_health()
            with contextlib.suppress(DeviceError):
                await self._heartbeat_round(conn)

    async def _heartbeat_round(self, conn: _Connection, *, first: bool = False) -> None:
        if not self._heartbeats:
            return
        self._heartbeat_value = (self._heartbeat_value + 1) & 0xFFFF
        value = self._heartbeat_value
        for unit, address in self._heartbeats:
            try:
                await self._call(
                    Priority.HEARTBEAT,
                    unit,
                    FC_WRITE_SINGLE,
                    address,
                    1,
                    (value,),
                    internal=True,
                )
            except DeviceError as exc:
                self.stats.heartbeat_failures += 1
                if isinstance(exc, DeviceConfigError):
                    self._set_fault(f"{self.name}: heartbeat refused: {exc}")
                if not self._heartbeat_failing and not first:
                    self._heartbeat_failing = True
                    self._log.warning("%s heartbeat failing: %s", self.name, exc)
                raise
        self.stats.heartbeats += 1
        if self._heartbeat_failing:
            self._heartbeat_failing = False
            self._log.info("%s heartbeat works again", self.name)

    async def _run_hook(self, hook_name: str, hook: UpHook) -> None:
        try:
            await hook()
        except DeviceError as exc:
            self._log.warning("%s: %s failed: %s", self.name, hook_name, exc)
        except Exception:
            self._log.exception("%s: %s failed", self.name, hook_name)

    def _drop(self, conn: _Connection, reason: str) -> None:
        self._mark_lost(conn, reason)
        if conn.closed:
            return
        conn.closed = True
        if self._conn is conn:
            self._conn = None
        if conn.client is not None:
            conn.client.close()


def _check_range(address: int, count: int) -> None:
    if not address >= 0 or address + count - 1 > 0xFFFF:
        raise ValueError(f"registers {address}..{address + count - 1} outside 0..65535")


def _fc_name(fc: int) -> str:
    return {
        FC_READ_HOLDING: "read (FC3)",
        FC_WRITE_SINGLE: "write (FC6)",
        FC_WRITE_MULTIPLE: "write (FC16)",
    }.get(fc, f"FC{fc}")
