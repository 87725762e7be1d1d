"""A minimal typed view of the site TOML for the simulators.

The controller owns the authoritative schema (``controller/config.py``, pydantic, cross-checked);
simulators may not import it (import-linter contract), so this module reads only the fields a
simulator needs into frozen dataclasses, with the same defaults, and fails with the offending
path (``shelves[3].unit_weight_g: missing``) instead of a ``KeyError`` deep inside a thread.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar, cast

ScaleFormat = Literal["native", "esphome"]

_T = TypeVar("_T")


class SiteError(Exception):
    """The site file is missing, not TOML, or lacks a field the simulators need."""

    def __init__(self, source: str, errors: list[tuple[str, str]]) -> None:
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  {path}: {msg}" for path, msg in errors)
        super().__init__(f"{source}: {len(errors)} site error(s)\n{lines}")


@dataclass(frozen=True, slots=True)
class Zone:
    id: str
    name: str = ""


@dataclass(frozen=True, slots=True)
class Sku:
    id: str
    reorder_point: int
    max_stock: int
    name: str = ""


@dataclass(frozen=True, slots=True)
class Scale:
    id: str
    zone: str
    format: ScaleFormat
    channels: int
    reporting_interval_s: float
    esphome_node: str | None = None
    esphome_sensors: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Shelf:
    id: str
    zone: str
    scale: str
    channel: int
    sku: str
    unit_weight_g: float
    tare_g: float
    capacity_units: int
    reorder_point: int | None = None
    """Shelf-level override of the SKU's reorder point (``[shelves.reorder]``), if any."""


@dataclass(frozen=True, slots=True)
class Site:
    id: str
    topic_prefix: str
    zones: tuple[Zone, ...]
    skus: tuple[Sku, ...]
    scales: tuple[Scale, ...]
    shelves: tuple[Shelf, ...]

    def scale(self, scale_id: str) -> Scale:
        for s in self.scales:
            if s.id == scale_id:
                return s
        raise KeyError(scale_id)

    def shelf(self, shelf_id: str) -> Shelf:
        for s in self.shelves:
            if s.id == shelf_id:
                return s
        raise KeyError(shelf_id)

    def sku(self, sku_id: str) -> Sku:
        for s in self.skus:
            if s.id == sku_id:
                return s
        raise KeyError(sku_id)

    def shelves_on(self, scale_id: str) -> tuple[Shelf, ...]:
        """The shelves weighed by one scale, by channel."""
        return tuple(
            sorted((s for s in self.shelves if s.scale == scale_id), key=lambda s: s.channel)
        )

    def shelves_of_sku(self, sku_id: str) -> tuple[Shelf, ...]:
        return tuple(s for s in self.shelves if s.sku == sku_id)


class _Reader:
    """Collects every problem so one run reports them all, like the controller's loader."""

    def __init__(self) -> None:
        self.errors: list[tuple[str, str]] = []

    def table(self, data: Mapping[str, object], key: str, path: str) -> Mapping[str, object]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            self.errors.append((_join(path, key), "must be a table"))
            return {}
        return value

    def array(self, data: Mapping[str, object], key: str) -> list[Mapping[str, object]]:
        value = data.get(key)
        if value is None:
            self.errors.append((key, "missing (at least one [[" + key + "]] entry)"))
            return []
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.errors.append((key, "must be an array of tables"))
            return []
        return value

    def get(
        self,
        data: Mapping[str, object],
        key: str,
        path: str,
        kind: type[_T],
        default: _T | None = None,
    ) -> _T:
        where = _join(path, key)
        value = data.get(key)
        if value is None:
            if default is None:
                self.errors.append((where, "missing"))
                return _placeholder(kind)
            return default
        if kind is float and type(value) is int:
            return cast(_T, float(value))
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.errors.append((where, f"must be {kind.__name__}, got {type(value).__name__}"))
            return _placeholder(kind)
        if isinstance(value, float) and not math.isfinite(value):
            self.errors.append((where, "must be finite"))
        return cast(_T, value)

    def positive(self, value: float, where: str) -> None:
        if value <= 0:
            self.errors.append((where, "must be > 0"))

    def non_negative(self, value: float, where: str) -> None:
        if value < 0:
            self.errors.append((where, "must be >= 0"))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _placeholder(kind: type[_T]) -> _T:
    # Only returned alongside a recorded error; the loader raises before anyone sees it.
    return kind()


