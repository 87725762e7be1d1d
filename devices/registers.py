"""PLC register maps as data: loaded from ``firmware-configs/plc/*.toml``, checked, frozen.

The same map drives the device drivers (`devices.conveyor`, `devices.sorter`) and the PLC
simulators, so an address or a type lives in exactly one place.

Every entry is a holding register (Modbus function codes 3, 6, 16): coils are not used,
because a command and its parameters must arrive in one atomic write (FC16).

Encoding (documented for the PLC programmer in ``docs/plc-integration.md``):

* each register is 16 bits, big-endian on the wire (Modbus);
* 32-bit values (``UINT32``, ``INT32``, ``FLOAT32``) take two consecutive registers, **high
  word first** (word order "ABCD": the register at ``address`` holds bits 31..16, the one at
  ``address + 1`` bits 15..0); ``FLOAT32`` is IEEE 754 single precision;
* ``INT16`` / ``INT32`` are two's complement;
* ``BITS`` is one register of named flags, bit 0 = least significant bit;
* an entry with ``count = N`` is an array of N consecutive values of its type.

A map file fails to load, naming the file and the offending entry, when an entry is missing a
field, has an unknown type or access, lies outside ``0..max_address``, overlaps another entry,
or declares enum values / bit names / limits that do not fit its type.
"""

from __future__ import annotations

import enum
import itertools
import math
import struct
import tomllib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from devices.errors import DeviceConfigError

__all__ = [
    "MAX_READ_REGISTERS",
    "Access",
    "Register",
    "RegisterMap",
    "RegisterMapError",
    "RegisterType",
    "Snapshot",
    "builtin_map_path",
    "load_builtin_map",
    "load_register_map",
    "maps_dir",
    "parse_register_map",
]

MAX_READ_REGISTERS = 125
"""Largest FC3 read (Modbus application protocol, 6.3)."""
MAX_WRITE_REGISTERS = 123
"""Largest FC16 write (Modbus application protocol, 6.12)."""
MAX_ADDRESS = 0xFFFF

Access = Literal["r", "rw"]
Value = int | float

PACKAGED_MAPS = "register_maps"
"""Where a wheel holds ``firmware-configs/plc``: package data of ``devices`` (pyproject.toml
maps the folder there; the repository keeps it at the top level, beside the other configs)."""


def maps_dir() -> Path:
    """The folder of the shipped register maps: ``devices/register_maps`` of an installed
    wheel, else ``firmware-configs/plc`` of the checkout this package runs from (a git
    checkout or an editable install)."""
    packaged = resources.files("devices").joinpath(PACKAGED_MAPS)
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[1] / "firmware-configs" / "plc"


class RegisterType(enum.Enum):
    """The value types a register map may use (names as written in the TOML files)."""

    UINT16 = "UINT16"
    INT16 = "INT16"
    UINT32 = "UINT32"
    INT32 = "INT32"
    FLOAT32 = "FLOAT32"
    BITS = "BITS"

    @property
    def width(self) -> int:
        """Registers per value."""
        return 2 if self in _WIDE else 1

    @property
    def is_float(self) -> bool:
        return self is RegisterType.FLOAT32


_WIDE = frozenset({RegisterType.UINT32, RegisterType.INT32, RegisterType.FLOAT32})
_INT_RANGE: dict[RegisterType, tuple[int, int]] = {
    RegisterType.UINT16: (0, 0xFFFF),
    RegisterType.INT16: (-0x8000, 0x7FFF),
    RegisterType.UINT32: (0, 0xFFFFFFFF),
    RegisterType.INT32: (-0x80000000, 0x7FFFFFFF),
    RegisterType.BITS: (0, 0xFFFF),
}
_FLOAT32_MAX = 3.4028234663852886e38


class RegisterMapError(DeviceConfigError):
    """A register map file is missing, not TOML, or inconsistent; lists every problem found."""

    def __init__(self, source: str, errors: list[tuple[str, str]]) -> None:
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  {path}: {msg}" for path, msg in errors)
        super().__init__(f"{source}: {len(errors)} register map error(s)\n{lines}")


