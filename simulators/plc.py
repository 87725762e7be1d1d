"""PLC simulators: the behaviour shared by the conveyor and the sorter, the site's ``[[plcs]]``
table, and the ``python -m simulators plcs SITE`` command.

A model owns its state in Python and talks registers only through the register map loaded from
``firmware-configs/plc/<kind>.toml`` (`devices.registers`): `PlcModel.render` encodes the
registers a client reads, `PlcModel.write` decodes and applies what it writes, refusing with
a Modbus exception code what a PLC would refuse (read-only entry: 02; half of a 32-bit value:
02; outside min/max: 03; full queue: 06).

Behaviour common to both belts (`BeltPlc`):

* commands START / STOP / RESET through the ``command`` register (executed once per write,
  set back to NONE, counted in ``command_count``);
* start ramp: STARTING until the belt reaches its setpoint (acceleration = max speed /
  ``ramp_s``), then RUNNING;
* jams (injected with `BeltPlc.jam`, or random at ``jam_rate_per_h``): JAMMED, belt stopped,
  needs RESET then START; e-stop (`BeltPlc.press_estop`): ESTOP until released and RESET;
* **watchdog**: while the belt runs, if the ``heartbeat`` register has not *changed* for more
  than ``watchdog_s`` (1 s), the belt stops by itself (STOPPED, fault WATCHDOG, flag
  ``watchdog_tripped``) and stays stopped until a START (which needs a fresh heartbeat);
* ``epoch`` is random at process start and increments on every `PlcModel.reboot`.

Physical durations (ramp, transit, divert, lane drain, jam rate) run ``speed`` times faster
than real time; the watchdog does not (it is a protocol contract).

Site file: the PLCs of a site are listed in an optional ``[[plcs]]`` array (see
``docs/plc-integration.md``)::

    [[plcs]]
    id = "conveyor-1"       # letters, digits, '-', '_', '.'
    kind = "conveyor"       # "conveyor" or "sorter"
    port = 15020            # TCP port on 127.0.0.1
    unit = 1                # Modbus unit id (default 1)
    length_mm = 12000       # conveyor: belt length
    speed_mm_s = 500        # conveyor: initial setpoint; sorter: belt speed
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import math
import random
import re
import shlex
import signal
import sys
import time
import tomllib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pymodbus.simulator import DataType, SimData

from devices.registers import (
    Register,
    RegisterMap,
    RegisterType,
    load_builtin_map,
)
from simulators.modbus_host import FaultKind, Faults, PlcHost

EXC_ILLEGAL_ADDRESS = 0x02
EXC_ILLEGAL_VALUE = 0x03
EXC_DEVICE_BUSY = 0x06

PlcKind = Literal["conveyor", "sorter"]
_DATATYPE = {
    RegisterType.UINT16: DataType.UINT16,
    RegisterType.INT16: DataType.INT16,
    RegisterType.UINT32: DataType.UINT32,
    RegisterType.INT32: DataType.INT32,
    RegisterType.FLOAT32: DataType.FLOAT32,
    RegisterType.BITS: DataType.UINT16,
}
Value = int | float


@dataclass(frozen=True, slots=True)
class SimEvent:
    """Something the PLC did, for tests and logs (``t`` is ``time.monotonic()``)."""

    t: float
    kind: str
    detail: str = ""
    cmd_id: int = 0


class PlcModel:
    """Register-level behaviour of one PLC; subclasses add the machine."""

    kind: ClassVar[str] = ""

    def __init__(
        self,
        plc_id: str,
        register_map: RegisterMap | None = None,
        *,
        epoch: int | None = None,
        speed: float = 1.0,
        watchdog_s: float = 1.0,
        seed: int | None = None,
    ) -> None:
        self.plc_id = plc_id
        self.map = register_map if register_map is not None else load_builtin_map(self.kind)
        if self.map.kind != self.kind:
            raise ValueError(
                f"{plc_id}: a {self.kind} needs a {self.kind} map, not {self.map.kind}"
            )
        if speed <= 0:
            raise ValueError("speed must be > 0")
        self.speed = speed
        self.watchdog_s = watchdog_s
        self.rng = random.Random(seed)
        self.epoch = epoch if epoch else self.rng.randrange(1, 0xFFFFFFFF)
        self.boots = 0
        self.events: deque[SimEvent] = deque(maxlen=20_000)
        self.writes: deque[tuple[float, dict[str, Value]]] = deque(maxlen=20_000)
        self._changed = asyncio.Event()
        self.stored: dict[str, Value | list[Value]] = {}
        self.boot(time.monotonic())

    # -- lifecycle ------------------------------------------------------------------------

    def boot(self, now: float) -> None:
        """Power-on state (subclasses extend)."""
        self.booted_at = now
        self.last_tick = now
        self.heartbeat = 0
        self.heartbeat_changed_at = -math.inf
        self.stored = {
            reg.name: ([0.0 if reg.type.is_float else 0] * reg.count if reg.count > 1 else 0)
            for reg in self.map.registers
            if reg.writable
        }
        for reg in self.map.registers:
            if reg.writable and reg.type.is_float and reg.count == 1:
                self.stored[reg.name] = 0.0

    def reboot(self, now: float) -> None:
        """Restart: volatile state lost, new epoch."""
        self.epoch = self.epoch % 0xFFFFFFFF + 1
        self.boots += 1
        self.boot(now)
        self.event(now, "reboot", f"epoch {self.epoch}")

    # -- registers ------------------------------------------------------------------------

    def simdata(self) -> list[SimData]:
        """One pymodbus ``SimData`` per map entry (gaps stay invalid addresses)."""
        return [
            SimData(
                reg.address,
                count=reg.count,
                values=0.0 if reg.type.is_float else 0,
                datatype=_DATATYPE[reg.type],
            )
            for reg in self.map.registers
        ]

    def values(self, now: float) -> dict[str, Value | Sequence[Value]]:
        """Every register's current value by name (subclasses add theirs)."""
        out: dict[str, Value | Sequence[Value]] = dict(self.stored)
        out["epoch"] = self.epoch
        out["heartbeat_echo"] = self.heartbeat
        out["uptime_s"] = int(max(0.0, now - self.booted_at))
        return out

    def render(self, address: int, count: int, now: float) -> list[int]:
        """The registers ``address .. address + count - 1`` as a client reads them now."""
        self.advance_to(now)
        values = self.values(now)
        out = [0] * count
        for reg in self.map.touching(address, count):
            value = values.get(reg.name, 0)
            words = _encode_raw(reg, value)
            for i, word in enumerate(words):
                a = reg.address + i
                if address <= a < address + count:
                    out[a - address] = word
        return out

    def write(self, address: int, registers: list[int], now: float) -> int | None:
        """Apply a client write; a Modbus exception code if refused (nothing applied then)."""
        count = len(registers)
        touched = self.map.touching(address, count)
        covered = self.map.covering(address, count)
        if len(touched) != len(covered) or sum(r.size for r in covered) != count:
            return EXC_ILLEGAL_ADDRESS
        updates: dict[str, Value] = {}
        for reg in covered:
            if not reg.writable or reg.count > 1:
                return EXC_ILLEGAL_ADDRESS
            offset = reg.address - address
            value = reg.decode(registers[offset : offset + reg.size])
            try:
                reg.check(value)
            except ValueError:
                return EXC_ILLEGAL_VALUE
            updates[reg.name] = value
        self.advance_to(now)
        code = self.apply(updates, now)
        if code is None:
            self.writes.append((now, updates))
        self.touch()
        return code

    def apply(self, updates: Mapping[str, Value], now: float) -> int | None:
        """Apply decoded writes atomically (subclasses handle their entries first)."""
        for name, value in updates.items():
            if name == "heartbeat" and int(value) != self.heartbeat:
                self.heartbeat = int(value)
                self.heartbeat_changed_at = now
            self.stored[name] = value
        return None

    # -- time -----------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Called by the host every few milliseconds."""
        self.advance_to(now)
        self.touch()

    def advance_to(self, now: float) -> None:
        if now <= self.last_tick:
            return
        dt = now - self.last_tick
        self.last_tick = now
        self.step(now, dt)

    def step(self, now: float, dt: float) -> None:
        """Advance the machine by ``dt`` real seconds (subclasses)."""

    def heartbeat_fresh(self, now: float) -> bool:
        return now - self.heartbeat_changed_at <= self.watchdog_s

    # -- observation ----------------------------------------------------------------------

    def event(self, now: float, kind: str, detail: str = "", cmd_id: int = 0) -> None:
        self.events.append(SimEvent(now, kind, detail, cmd_id))

    def events_of(self, kind: str) -> list[SimEvent]:
        return [e for e in self.events if e.kind == kind]

    def touch(self) -> None:
        changed = self._changed
        self._changed = asyncio.Event()
        changed.set()

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> None:
        """Return once ``predicate()`` holds (checked after every tick and write)."""
        async with asyncio.timeout(timeout_s):
            while not predicate():
                await self._changed.wait()


