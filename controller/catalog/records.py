"""Catalogue records: one flat mapping of column → value per SKU, scale or shelf.

The columns of each kind are the fields of its model in controller/config.py (`SkuConfig`,
`ScaleConfig`, `ShelfConfig`), except a shelf's nested ``reorder`` table, which is two flat
columns, ``shelf_reorder_point`` and ``shelf_safety_stock``. A value of ``None`` is unset (the
model's default applies).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, cast

from pydantic import BaseModel

from controller.config import ScaleConfig, ShelfConfig, ShelfReorderConfig, SkuConfig

Kind = Literal["sku", "scale", "shelf"]
KINDS: Final[tuple[Kind, ...]] = ("sku", "scale", "shelf")
"""Record kinds, in the order a file lists them (a shelf names its SKU and scale)."""

SECTIONS: Final[dict[Kind, str]] = {"sku": "skus", "scale": "scales", "shelf": "shelves"}
"""The site file's table (and `catalogue_problems` section) of each kind."""

KIND_OF_SECTION: Final[dict[str, Kind]] = {v: k for k, v in SECTIONS.items()}

Model = SkuConfig | ScaleConfig | ShelfConfig
MODELS: Final[dict[Kind, type[SkuConfig] | type[ScaleConfig] | type[ShelfConfig]]] = {
    "sku": SkuConfig,
    "scale": ScaleConfig,
    "shelf": ShelfConfig,
}

SHELF_REORDER: Final[dict[str, str]] = {
    "shelf_reorder_point": "reorder_point",
    "shelf_safety_stock": "safety_stock",
}
"""A shelf's flat columns → the keys of its ``reorder`` table."""


def _columns(kind: Kind) -> tuple[str, ...]:
    names = [n for n in MODELS[kind].model_fields if n != "reorder"]
    if kind == "shelf":
        names += list(SHELF_REORDER)
    return tuple(names)


COLUMNS: Final[dict[Kind, tuple[str, ...]]] = {k: _columns(k) for k in KINDS}
"""The columns of each kind (``id`` first), in the models' field order."""

HEADER: Final[tuple[str, ...]] = ("kind", *dict.fromkeys(c for k in KINDS for c in COLUMNS[k]))
"""Every column of a catalogue file: ``kind``, ``id``, then the SKUs', scales', shelves'."""

LIST_COLUMNS: Final[frozenset[str]] = frozenset({"esphome_sensors"})
"""Columns holding a list (space-separated in a CSV cell)."""


@dataclass(frozen=True, slots=True)
class Catalogue:
    """A site's SKUs, scales and shelves (each tuple in file order)."""

    skus: tuple[SkuConfig, ...] = ()
    scales: tuple[ScaleConfig, ...] = ()
    shelves: tuple[ShelfConfig, ...] = ()
    version: int = 0
    """The journal's catalogue version it was read from (0: not from the journal)."""
    _by_kind: dict[Kind, tuple[Model, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "_by_kind", {"sku": self.skus, "scale": self.scales, "shelf": self.shelves}
        )

    def records(self, kind: Kind) -> tuple[Model, ...]:
        """The models of ``kind``."""
        return self._by_kind[kind]

    def __len__(self) -> int:
        return len(self.skus) + len(self.scales) + len(self.shelves)

    def same_records(self, other: Catalogue) -> bool:
        """Whether both hold the same records in the same order (versions aside)."""
        return (self.skus, self.scales, self.shelves) == (other.skus, other.scales, other.shelves)


def flat(kind: Kind, model: Model) -> dict[str, Any]:
    """The record of a validated model: every column of ``kind``, ``None`` where unset."""
    out = dict(model.__dict__)  # the columns are the fields (a copy: cheaper than by name)
    if kind == "shelf":
        reorder = out.pop("reorder")
        out["shelf_reorder_point"] = reorder.reorder_point if reorder is not None else None
        out["shelf_safety_stock"] = reorder.safety_stock if reorder is not None else None
    elif kind == "scale":
        out["esphome_sensors"] = list(out["esphome_sensors"])
    return out


def model_input(kind: Kind, record: Mapping[str, Any]) -> dict[str, Any]:
    """The model's input for a record: unset columns left out, a shelf's reorder columns nested
    (the reorder table exists when either is set)."""
    if kind != "shelf":
        return {k: v for k, v in record.items() if v is not None}
    data = {k: v for k, v in record.items() if v is not None and k not in SHELF_REORDER}
    if kind == "shelf":
        reorder = {SHELF_REORDER[c]: record[c] for c in SHELF_REORDER if record.get(c) is not None}
        if reorder:
            data["reorder"] = reorder
    return data


_set_attr = object.__setattr__
_FIELDS: dict[type[BaseModel], frozenset[str]] = {}


def _built(cls: type[BaseModel], values: dict[str, Any]) -> Any:
    """What ``cls.model_construct(**values)`` builds when ``values`` holds every field, at a
    fraction of its cost (it looks up each field's default: ~50 µs a record, seconds at 100k)."""
    fields = _FIELDS.get(cls)
    if fields is None:
        fields = _FIELDS[cls] = frozenset(cls.model_fields)
    if values.keys() != fields:
        return cls.model_construct(**{k: v for k, v in values.items() if v is not None})
    model = cls.__new__(cls)
    _set_attr(model, "__dict__", values)
    _set_attr(model, "__pydantic_fields_set__", set(values))
    _set_attr(model, "__pydantic_extra__", None)
    _set_attr(model, "__pydantic_private__", None)
    return model


def construct(kind: Kind, record: dict[str, Any]) -> Model:
    """The model of a record validated before (read back from the journal, every column
    present): no validation. ``record`` is consumed."""
    if kind == "sku":
        return cast(SkuConfig, _built(SkuConfig, record))
    if kind == "scale":
        record["esphome_sensors"] = tuple(record.get("esphome_sensors") or ())
        return cast(ScaleConfig, _built(ScaleConfig, record))
    point = record.pop("shelf_reorder_point", None)
    safety = record.pop("shelf_safety_stock", None)
    record["reorder"] = (
        None
        if point is None
        else _built(ShelfReorderConfig, {"reorder_point": point, "safety_stock": safety or 0})
    )
    return cast(ShelfConfig, _built(ShelfConfig, record))