@dataclass(frozen=True, slots=True)
class Register:
    """One entry of a register map: a value (or an array of ``count`` values) of one type."""

    name: str
    address: int
    type: RegisterType
    access: Access
    unit: str = ""
    description: str = ""
    count: int = 1
    values: tuple[tuple[str, int], ...] = ()
    """Named values of an enum register (``STOPPED = 0`` ...)."""
    bits: tuple[tuple[str, int], ...] = ()
    """Named bits of a ``BITS`` register (bit 0 = least significant)."""
    minimum: float | None = None
    maximum: float | None = None

    @property
    def width(self) -> int:
        """Registers per element."""
        return self.type.width

    @property
    def size(self) -> int:
        """Registers taken by the whole entry."""
        return self.type.width * self.count

    @property
    def end(self) -> int:
        """Last address of the entry (inclusive)."""
        return self.address + self.size - 1

    @property
    def writable(self) -> bool:
        return self.access == "rw"

    def value_of(self, name: str) -> int:
        """The number of enum value ``name``; `KeyError` if the map does not define it."""
        for value_name, number in self.values:
            if value_name == name:
                return number
        raise KeyError(f"{self.name}: no value named {name!r}")

    def name_of(self, number: int) -> str | None:
        """The enum name of ``number``, or None if the map does not name it."""
        for value_name, value in self.values:
            if value == number:
                return value_name
        return None

    def bit_of(self, name: str) -> int:
        for bit_name, bit in self.bits:
            if bit_name == name:
                return bit
        raise KeyError(f"{self.name}: no bit named {name!r}")

    def flags(self, raw: int) -> frozenset[str]:
        """Names of the bits set in ``raw``."""
        return frozenset(name for name, bit in self.bits if raw >> bit & 1)

    def pack_flags(self, names: Iterable[str]) -> int:
        raw = 0
        for name in names:
            raw |= 1 << self.bit_of(name)
        return raw

    def check(self, value: Value) -> None:
        """Raise `ValueError` unless ``value`` fits the type and the declared limits."""
        kind = self.type
        if kind.is_float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{self.name}: expected a number, got {value!r}")
            if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
                raise ValueError(f"{self.name}: {value!r} is not a finite FLOAT32")
        else:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{self.name}: expected an integer, got {value!r}")
            low, high = _INT_RANGE[kind]
            if not low <= value <= high:
                raise ValueError(f"{self.name}: {value} outside the {kind.value} range")
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"{self.name}: {value} below the minimum {self.minimum:g}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"{self.name}: {value} above the maximum {self.maximum:g}")

    def encode(self, value: Value) -> list[int]:
        """Registers holding one element ``value`` (high word first); `ValueError` if invalid."""
        self.check(value)
        return _encode(self.type, value)

    def encode_array(self, values: Sequence[Value]) -> list[int]:
        """Registers holding all ``count`` elements."""
        if len(values) != self.count:
            raise ValueError(f"{self.name}: needs {self.count} values, got {len(values)}")
        out: list[int] = []
        for value in values:
            out.extend(self.encode(value))
        return out

    def decode(self, registers: Sequence[int]) -> Value:
        """One element from its ``width`` registers (no limit check: the PLC's word stands)."""
        if len(registers) != self.width:
            raise ValueError(f"{self.name}: needs {self.width} registers, got {len(registers)}")
        return _decode(self.type, registers)

    def decode_array(self, registers: Sequence[int]) -> tuple[Value, ...]:
        if len(registers) != self.size:
            raise ValueError(f"{self.name}: needs {self.size} registers, got {len(registers)}")
        w = self.width
        return tuple(_decode(self.type, registers[i : i + w]) for i in range(0, self.size, w))


def _encode(kind: RegisterType, value: Value) -> list[int]:
    if kind is RegisterType.FLOAT32:
        high, low = struct.unpack(">HH", struct.pack(">f", float(value)))
        return [high, low]
    number = int(value)
    if kind is RegisterType.INT16:
        return [number & 0xFFFF]
    if kind in (RegisterType.UINT32, RegisterType.INT32):
        number &= 0xFFFFFFFF
        return [number >> 16, number & 0xFFFF]
    return [number]


def _decode(kind: RegisterType, registers: Sequence[int]) -> Value:
    if kind is RegisterType.FLOAT32:
        value: float = struct.unpack(">f", struct.pack(">HH", registers[0], registers[1]))[0]
        return value
    if kind is RegisterType.INT16:
        raw = registers[0]
        return raw - 0x10000 if raw & 0x8000 else raw
    if kind is RegisterType.UINT32:
        return registers[0] << 16 | registers[1]
    if kind is RegisterType.INT32:
        raw = registers[0] << 16 | registers[1]
        return raw - 0x100000000 if raw & 0x80000000 else raw
    return registers[0]