def _encode_raw(reg: Register, value: Value | Sequence[Value]) -> list[int]:
    if reg.count > 1:
        items = list(value) if isinstance(value, Sequence) else [value] * reg.count
        items = (items + [0] * reg.count)[: reg.count]
        out: list[int] = []
        for item in items:
            out.extend(_encode_one(reg, item))
        return out
    if isinstance(value, Sequence):
        raise TypeError(f"{reg.name} is not an array")
    return _encode_one(reg, value)


def _encode_one(reg: Register, value: Value) -> list[int]:
    if reg.type.is_float:
        value = float(value)
    else:
        value = int(value)
        if reg.type in (RegisterType.UINT16, RegisterType.BITS):
            value &= 0xFFFF
        elif reg.type is RegisterType.UINT32:
            value &= 0xFFFFFFFF
    try:
        return reg.encode(value)
    except ValueError:
        # The PLC's own values are not limit-checked (the limits are for writes).
        unlimited = Register(reg.name, reg.address, reg.type, reg.access)
        return unlimited.encode(value)


class BeltState(enum.Enum):
    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    JAMMED = "JAMMED"
    ESTOP = "ESTOP"
    FAULT = "FAULT"


_MOVING = (BeltState.STARTING, BeltState.RUNNING)


class BeltPlc(PlcModel):
    """A belt with commands, ramp, jams, e-stop and the heartbeat watchdog."""

    def __init__(
        self,
        plc_id: str,
        register_map: RegisterMap | None = None,
        *,
        max_speed_mm_s: float = 2000.0,
        ramp_s: float = 1.0,
        jam_rate_per_h: float = 0.0,
        **kwargs: Any,
    ) -> None:
        self.max_speed_mm_s = max_speed_mm_s
        self.ramp_s = ramp_s
        self.jam_rate_per_h = jam_rate_per_h
        super().__init__(plc_id, register_map, **kwargs)

    def boot(self, now: float) -> None:
        super().boot(now)
        self.state = BeltState.STOPPED
        self.fault = "NONE"
        self.watchdog_tripped = False
        self.estop_pressed = False
        self.speed_actual = 0.0
        self.command_count = 0

    @property
    def setpoint(self) -> float:
        return float(self.nominal_speed())

    def nominal_speed(self) -> float:
        """Speed the belt ramps to (mm/s)."""
        return self.max_speed_mm_s

    @property
    def moving(self) -> bool:
        return self.state in _MOVING

    def values(self, now: float) -> dict[str, Value | Sequence[Value]]:
        out = super().values(now)
        out["state"] = self.map["state"].value_of(self.state.value)
        out["fault_code"] = self.map["fault_code"].value_of(self.fault)
        out["flags"] = self.map["flags"].pack_flags(self.flag_names())
        out["speed_actual"] = self.speed_actual
        out["command_count"] = self.command_count & 0xFFFF
        out["command"] = 0  # taken as soon as written
        return out

    def flag_names(self) -> set[str]:
        names: set[str] = set()
        if self.moving:
            names.add("running")
        if self.state is BeltState.JAMMED:
            names.add("jam")
        if self.estop_pressed:
            names.add("estop")
        if self.watchdog_tripped:
            names.add("watchdog_tripped")
        if self.state is BeltState.STARTING or (
            self.state is BeltState.RUNNING and abs(self.speed_actual - self.setpoint) > 1e-6
        ):
            names.add("ramping")
        return names

    def apply(self, updates: Mapping[str, Value], now: float) -> int | None:
        code = super().apply(updates, now)
        command = updates.get("command")
        if code is None and command is not None:
            name = self.map["command"].name_of(int(command))
            if name is None:
                return None
            if name != "NONE":
                self.command_count += 1
                self.run_command(name, now)
        return code

    def run_command(self, name: str, now: float) -> None:
        if name == "START":
            self.start(now)
        elif name == "STOP":
            self.stop(now, "command")
        elif name == "RESET":
            self.reset(now)

    def start(self, now: float) -> None:
        if self.estop_pressed or self.state is BeltState.ESTOP:
            self.event(now, "start_refused", "e-stop")
        elif self.state in (BeltState.JAMMED, BeltState.FAULT):
            self.event(now, "start_refused", f"{self.state.value}: RESET first")
        elif not self.heartbeat_fresh(now):
            self.fault = "WATCHDOG"
            self.event(now, "start_refused", "no fresh heartbeat")
        elif self.state is BeltState.STOPPED:
            self.state = BeltState.STARTING
            self.fault = "NONE"
            self.watchdog_tripped = False
            self.event(now, "start")
        else:
            self.event(now, "start", "already running")

    def stop(self, now: float, why: str) -> None:
        if self.moving:
            self.state = BeltState.STOPPED
        self.speed_actual = 0.0
        self.event(now, "stop", why)

    def reset(self, now: float) -> None:
        if self.state is BeltState.ESTOP and self.estop_pressed:
            self.event(now, "reset_refused", "e-stop still pressed")
            return
        if self.state in (BeltState.JAMMED, BeltState.ESTOP, BeltState.FAULT):
            self.state = BeltState.STOPPED
        self.fault = "NONE"
        self.watchdog_tripped = False
        self.event(now, "reset")

    # -- injected events ------------------------------------------------------------------

    def jam(self, now: float | None = None) -> None:
        """A jam: the belt stops, JAMMED until RESET."""
        now = time.monotonic() if now is None else now
        self.advance_to(now)
        if self.state is BeltState.ESTOP:
            return
        self.state = BeltState.JAMMED
        self.fault = "JAM"
        self.speed_actual = 0.0
        self.event(now, "jam")
        self.touch()

    def press_estop(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.advance_to(now)
        self.estop_pressed = True
        self.state = BeltState.ESTOP
        self.fault = "ESTOP"
        self.speed_actual = 0.0
        self.event(now, "estop", "pressed")
        self.touch()

    def release_estop(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.estop_pressed = False
        self.event(now, "estop", "released")
        self.touch()

    # -- time -----------------------------------------------------------------------------

    def step(self, now: float, dt: float) -> None:
        if self.moving and not self.heartbeat_fresh(now):
            self.state = BeltState.STOPPED
            self.fault = "WATCHDOG"
            self.watchdog_tripped = True
            self.speed_actual = 0.0
            self.event(
                now, "watchdog", f"no heartbeat change for {now - self.heartbeat_changed_at:.3f} s"
            )
        sim_dt = dt * self.speed
        jam_chance = self.jam_rate_per_h * sim_dt / 3600.0
        if self.moving and jam_chance > 0 and self.rng.random() < jam_chance:
            self.jam(now)
        before = self.speed_actual
        if self.moving:
            target = self.setpoint
            accel = self.max_speed_mm_s / self.ramp_s if self.ramp_s > 0 else math.inf
            change = accel * sim_dt
            if abs(target - before) <= change:
                self.speed_actual = target
                if self.state is BeltState.STARTING:
                    self.state = BeltState.RUNNING
                    self.event(now, "running")
            else:
                self.speed_actual = before + math.copysign(change, target - before)
        else:
            self.speed_actual = 0.0
        distance = (before + self.speed_actual) / 2.0 * sim_dt
        if distance > 0:
            self.move(now, distance)

    def move(self, now: float, distance_mm: float) -> None:
        """The belt travelled ``distance_mm`` (subclasses move their totes)."""


# ---------------------------------------------------------------------------- site spec
class PlcSiteError(Exception):
    """The site's ``[[plcs]]`` table is missing or wrong; lists every problem."""

    def __init__(self, source: str, errors: list[tuple[str, str]]) -> None:
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  {path}: {msg}" for path, msg in errors)
        super().__init__(f"{source}: {len(errors)} PLC error(s)\n{lines}")


@dataclass(frozen=True, slots=True)
class PlcSpec:
    """One ``[[plcs]]`` entry of a site file (defaults suit a demo)."""

    id: str
    kind: PlcKind
    port: int
    unit: int = 1
    # conveyor
    length_mm: float = 12_000.0
    max_speed_mm_s: float = 2_000.0
    # both: conveyor initial setpoint / sorter belt speed
    speed_mm_s: float = 500.0
    ramp_s: float = 1.0
    jam_rate_per_h: float = 0.0
    # sorter
    lanes: int = 8
    lane_capacity: int = 6
    queue_capacity: int = 8
    induct_mm: float = 2_000.0
    lane_pitch_mm: float = 1_000.0
    loop_mm: float = 20_000.0
    max_recirculations: int = 2
    lane_drain_s: float = 20.0


_SPEC_FLOATS = (
    "length_mm",
    "max_speed_mm_s",
    "speed_mm_s",
    "ramp_s",
    "jam_rate_per_h",
    "induct_mm",
    "lane_pitch_mm",
    "loop_mm",
    "lane_drain_s",
)
_SPEC_INTS = ("unit", "lanes", "lane_capacity", "queue_capacity", "max_recirculations")
_CONTROLLER_ONLY = ("host", "timeout_s", "heartbeat")
"""Keys of the controller's ``[[plcs]]`` entry (controller/config.py) the simulator ignores."""
_PLC_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
"""The controller's ``Identifier``: ids appear in MQTT topics and metric labels."""


def parse_plcs(data: Mapping[str, object], source: str = "<site>") -> tuple[PlcSpec, ...]:
    """The ``[[plcs]]`` entries of a decoded site document (empty if there are none)."""
    raw = data.get("plcs", [])
    errors: list[tuple[str, str]] = []
    if not isinstance(raw, list) or not all(isinstance(p, dict) for p in raw):
        raise PlcSiteError(source, [("plcs", "must be an array of tables ([[plcs]])")])
    specs: list[PlcSpec] = []
    known = {"id", "kind", "port", *_CONTROLLER_ONLY, *_SPEC_FLOATS, *_SPEC_INTS}
    for index, entry in enumerate(raw):
        path = f"plcs[{index}]"
        for key in entry:
            if key not in known:
                errors.append((f"{path}.{key}", "unknown key"))
        plc_id = entry.get("id")
        if not isinstance(plc_id, str) or not _PLC_ID.fullmatch(plc_id):
            errors.append(
                (f"{path}.id", "missing or not ASCII letters, digits, '-', '_', '.' (max 64)")
            )
            plc_id = f"plc{index}"
        kind = entry.get("kind")
        if kind not in ("conveyor", "sorter"):
            errors.append((f"{path}.kind", "must be 'conveyor' or 'sorter'"))
            kind = "conveyor"
        port = entry.get("port")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            errors.append((f"{path}.port", "missing or not a TCP port (1..65535)"))
            port = 1
        fields: dict[str, float | int] = {}
        for key in _SPEC_FLOATS:
            if key in entry:
                value = entry[key]
                if isinstance(value, bool) or not isinstance(value, int | float):
                    errors.append((f"{path}.{key}", "must be a number"))
                elif not math.isfinite(value) or value < 0:
                    errors.append((f"{path}.{key}", "must be finite and >= 0"))
                else:
                    fields[key] = float(value)
        for key in _SPEC_INTS:
            if key in entry:
                value = entry[key]
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    errors.append((f"{path}.{key}", "must be an integer >= 0"))
                else:
                    fields[key] = value
        spec = PlcSpec(plc_id, "sorter" if kind == "sorter" else "conveyor", port, **fields)  # type: ignore[arg-type]
        if not 1 <= spec.unit <= 247:
            errors.append((f"{path}.unit", "must be 1..247"))
        if spec.kind == "sorter":
            if not 1 <= spec.lanes <= 16:
                errors.append((f"{path}.lanes", "must be 1..16"))
            if not 1 <= spec.queue_capacity <= 8:
                errors.append((f"{path}.queue_capacity", "must be 1..8 (pending_ids has 8 slots)"))
            if spec.lane_capacity < 1:
                errors.append((f"{path}.lane_capacity", "must be >= 1"))
        if spec.length_mm <= 0 or spec.max_speed_mm_s <= 0:
            errors.append((path, "length_mm and max_speed_mm_s must be > 0"))
        if spec.speed_mm_s > spec.max_speed_mm_s:
            errors.append((f"{path}.speed_mm_s", "above max_speed_mm_s"))
        specs.append(spec)
    seen_ids: dict[str, int] = {}
    seen_ports: dict[int, int] = {}
    for index, spec in enumerate(specs):
        if spec.id in seen_ids:
            errors.append((f"plcs[{index}].id", f"duplicate of plcs[{seen_ids[spec.id]}]"))
        seen_ids.setdefault(spec.id, index)
        if spec.port in seen_ports:
            errors.append((f"plcs[{index}].port", f"also used by plcs[{seen_ports[spec.port]}]"))
        seen_ports.setdefault(spec.port, index)
    if errors:
        raise PlcSiteError(source, errors)
    return tuple(specs)


def load_plcs(path: str | Path) -> tuple[PlcSpec, ...]:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PlcSiteError(str(p), [("<file>", exc.strerror or str(exc))]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PlcSiteError(str(p), [("<toml>", str(exc))]) from None
    return parse_plcs(data, str(p))


def build_model(spec: PlcSpec, *, speed: float = 1.0, seed: int | None = None) -> BeltPlc:
    """The simulator model for one ``[[plcs]]`` entry."""
    from simulators.conveyor import ConveyorPlc
    from simulators.sorter import SorterPlc

    if spec.kind == "conveyor":
        return ConveyorPlc(
            spec.id,
            length_mm=spec.length_mm,
            max_speed_mm_s=spec.max_speed_mm_s,
            initial_speed_mm_s=spec.speed_mm_s,
            ramp_s=spec.ramp_s,
            jam_rate_per_h=spec.jam_rate_per_h,
            speed=speed,
            seed=seed,
        )
    return SorterPlc(
        spec.id,
        lanes=spec.lanes,
        lane_capacity=spec.lane_capacity,
        queue_capacity=spec.queue_capacity,
        belt_speed_mm_s=spec.speed_mm_s,
        induct_mm=spec.induct_mm,
        lane_pitch_mm=spec.lane_pitch_mm,
        loop_mm=spec.loop_mm,
        max_recirculations=spec.max_recirculations,
        lane_drain_s=spec.lane_drain_s,
        ramp_s=spec.ramp_s,
        jam_rate_per_h=spec.jam_rate_per_h,
        speed=speed,
        seed=seed,
    )


# ---------------------------------------------------------------------- control channel
CONTROL_HELP = """commands (one per line; replies start with "ok" or "error"):
  list                                 PLCs with id, kind, port, state
  <id> status                          state, epoch, counters
  <id> jam | estop on | estop off      machine events
  <id> restart                         power cycle: new epoch, connections dropped
  <id> offline | online                refuse connections / accept again
  <id> latency <seconds>               added before every request (slow PLC)
  <id> blackhole on | off              half-open: requests never answered
  <id> fault <kind> [count|always] [fc=N] [address=N] [delay=S]
                                       kinds: busy illegal_address device_failure drop_request
                                       drop_reply delay_reply garbage short_frame wrong_unit
                                       bad_protocol wrong_function
  <id> clear                           remove every fault
"""


class PlcRack:
    """The running PLCs of a site, with a text control interface."""

    def __init__(self, hosts: dict[str, PlcHost]) -> None:
        self.hosts = hosts

    async def command(self, line: str) -> str:
        try:
            words = shlex.split(line)
        except ValueError as exc:
            return f"error {exc}"
        if not words:
            return "error empty command"
        if words == ["help"]:
            return "ok\n" + CONTROL_HELP
        if words == ["list"]:
            rows = [
                f"{pid} {h.model.kind} 127.0.0.1:{h.port} {_state_of(h)}"
                for pid, h in self.hosts.items()
            ]
            return "ok\n" + "\n".join(rows)
        host = self.hosts.get(words[0])
        if host is None or len(words) < 2:
            return f"error unknown PLC or missing action: {line!r} (try 'help')"
        model = host.model
        action, args = words[1], words[2:]
        assert isinstance(model, BeltPlc)
        if action == "status":
            return f"ok {_state_of(host)} epoch={model.epoch} boots={model.boots} " + " ".join(
                f"{k}={v}" for k, v in sorted(host.faults.hits.items())
            )
        if action == "jam":
            model.jam()
        elif action == "estop" and args in (["on"], ["off"]):
            (model.press_estop if args == ["on"] else model.release_estop)()
        elif action == "restart":
            await host.restart()
        elif action == "offline":
            await host.go_offline()
        elif action == "online":
            await host.go_online()
        elif action == "latency" and len(args) == 1:
            host.faults.latency_s = float(args[0])
        elif action == "blackhole" and args in (["on"], ["off"]):
            host.faults.black_hole = args == ["on"]
        elif action == "clear":
            host.faults.clear()
        elif action == "fault" and args:
            return _add_fault(host.faults, args)
        else:
            return f"error unknown action {action!r} (try 'help')"
        return "ok"


def _state_of(host: PlcHost) -> str:
    model = host.model
    return model.state.value if isinstance(model, BeltPlc) else "?"


def _add_fault(faults: Faults, args: list[str]) -> str:
    try:
        kind = FaultKind(args[0])
        count: int | None = 1
        fcs: list[int] | None = None
        address: int | None = None
        delay_s = 0.0
        for arg in args[1:]:
            if arg == "always":
                count = None
            elif arg.isdigit():
                count = int(arg)
            elif arg.startswith("fc="):
                fcs = [int(x) for x in arg[3:].split(",")]
            elif arg.startswith("address="):
                address = int(arg[8:])
            elif arg.startswith("delay="):
                delay_s = float(arg[6:])
            else:
                return f"error unknown fault argument {arg!r}"
    except ValueError as exc:
        return f"error {exc}"
    faults.add(kind, count, function_codes=fcs, address=address, delay_s=delay_s)
    return "ok"


async def _serve_control(rack: PlcRack, port: int) -> asyncio.Server:
    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                reply = await rack.command(line.decode("utf-8", "replace").strip())
                writer.write(reply.encode() + b"\n")
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(client, "127.0.0.1", port)


# -------------------------------------------------------------------------------- CLI
def add_plcs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("site", type=Path, help="site TOML file with a [[plcs]] table")
    p.add_argument(
        "--speed", type=float, default=1.0, help="physical time factor (2 = twice as fast)"
    )
    p.add_argument("--duration", type=float, default=None, help="exit after this many seconds")
    p.add_argument(
        "--control-port",
        type=int,
        default=None,
        help="serve the text control interface on this 127.0.0.1 port ('help' lists commands)",
    )
    p.add_argument(
        "--no-faults", action="store_true", help="no fault proxy (faster; no drop/garbage faults)"
    )
    p.add_argument("--tick", type=float, default=0.01, help="model time step in seconds")
    p.add_argument("--seed", type=int, default=None)


def plcs_main(args: argparse.Namespace) -> int:
    try:
        specs = load_plcs(args.site)
    except PlcSiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not specs:
        print(f"error: {args.site}: no [[plcs]] entries", file=sys.stderr)
        return 2
    if args.speed <= 0 or args.tick <= 0:
        print("error: --speed and --tick must be > 0", file=sys.stderr)
        return 2
    return asyncio.run(_run_plcs(args, specs))


async def _run_plcs(args: argparse.Namespace, specs: Sequence[PlcSpec]) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    hosts: dict[str, PlcHost] = {}
    control: asyncio.Server | None = None
    try:
        async with contextlib.AsyncExitStack() as stack:
            for index, spec in enumerate(specs):
                seed = None if args.seed is None else args.seed + index
                host = PlcHost(
                    build_model(spec, speed=args.speed, seed=seed),
                    port=spec.port,
                    unit=spec.unit,
                    proxy=not args.no_faults,
                    tick_s=args.tick,
                    seed=seed,
                )
                await stack.enter_async_context(host)
                hosts[spec.id] = host
                print(
                    f"{spec.kind} {spec.id!r} listening on 127.0.0.1:{host.port} unit {spec.unit} "
                    f"(epoch {host.model.epoch})",
                    flush=True,
                )
            rack = PlcRack(hosts)
            if args.control_port is not None:
                control = await _serve_control(rack, args.control_port)
                print(
                    f"control on 127.0.0.1:{args.control_port} ('help' lists commands)", flush=True
                )
            print(f"{len(hosts)} PLC(s) running; Ctrl-C to stop", flush=True)
            try:
                async with asyncio.timeout(args.duration):
                    await stop.wait()
            except TimeoutError:
                pass
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if control is not None:
            control.close()
    print("PLCs stopped", flush=True)
    return 0
