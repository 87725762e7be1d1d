"""Register maps: the shipped files load, bad files fail with the offending entry, values
round-trip through their registers (high word first)."""

from __future__ import annotations

import math
import struct
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devices.errors import DeviceConfigError
from devices.registers import (
    Register,
    RegisterMapError,
    RegisterType,
    builtin_map_path,
    load_builtin_map,
    load_register_map,
    parse_register_map,
)


def doc(*registers: dict[str, Any], **head: Any) -> dict[str, Any]:
    return {"map": {"kind": "test", "version": 1, **head}, "registers": list(registers)}


def reg(
    name: str, address: int, type_: str = "UINT16", access: str = "r", **extra: Any
) -> dict[str, Any]:
    return {"name": name, "address": address, "type": type_, "access": access, **extra}


def errors_of(data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(RegisterMapError) as info:
        parse_register_map(data, "test.toml")
    assert isinstance(info.value, DeviceConfigError)
    assert "test.toml" in str(info.value)
    return info.value.errors


# -- shipped maps -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["conveyor", "sorter"])
def test_shipped_maps_load_and_are_one_contiguous_read(kind: str) -> None:
    m = load_builtin_map(kind)
    assert m.kind == kind
    assert m.version == 1
    # Every entry documented with a unit key (possibly empty) and a description.
    raw = tomllib.loads(builtin_map_path(kind).read_text())
    for entry in raw["registers"]:
        assert {"name", "address", "type", "access", "unit", "description"} <= set(entry)
    assert m.blocks() == ((0, m.registers[-1].end + 1),)
    assert m.registers[-1].end == m.max_address
    assert m["heartbeat"].address == 0
    assert m["heartbeat"].writable
    assert not m["epoch"].writable


def test_sorter_mailbox_is_one_write() -> None:
    m = load_builtin_map("sorter")
    address, words = m.encode({"mb_cmd_id": 0x12345678, "mb_tote": 7, "mb_lane": 3, "mb_strobe": 1})
    assert address == m["mb_cmd_id"].address
    assert words == [0x1234, 0x5678, 0, 7, 3, 1]


# -- load errors name the entry ---------------------------------------------------------------


def test_overlap_fails_with_both_paths() -> None:
    errors = errors_of(doc(reg("a", 0, "UINT32"), reg("b", 1)))
    assert len(errors) == 1
    path, msg = errors[0]
    assert path == "registers[1] (b).address"
    assert "registers[0] (a)" in msg
    assert "overlaps" in msg


def test_out_of_range_fails() -> None:
    errors = errors_of(doc(reg("a", 9, "FLOAT32"), max_address=9))
    assert errors == [("registers[0] (a).address", "9..10 outside 0..9")]
    errors = errors_of(doc(reg("a", 65535, "UINT32")))
    assert errors[0][0] == "registers[0] (a).address"
    errors = errors_of(doc(reg("arr", 60, "UINT16", count=8), max_address=63))
    assert errors[0][0] == "registers[0] (arr).address"


@pytest.mark.parametrize(
    ("entry", "path"),
    [
        (reg("a", 0, "UINT8"), "registers[0] (a).type"),
        (reg("a", 0, access="w"), "registers[0] (a).access"),
        ({"name": "a", "type": "UINT16", "access": "r"}, "registers[0] (a).address"),
        (reg("a", "1"), "registers[0] (a).address"),
        (reg("a", 0, count=0), "registers[0] (a).count"),
        (reg("a", 0, "FLOAT32", values={"X": 1}), "registers[0] (a).values"),
        (reg("a", 0, values={"X": 70000}), "registers[0] (a).values.X"),
        (reg("a", 0, values={"X": 1, "Y": 1}), "registers[0] (a).values"),
        (reg("a", 0, "BITS", bits={"x": 16}), "registers[0] (a).bits.x"),
        (reg("a", 0, bits={"x": 1}), "registers[0] (a).bits"),
        (reg("a", 0, min=5, max=1), "registers[0] (a).min"),
        (reg("a", 0, colour="red"), "registers[0] (a).colour"),
        (reg("1a", 0), "registers[0] (1a).name"),
    ],
)
def test_bad_entries_name_the_field(entry: dict[str, Any], path: str) -> None:
    assert path in [p for p, _ in errors_of(doc(entry))]


def test_duplicate_names_and_every_error_reported_at_once() -> None:
    errors = errors_of(doc(reg("a", 0), reg("a", 1), reg("b", 2, "NOPE"), reg("c", 0)))
    paths = [p for p, _ in errors]
    assert "registers[1] (a).name" in paths
    assert "registers[2] (b).type" in paths
    assert any(p.startswith("registers[3] (c)") for p in paths)  # overlaps a


def test_missing_head_and_registers() -> None:
    paths = [p for p, _ in errors_of({})]
    assert "map" in paths
    assert "registers" in paths
    paths = [p for p, _ in errors_of(doc(reg("a", 0), word_order="low_word_first"))]
    assert paths == ["map.word_order"]


def test_load_file_errors(tmp_path: Path) -> None:
    with pytest.raises(RegisterMapError, match="<file>"):
        load_register_map(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[map\n")
    with pytest.raises(RegisterMapError, match="<toml>"):
        load_register_map(bad)


def test_require_checks_kind_names_types_and_values() -> None:
    m = load_builtin_map("conveyor")
    m.require("conveyor", {"heartbeat": (RegisterType.UINT16, "rw")})
    with pytest.raises(RegisterMapError) as info:
        m.require(
            "sorter",
            {
                "heartbeat": (RegisterType.UINT32, "rw"),
                "epoch": (RegisterType.UINT32, "rw"),
                "nope": (RegisterType.UINT16, "r"),
            },
        )
    paths = [p for p, _ in info.value.errors]
    assert paths == ["map.kind", "registers.heartbeat", "registers.epoch", "registers.nope"]
    with pytest.raises(RegisterMapError):
        m.require_values("state", ["RUNNING", "FLYING"])


# -- encode / decode --------------------------------------------------------------------------


def one(type_: RegisterType, **extra: Any) -> Register:
    return Register("v", 0, type_, "rw", **extra)


def test_word_order_is_high_word_first() -> None:
    assert one(RegisterType.UINT32).encode(0x0102_0304) == [0x0102, 0x0304]
    assert one(RegisterType.INT32).encode(-2) == [0xFFFF, 0xFFFE]
    assert one(RegisterType.INT16).encode(-1) == [0xFFFF]
    high, low = one(RegisterType.FLOAT32).encode(1.5)
    assert struct.pack(">HH", high, low) == struct.pack(">f", 1.5)


@given(st.integers(0, 0xFFFF))
def test_uint16_round_trip(value: int) -> None:
    r = one(RegisterType.UINT16)
    assert r.decode(r.encode(value)) == value


@given(st.integers(-0x8000, 0x7FFF))
def test_int16_round_trip(value: int) -> None:
    r = one(RegisterType.INT16)
    assert r.decode(r.encode(value)) == value


@given(st.integers(0, 0xFFFFFFFF))
def test_uint32_round_trip(value: int) -> None:
    r = one(RegisterType.UINT32)
    words = r.encode(value)
    assert all(0 <= w <= 0xFFFF for w in words)
    assert r.decode(words) == value


@given(st.integers(-0x80000000, 0x7FFFFFFF))
def test_int32_round_trip(value: int) -> None:
    r = one(RegisterType.INT32)
    assert r.decode(r.encode(value)) == value


@given(st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_float32_round_trip(value: float) -> None:
    r = one(RegisterType.FLOAT32)
    assert r.decode(r.encode(value)) == value


@pytest.mark.parametrize(
    ("type_", "value"),
    [
        (RegisterType.UINT16, -1),
        (RegisterType.UINT16, 0x10000),
        (RegisterType.INT16, 0x8000),
        (RegisterType.UINT32, 1 << 32),
        (RegisterType.INT32, -(1 << 31) - 1),
        (RegisterType.FLOAT32, math.nan),
        (RegisterType.FLOAT32, math.inf),
        (RegisterType.FLOAT32, 1e39),
        (RegisterType.UINT16, True),
        (RegisterType.UINT16, 1.5),
    ],
)
def test_encode_refuses_what_does_not_fit(type_: RegisterType, value: Any) -> None:
    with pytest.raises(ValueError, match="v: "):
        one(type_).encode(value)


def test_limits_enum_bits_arrays() -> None:
    speed = one(RegisterType.FLOAT32, minimum=0.0, maximum=2500.0)
    speed.encode(2500.0)
    with pytest.raises(ValueError, match="maximum"):
        speed.encode(2500.5)
    m = load_builtin_map("sorter")
    assert m["state"].value_of("RUNNING") == 2
    assert m["state"].name_of(2) == "RUNNING"
    assert m["state"].name_of(99) is None
    flags = m["flags"]
    assert flags.flags(flags.pack_flags({"jam", "queue_full"})) == {"jam", "queue_full"}
    ring = m["done_ids"]
    words = ring.encode_array(list(range(16)))
    assert len(words) == 32
    assert ring.decode_array(words) == tuple(range(16))
    with pytest.raises(ValueError, match="needs 16 values"):
        ring.encode_array([1, 2])


def test_snapshot_decodes_every_entry_of_a_block() -> None:
    m = load_builtin_map("conveyor")
    words = [0] * (m.max_address + 1)
    a = m["speed_setpoint"].address
    words[a : a + 2] = m["speed_setpoint"].encode(812.5)
    e = m["epoch"].address
    words[e : e + 2] = m["epoch"].encode(0xDEADBEEF)
    words[m["state"].address] = m["state"].value_of("JAMMED")
    words[m["flags"].address] = m["flags"].pack_flags({"jam"})
    snap = m.decode(0, words)
    assert snap.float_of("speed_setpoint") == 812.5
    assert snap.int_of("epoch") == 0xDEADBEEF
    assert snap.enum_of("state") == "JAMMED"
    assert snap.flags_of("flags") == {"jam"}
    assert set(snap.raw()) == {r.name for r in m.registers}
    partial = m.decode(3, words[3:10])  # speed_setpoint cut in half: left out
    assert "speed_setpoint" not in partial
    assert "induct_tote" in partial


def test_encode_needs_consecutive_entries() -> None:
    m = load_builtin_map("sorter")
    with pytest.raises(ValueError, match="consecutive"):
        m.encode({"heartbeat": 1, "mb_lane": 2})