class Snapshot:
    """Decoded values of the registers read in one block, with typed accessors."""

    __slots__ = ("_map", "_values")

    def __init__(self, register_map: RegisterMap, values: dict[str, Value | tuple[Value, ...]]):
        self._map = register_map
        self._values = values

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def raw(self) -> dict[str, Value | tuple[Value, ...]]:
        """Every decoded entry by name (arrays as tuples)."""
        return dict(self._values)

    def int_of(self, name: str) -> int:
        value = self._values[name]
        if isinstance(value, (tuple, float)):
            raise TypeError(f"{name} is not an integer register")
        return value

    def float_of(self, name: str) -> float:
        value = self._values[name]
        if isinstance(value, tuple):
            raise TypeError(f"{name} is an array")
        return float(value)

    def ints_of(self, name: str) -> tuple[int, ...]:
        value = self._values[name]
        if not isinstance(value, tuple):
            raise TypeError(f"{name} is not an array")
        return tuple(int(v) for v in value)

    def enum_of(self, name: str) -> str | None:
        """The enum name of an enum register's value (None if the number is not named)."""
        return self._map[name].name_of(self.int_of(name))

    def flags_of(self, name: str) -> frozenset[str]:
        """Names of the bits set in a ``BITS`` register."""
        return self._map[name].flags(self.int_of(name))


@dataclass(frozen=True, slots=True)
class RegisterMap:
    """A checked register map: entries sorted by address, no overlaps, inside the space."""

    kind: str
    version: int
    source: str
    max_address: int
    registers: tuple[Register, ...]
    description: str = ""
    _by_name: dict[str, Register] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name.update({r.name: r for r in self.registers})

    def __getitem__(self, name: str) -> Register:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"{self.source}: no register named {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[Register]:
        return iter(self.registers)

    def blocks(self, limit: int = MAX_READ_REGISTERS) -> tuple[tuple[int, int], ...]:
        """``(address, count)`` runs of consecutive entries, each at most ``limit`` registers,
        covering the whole map: what a full read needs (a read across a gap is refused by the
        PLC with "illegal address")."""
        out: list[tuple[int, int]] = []
        start = end = -2
        for reg in self.registers:
            if reg.address == end + 1 and reg.end - start + 1 <= limit:
                end = reg.end
                continue
            if start >= 0:
                out.append((start, end - start + 1))
            start, end = reg.address, reg.end
        if start >= 0:
            out.append((start, end - start + 1))
        return tuple(out)

    def covering(self, address: int, count: int) -> list[Register]:
        """Entries lying entirely inside ``address .. address + count - 1``."""
        last = address + count - 1
        return [r for r in self.registers if r.address >= address and r.end <= last]

    def touching(self, address: int, count: int) -> list[Register]:
        """Entries with at least one register inside the range."""
        last = address + count - 1
        return [r for r in self.registers if r.end >= address and r.address <= last]

    def decode(self, address: int, registers: Sequence[int]) -> Snapshot:
        """Decode every entry lying entirely inside a block read at ``address``."""
        values: dict[str, Value | tuple[Value, ...]] = {}
        for reg in self.covering(address, len(registers)):
            offset = reg.address - address
            chunk = registers[offset : offset + reg.size]
            values[reg.name] = reg.decode_array(chunk) if reg.count > 1 else reg.decode(chunk)
        return Snapshot(self, values)

    def encode(self, values: Mapping[str, Value | Sequence[Value]]) -> tuple[int, list[int]]:
        """``(address, registers)`` of one write covering the named entries, which must be
        consecutive (no gap, no entry left out in between); `ValueError` otherwise."""
        if not values:
            raise ValueError("nothing to encode")
        regs = sorted((self[name] for name in values), key=lambda r: r.address)
        out: list[int] = []
        expected = regs[0].address
        for reg in regs:
            if reg.address != expected:
                raise ValueError(
                    f"{reg.name} does not follow the previous entry (address {reg.address}, "
                    f"expected {expected}): one write covers consecutive entries only"
                )
            value = values[reg.name]
            if reg.count > 1:
                if not isinstance(value, Sequence):
                    raise ValueError(f"{reg.name}: needs a sequence of {reg.count} values")
                out.extend(reg.encode_array(value))
            else:
                if isinstance(value, Sequence):
                    raise ValueError(f"{reg.name}: needs a single value")
                out.extend(reg.encode(value))
            expected = reg.end + 1
        if len(out) > MAX_WRITE_REGISTERS:
            raise ValueError(f"a write of {len(out)} registers exceeds {MAX_WRITE_REGISTERS}")
        return regs[0].address, out

    def require(self, kind: str, spec: Mapping[str, tuple[RegisterType, Access]]) -> None:
        """Raise `RegisterMapError` unless this is a ``kind`` map with every entry of ``spec``
        (name → type, access); drivers call it at construction."""
        errors: list[tuple[str, str]] = []
        if self.kind != kind:
            errors.append(("map.kind", f"expected {kind!r}, got {self.kind!r}"))
        for name, (reg_type, access) in spec.items():
            reg = self._by_name.get(name)
            if reg is None:
                errors.append((f"registers.{name}", "missing"))
                continue
            if reg.type is not reg_type:
                errors.append((f"registers.{name}", f"must be {reg_type.value}"))
            if reg.access != access:
                errors.append((f"registers.{name}", f"access must be {access!r}"))
        if errors:
            raise RegisterMapError(self.source, errors)

    def require_values(self, name: str, names: Iterable[str]) -> None:
        """Raise `RegisterMapError` unless enum register ``name`` defines every value name."""
        reg = self[name]
        defined = {n for n, _ in reg.values}
        missing = [n for n in names if n not in defined]
        if missing:
            raise RegisterMapError(
                self.source, [(f"registers.{name}.values", f"missing {', '.join(missing)}")]
            )


