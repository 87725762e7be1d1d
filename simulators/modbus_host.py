"""Serve a simulated PLC over real Modbus TCP on 127.0.0.1, with run-time fault injection.

`PlcHost` puts a `simulators.plc.PlcModel` behind a pymodbus ``ModbusTcpServer`` (the
non-deprecated ``SimDevice`` / ``SimData`` datastore, one ``SimData`` per register-map entry).
Every request goes through the ``SimDevice`` action hook: reads are rendered from the model at
that moment, writes are decoded and applied to the model (which may refuse them with a Modbus
exception), so the register image is never stale and never the source of truth.

Faults (`Faults`, changeable while running):

* in the action hook (real exception replies from pymodbus): ``busy`` (06, nothing executed),
  ``illegal_address`` (02), ``device_failure`` (04);
* in `FaultProxy`, a small TCP proxy in front of the server that handles one request at a time
  per connection like a PLC: ``latency_s`` added before every request (a slow PLC),
  ``drop_request`` (never reaches the PLC), ``drop_reply`` (executed, reply discarded),
  ``delay_reply`` (reply held for ``delay_s``), malformed replies (``garbage``,
  ``short_frame``, ``wrong_unit``, ``bad_protocol``, ``wrong_function``), ``black_hole``
  (half-open: requests read and never answered) and going offline (connections refused).

A rule matches requests by function code and/or address and fires ``count`` times (or until
cleared when ``count`` is None).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import random
import struct
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import SimDevice

if TYPE_CHECKING:
    from simulators.plc import PlcModel

log = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
_READ_FCS = frozenset({3, 23})


class FaultKind(enum.Enum):
    """What a fault rule does to the requests it matches."""

    BUSY = "busy"
    ILLEGAL_ADDRESS = "illegal_address"
    DEVICE_FAILURE = "device_failure"
    DROP_REQUEST = "drop_request"
    DROP_REPLY = "drop_reply"
    DELAY_REPLY = "delay_reply"
    GARBAGE = "garbage"
    SHORT_FRAME = "short_frame"
    WRONG_UNIT = "wrong_unit"
    BAD_PROTOCOL = "bad_protocol"
    WRONG_FUNCTION = "wrong_function"


ACTION_KINDS = frozenset({FaultKind.BUSY, FaultKind.ILLEGAL_ADDRESS, FaultKind.DEVICE_FAILURE})
PROXY_KINDS = frozenset(FaultKind) - ACTION_KINDS
_EXC_OF = {
    FaultKind.BUSY: ExcCodes.DEVICE_BUSY,
    FaultKind.ILLEGAL_ADDRESS: ExcCodes.ILLEGAL_ADDRESS,
    FaultKind.DEVICE_FAILURE: ExcCodes.DEVICE_FAILURE,
}


@dataclass(slots=True)
class FaultRule:
    """One injected fault; see `Faults.add`."""

    kind: FaultKind
    remaining: int | None = 1
    function_codes: frozenset[int] | None = None
    address: int | None = None
    delay_s: float = 0.0
    hits: int = 0

    def matches(self, fc: int, address: int, count: int) -> bool:
        if self.function_codes is not None and fc not in self.function_codes:
            return False
        return self.address is None or address <= self.address < address + max(count, 1)


@dataclass(slots=True)
class Faults:
    """Run-time fault settings of one PLC (shared by its action hook and its proxy)."""

    latency_s: float = 0.0
    black_hole: bool = False
    rules: list[FaultRule] = field(default_factory=list)
    hits: Counter[str] = field(default_factory=Counter)

    def add(
        self,
        kind: FaultKind | str,
        count: int | None = 1,
        *,
        function_codes: Collection[int] | None = None,
        address: int | None = None,
        delay_s: float = 0.0,
    ) -> FaultRule:
        """Inject ``kind`` into the next ``count`` matching requests (None: until cleared)."""
        rule = FaultRule(
            FaultKind(kind),
            count,
            frozenset(function_codes) if function_codes is not None else None,
            address,
            delay_s,
        )
        self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """Remove every rule, latency and the black hole."""
        self.rules.clear()
        self.latency_s = 0.0
        self.black_hole = False

    def take(
        self, kinds: frozenset[FaultKind], fc: int, address: int, count: int
    ) -> FaultRule | None:
        for rule in self.rules:
            if rule.kind in kinds and rule.matches(fc, address, count):
                rule.hits += 1
                self.hits[rule.kind.value] += 1
                if rule.remaining is not None:
                    rule.remaining -= 1
                    if rule.remaining <= 0:
                        self.rules.remove(rule)
                return rule
        return None


def parse_request(frame: bytes) -> tuple[int, int, int]:
    """``(function code, address, count)`` of a Modbus TCP request frame (0s if unknown)."""
    if len(frame) < 8:
        return 0, 0, 0
    fc = frame[7]
    if fc in (3, 16, 23) and len(frame) >= 12:
        address, count = struct.unpack_from(">HH", frame, 8)
        return fc, address, count
    if fc == 6 and len(frame) >= 10:
        return fc, struct.unpack_from(">H", frame, 8)[0], 1
    return fc, 0, 0


def corrupt(reply: bytes, kind: FaultKind, rng: random.Random) -> bytes:
    """A malformed version of ``reply`` (a complete Modbus TCP frame)."""
    if kind is FaultKind.GARBAGE:
        return bytes(rng.randrange(256) for _ in range(max(9, len(reply))))
    if kind is FaultKind.WRONG_UNIT:
        return reply[:6] + bytes(((reply[6] + 1) & 0xFF,)) + reply[7:]
    if kind is FaultKind.BAD_PROTOCOL:
        return reply[:2] + b"\x12\x34" + reply[4:]
    if kind is FaultKind.WRONG_FUNCTION:
        return reply[:7] + bytes((reply[7] ^ 0x04,)) + reply[8:]
    if kind is FaultKind.SHORT_FRAME:
        # Keep the header consistent, drop half of the data bytes.
        pdu = reply[7:]
        keep = max(1, (len(pdu) - 1) // 2)
        short = pdu[: 1 + keep]
        return reply[:4] + struct.pack(">HB", len(short) + 1, reply[6]) + short
    return reply


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    header = await reader.readexactly(6)
    length = int.from_bytes(header[4:6], "big")
    if not 1 <= length <= 260:
        raise ConnectionError(f"bad MBAP length {length}")
    return header + await reader.readexactly(length)


class FaultProxy:
    """TCP proxy on 127.0.0.1 that forwards one request at a time and injects faults."""

    def __init__(self, faults: Faults, upstream_port: int, *, seed: int | None = None) -> None:
        self.faults = faults
        self.upstream_port = upstream_port
        self._rng = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def listen(self, port: int) -> int:
        self._server = await asyncio.start_server(self._serve_client, LOCALHOST, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def drop_connections(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self.drop_connections()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    @property
    def listening(self) -> bool:
        return self._server is not None

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._writers.add(writer)
        up_writer: asyncio.StreamWriter | None = None
        try:
            up_reader, up_writer = await asyncio.open_connection(LOCALHOST, self.upstream_port)
            await self._pump(reader, writer, up_reader, up_writer)
        except (OSError, asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            # The proxy is closing. Ending normally: Python 3.11's start_server callback
            # logs a cancelled connection handler as an unhandled error.
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()
            if up_writer is not None:
                up_writer.transport.abort()
            if task is not None:
                self._tasks.discard(task)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        faults = self.faults
        while True:
            frame = await _read_frame(reader)
            if faults.black_hole:
                continue
            fc, address, count = parse_request(frame)
            if faults.latency_s > 0:
                await asyncio.sleep(faults.latency_s)
            rule = faults.take(PROXY_KINDS, fc, address, count)
            if rule is not None and rule.kind is FaultKind.DROP_REQUEST:
                continue
            up_writer.write(frame)
            reply = await _read_frame(up_reader)
            if faults.black_hole:
                continue
            if rule is not None:
                if rule.kind is FaultKind.DROP_REPLY:
                    continue
                if rule.kind is FaultKind.DELAY_REPLY:
                    await asyncio.sleep(rule.delay_s)
                else:
                    reply = corrupt(reply, rule.kind, self._rng)
            writer.write(reply)


class PlcHost:
    """One simulated PLC on 127.0.0.1: pymodbus server, model clock, optional fault proxy.

    Use as ``async with PlcHost(model) as host:``; ``host.port`` is where clients connect
    (the proxy's port when ``proxy=True``). `restart` simulates a power cycle (connections
    dropped, new epoch), `go_offline` / `go_online` a PLC that refuses connections.
    """

    def __init__(
        self,
        model: PlcModel,
        *,
        port: int = 0,
        unit: int = 1,
        proxy: bool = True,
        tick_s: float = 0.01,
        seed: int | None = None,
    ) -> None:
        self.model = model
        self.unit = unit
        self.faults = Faults()
        self.tick_s = tick_s
        self.requests: Counter[int] = Counter()  # by function code, reaching the PLC
        self._wanted_port = port
        self._use_proxy = proxy
        self._seed = seed
        self._server: ModbusTcpServer | None = None
        self._server_port = 0
        self._proxy: FaultProxy | None = None
        self._tick_task: asyncio.Task[None] | None = None
        self.port = 0

    async def __aenter__(self) -> PlcHost:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start serving (and the model clock)."""
        await self._start_server(0 if self._use_proxy else self._wanted_port)
        if self._use_proxy:
            self._proxy = FaultProxy(self.faults, self._server_port, seed=self._seed)
            self.port = await self._proxy.listen(self._wanted_port)
        else:
            self.port = self._server_port
        self._tick_task = asyncio.create_task(self._ticks(), name=f"plc-{self.model.plc_id}.tick")

    async def stop(self) -> None:
        """Stop everything this host started."""
        if self._tick_task is not None:
            self._tick_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick_task
            self._tick_task = None
        if self._proxy is not None:
            await self._proxy.close()
            self._proxy = None
        await self._stop_server()

    async def restart(self, downtime_s: float = 0.0) -> None:
        """Power-cycle the PLC: every connection drops, the model reboots with a new epoch."""
        await self._stop_server()
        if self._proxy is not None:
            self._proxy.drop_connections()
        if downtime_s > 0:
            await asyncio.sleep(downtime_s)
        self.model.reboot(time.monotonic())
        await self._start_server(self._server_port)
        if self._proxy is not None:
            self._proxy.upstream_port = self._server_port

    async def go_offline(self) -> None:
        """Refuse connections and drop the open ones (the PLC left the network)."""
        if self._proxy is not None:
            await self._proxy.close()
            self._proxy = None
        else:
            await self._stop_server()

    async def go_online(self) -> None:
        """Undo `go_offline` on the same port."""
        if self._use_proxy and self._proxy is None:
            self._proxy = FaultProxy(self.faults, self._server_port, seed=self._seed)
            await self._proxy.listen(self.port)
        elif not self._use_proxy and self._server is None:
            await self._start_server(self.port)

    def drop_connections(self) -> None:
        """Close every client connection (the PLC side resets them)."""
        if self._proxy is not None:
            self._proxy.drop_connections()

    # -- internals ------------------------------------------------------------------------

    async def _start_server(self, port: int) -> None:
        device = SimDevice(id=self.unit, simdata=self.model.simdata(), action=self._action)
        server = ModbusTcpServer([device], address=(LOCALHOST, port))
        await server.serve_forever(background=True)
        listener = server.transport
        sockets = getattr(listener, "sockets", None)
        self._server_port = int(sockets[0].getsockname()[1]) if sockets else port
        self._server = server

    async def _stop_server(self) -> None:
        if self._server is not None:
            await self._server.shutdown()  # type: ignore[no-untyped-call]
            self._server = None

    async def _ticks(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                self.model.tick(time.monotonic())
            except Exception:
                log.exception("PLC %s: tick failed", self.model.plc_id)

    async def _action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if function_code == 6 and set_values is None:
            return None  # FC6 echo: pymodbus reads back what it just stored
        if set_values is not None or function_code != 23:
            self.requests[function_code] += 1
        rule = self.faults.take(ACTION_KINDS, function_code, address, count)
        if rule is not None:
            return _EXC_OF[rule.kind]
        if function_code not in (3, 6, 16, 23):
            return ExcCodes.ILLEGAL_FUNCTION
        now = time.monotonic()
        if set_values is None:
            offset = address - start_address
            registers[offset : offset + count] = self.model.render(address, count, now)
            return None
        values = [int(v) for v in set_values]
        code = self.model.write(address, values, now)
        return None if code is None else ExcCodes(code)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for tests and the CLI)."""
    import socket

    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        port: int = s.getsockname()[1]
        return port


def default_seed() -> int:
    return int.from_bytes(os.urandom(4), "big")