def parse_site(data: Mapping[str, object], source: str = "<site>") -> Site:
    """Build a :class:`Site` from an already-decoded TOML document."""
    r = _Reader()
    site_t = r.table(data, "site", "")
    if "site" not in data:
        r.errors.append(("site", "missing [site] table"))
    site_id = r.get(site_t, "id", "site", str)
    mqtt_t = r.table(data, "mqtt", "")
    prefix = r.get(mqtt_t, "topic_prefix", "mqtt", str, "floorhand")

    zones = tuple(
        Zone(r.get(z, "id", f"zones[{i}]", str), r.get(z, "name", f"zones[{i}]", str, ""))
        for i, z in enumerate(r.array(data, "zones"))
    )

    skus: list[Sku] = []
    for i, s in enumerate(r.array(data, "skus")):
        p = f"skus[{i}]"
        skus.append(
            Sku(
                id=r.get(s, "id", p, str),
                reorder_point=r.get(s, "reorder_point", p, int),
                max_stock=r.get(s, "max_stock", p, int),
                name=r.get(s, "name", p, str, ""),
            )
        )
        r.non_negative(skus[-1].reorder_point, f"{p}.reorder_point")
        r.positive(skus[-1].max_stock, f"{p}.max_stock")

    scales: list[Scale] = []
    for i, s in enumerate(r.array(data, "scales")):
        p = f"scales[{i}]"
        fmt = r.get(s, "format", p, str, "native")
        if fmt not in ("native", "esphome"):
            r.errors.append((f"{p}.format", f"must be 'native' or 'esphome', got {fmt!r}"))
            fmt = "native"
        node = s.get("esphome_node")
        sensors = s.get("esphome_sensors", [])
        if node is not None and not isinstance(node, str):
            r.errors.append((f"{p}.esphome_node", "must be str"))
            node = None
        if not isinstance(sensors, list) or not all(isinstance(x, str) for x in sensors):
            r.errors.append((f"{p}.esphome_sensors", "must be an array of strings"))
            sensors = []
        scale = Scale(
            id=r.get(s, "id", p, str),
            zone=r.get(s, "zone", p, str),
            format="esphome" if fmt == "esphome" else "native",
            channels=r.get(s, "channels", p, int, 1),
            reporting_interval_s=r.get(s, "reporting_interval_s", p, float, 5.0),
            esphome_node=node,
            esphome_sensors=tuple(sensors),
        )
        r.positive(scale.channels, f"{p}.channels")
        r.positive(scale.reporting_interval_s, f"{p}.reporting_interval_s")
        if scale.format == "esphome":
            if not scale.esphome_node:
                r.errors.append((f"{p}.esphome_node", "missing (esphome scales need it)"))
            if len(scale.esphome_sensors) != scale.channels:
                r.errors.append(
                    (f"{p}.esphome_sensors", f"needs one sensor per channel ({scale.channels})")
                )
        scales.append(scale)

    shelves: list[Shelf] = []
    for i, s in enumerate(r.array(data, "shelves")):
        p = f"shelves[{i}]"
        reorder = r.table(s, "reorder", p)
        shelf = Shelf(
            id=r.get(s, "id", p, str),
            zone=r.get(s, "zone", p, str),
            scale=r.get(s, "scale", p, str),
            channel=r.get(s, "channel", p, int, 0),
            sku=r.get(s, "sku", p, str),
            unit_weight_g=r.get(s, "unit_weight_g", p, float),
            tare_g=r.get(s, "tare_g", p, float, 0.0),
            capacity_units=r.get(s, "capacity_units", p, int),
            reorder_point=(
                r.get(reorder, "reorder_point", f"{p}.reorder", int) if reorder else None
            ),
        )
        r.positive(shelf.unit_weight_g, f"{p}.unit_weight_g")
        r.non_negative(shelf.tare_g, f"{p}.tare_g")
        r.positive(shelf.capacity_units, f"{p}.capacity_units")
        r.non_negative(shelf.channel, f"{p}.channel")
        shelves.append(shelf)

    # The few cross-references a simulator relies on; the controller checks the rest.
    sku_ids = {s.id for s in skus}
    scale_by_id = {s.id: s for s in scales}
    used: dict[tuple[str, int], str] = {}
    for i, shelf in enumerate(shelves):
        p = f"shelves[{i}]"
        if shelf.sku not in sku_ids:
            r.errors.append((f"{p}.sku", f"unknown SKU {shelf.sku!r}"))
        target = scale_by_id.get(shelf.scale)
        if target is None:
            r.errors.append((f"{p}.scale", f"unknown scale {shelf.scale!r}"))
        elif shelf.channel >= target.channels:
            r.errors.append(
                (f"{p}.channel", f"scale {target.id!r} has {target.channels} channel(s)")
            )
        key = (shelf.scale, shelf.channel)
        if key in used:
            r.errors.append((f"{p}.channel", f"channel already used by shelf {used[key]!r}"))
        used[key] = shelf.id

    if r.errors:
        raise SiteError(source, r.errors)
    return Site(site_id, prefix, zones, tuple(skus), tuple(scales), tuple(shelves))


def load_site(path: str | Path) -> Site:
    """Read a site TOML file; raises :class:`SiteError` naming the file and the bad fields."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise SiteError(str(p), [("<file>", exc.strerror or str(exc))]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SiteError(str(p), [("<toml>", str(exc))]) from None
    return parse_site(data, str(p))