# ------------------------------------------------------------------------------ loading
class _Errors:
    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, path: str, msg: str) -> None:
        self.items.append((path, msg))


def _int(e: _Errors, data: Mapping[str, object], key: str, path: str) -> int | None:
    value = data.get(key)
    if value is None:
        e.add(f"{path}.{key}", "missing")
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        e.add(f"{path}.{key}", f"must be an integer, got {type(value).__name__}")
        return None
    return value


def _str(e: _Errors, data: Mapping[str, object], key: str, path: str, default: str | None) -> str:
    value = data.get(key, default)
    if value is None:
        e.add(f"{path}.{key}", "missing")
        return ""
    if not isinstance(value, str):
        e.add(f"{path}.{key}", f"must be a string, got {type(value).__name__}")
        return ""
    return value


def _number(e: _Errors, data: Mapping[str, object], key: str, path: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        e.add(f"{path}.{key}", "must be a number")
        return None
    if not math.isfinite(value):
        e.add(f"{path}.{key}", "must be finite")
        return None
    return float(value)


def _named_ints(
    e: _Errors, data: Mapping[str, object], key: str, path: str
) -> tuple[tuple[str, int], ...]:
    table = data.get(key)
    if table is None:
        return ()
    if not isinstance(table, dict):
        e.add(f"{path}.{key}", "must be a table of name = integer")
        return ()
    out: list[tuple[str, int]] = []
    for name, number in table.items():
        if isinstance(number, bool) or not isinstance(number, int):
            e.add(f"{path}.{key}.{name}", "must be an integer")
            continue
        out.append((name, number))
    return tuple(out)


_KNOWN_KEYS = frozenset(
    {
        "name",
        "address",
        "type",
        "access",
        "unit",
        "description",
        "count",
        "values",
        "bits",
        "min",
        "max",
    }
)


def _parse_register(
    e: _Errors, data: Mapping[str, object], path: str, max_address: int
) -> Register | None:
    before = len(e.items)
    name = _str(e, data, "name", path, None)
    if name:
        path = f"{path} ({name})"
        if not name.replace("_", "").isalnum() or not name[0].isalpha():
            e.add(f"{path}.name", "letters, digits and '_' only, starting with a letter")
    for key in data:
        if key not in _KNOWN_KEYS:
            e.add(f"{path}.{key}", "unknown key")
    address = _int(e, data, "address", path)
    type_name = _str(e, data, "type", path, None)
    try:
        reg_type = RegisterType(type_name.upper()) if type_name else None
    except ValueError:
        e.add(f"{path}.type", f"unknown type {type_name!r} (one of {_type_names()})")
        reg_type = None
    access = _str(e, data, "access", path, None)
    if access and access not in ("r", "rw"):
        e.add(f"{path}.access", f"must be 'r' or 'rw', got {access!r}")
    count = 1 if "count" not in data else _int(e, data, "count", path)
    if count is not None and count < 1:
        e.add(f"{path}.count", "must be >= 1")
    values = _named_ints(e, data, "values", path)
    bits = _named_ints(e, data, "bits", path)
    minimum = _number(e, data, "min", path)
    maximum = _number(e, data, "max", path)
    if len(e.items) > before or address is None or reg_type is None or count is None:
        return None
    if address < 0 or address + reg_type.width * count - 1 > max_address:
        e.add(
            f"{path}.address",
            f"{address}..{address + reg_type.width * count - 1} outside 0..{max_address}",
        )
    if values and (reg_type.is_float or reg_type is RegisterType.BITS):
        e.add(f"{path}.values", f"enum values need an integer type, not {reg_type.value}")
    for value_name, number in values:
        low, high = _INT_RANGE.get(reg_type, (0, 0))
        if not low <= number <= high:
            e.add(f"{path}.values.{value_name}", f"{number} outside the {reg_type.value} range")
    if len({n for _, n in values}) != len(values):
        e.add(f"{path}.values", "two names share one number")
    if bits and reg_type is not RegisterType.BITS:
        e.add(f"{path}.bits", "only BITS registers name bits")
    for bit_name, bit in bits:
        if not 0 <= bit <= 15:
            e.add(f"{path}.bits.{bit_name}", f"bit {bit} outside 0..15")
    if len({b for _, b in bits}) != len(bits):
        e.add(f"{path}.bits", "two names share one bit")
    if minimum is not None and maximum is not None and minimum > maximum:
        e.add(f"{path}.min", "greater than max")
    if len(e.items) > before:
        return None
    return Register(
        name=name,
        address=address,
        type=reg_type,
        access="rw" if access == "rw" else "r",
        unit=_str(e, data, "unit", path, ""),
        description=_str(e, data, "description", path, ""),
        count=count,
        values=values,
        bits=bits,
        minimum=minimum,
        maximum=maximum,
    )


def _type_names() -> str:
    return ", ".join(t.value for t in RegisterType)


def parse_register_map(data: Mapping[str, object], source: str = "<register map>") -> RegisterMap:
    """Build a `RegisterMap` from a decoded TOML document; `RegisterMapError` lists problems."""
    e = _Errors()
    head = data.get("map")
    if not isinstance(head, dict):
        e.add("map", "missing [map] table")
        head = {}
    kind = _str(e, head, "kind", "map", None)
    version = _int(e, head, "version", "map") or 0
    description = _str(e, head, "description", "map", "")
    word_order = _str(e, head, "word_order", "map", "high_word_first")
    if word_order != "high_word_first":
        e.add("map.word_order", "only 'high_word_first' is supported")
    max_address = MAX_ADDRESS if "max_address" not in head else _int(e, head, "max_address", "map")
    if max_address is None or not 0 <= max_address <= MAX_ADDRESS:
        if max_address is not None:
            e.add("map.max_address", f"must be within 0..{MAX_ADDRESS}")
        max_address = MAX_ADDRESS
    entries = data.get("registers")
    if not isinstance(entries, list) or not entries:
        e.add("registers", "missing (at least one [[registers]] entry)")
        entries = []
    registers: list[tuple[str, Register]] = []
    for index, entry in enumerate(entries):
        path = f"registers[{index}]"
        if not isinstance(entry, dict):
            e.add(path, "must be a table")
            continue
        reg = _parse_register(e, entry, path, max_address)
        if reg is not None:
            registers.append((f"{path} ({reg.name})", reg))
    seen: dict[str, str] = {}
    for path, reg in registers:
        if reg.name in seen:
            e.add(f"{path}.name", f"duplicate of {seen[reg.name]}")
        else:
            seen[reg.name] = path
    ordered = sorted(registers, key=lambda item: item[1].address)
    for (prev_path, prev), (path, reg) in itertools.pairwise(ordered):
        if reg.address <= prev.end:
            e.add(
                f"{path}.address",
                f"{reg.address}..{reg.end} overlaps {prev_path} at {prev.address}..{prev.end}",
            )
    if e.items:
        raise RegisterMapError(source, e.items)
    return RegisterMap(
        kind=kind,
        version=version,
        source=source,
        max_address=max_address,
        registers=tuple(reg for _, reg in ordered),
        description=description,
    )


def load_register_map(path: str | Path) -> RegisterMap:
    """Read and check a register map TOML file."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as exc:
        raise RegisterMapError(str(p), [("<file>", exc.strerror or str(exc))]) from None
    except UnicodeDecodeError as exc:
        raise RegisterMapError(str(p), [("<file>", str(exc))]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RegisterMapError(str(p), [("<toml>", str(exc))]) from None
    return parse_register_map(data, str(p))


def builtin_map_path(kind: str) -> Path:
    """The shipped ``firmware-configs/plc/<kind>.toml`` (`maps_dir`)."""
    return maps_dir() / f"{kind}.toml"


def load_builtin_map(kind: str) -> RegisterMap:
    """The shipped map for ``kind`` ("conveyor" or "sorter")."""
    return load_register_map(builtin_map_path(kind))
