"""Catalogue records: one flat mapping of column → value per SKU, scale or shelf.

The columns of each kind are the fields of its model in controller/config.py (`SkuConfig`,
`ScaleConfig`, `ShelfConfig`), except a shelf's nested ``reorder`` table, which is two flat
columns, ``shelf_reorder_point`` and ``shelf_safety_stock``. A value of ``None`` is unset (the
model's default applies).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import UnionType
from typing import Annotated, Any, Final, Literal, NoReturn, Union, cast, get_args, get_origin

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


class _AllFields(set[str]):
    """The ``__pydantic_fields_set__`` shared by every record built with all its fields (one per
    model class instead of a ~700-byte set per record). Pydantic reads it (``model_fields_set``,
    ``exclude_unset``), and changes only a copy of it (``model_copy(update=...)``; a frozen model
    refuses assignment before touching it): copies are plain sets, and changing this one in place
    raises, so a mistake cannot leak into every record."""

    __slots__ = ()

    def _refuse(self, *args: object) -> NoReturn:
        raise TypeError("the fields set shared by catalogue records is read-only")

    def add(self, *args: object) -> NoReturn:
        self._refuse()

    def discard(self, *args: object) -> NoReturn:
        self._refuse()

    def remove(self, *args: object) -> NoReturn:
        self._refuse()

    def pop(self, *args: object) -> NoReturn:
        self._refuse()

    def clear(self, *args: object) -> NoReturn:
        self._refuse()

    def update(self, *args: object) -> NoReturn:
        self._refuse()

    def difference_update(self, *args: object) -> NoReturn:
        self._refuse()

    def intersection_update(self, *args: object) -> NoReturn:
        self._refuse()

    def symmetric_difference_update(self, *args: object) -> NoReturn:
        self._refuse()

    def __ior__(self, *args: object) -> NoReturn:
        self._refuse()

    def __iand__(self, *args: object) -> NoReturn:
        self._refuse()

    def __isub__(self, *args: object) -> NoReturn:
        self._refuse()

    def __ixor__(self, *args: object) -> NoReturn:
        self._refuse()

    def __copy__(self) -> set[str]:
        return set(self)

    def __deepcopy__(self, memo: object) -> set[str]:
        return set(self)

    def __reduce__(self) -> tuple[type[set[str]], tuple[list[str]]]:
        return set, (list(self),)  # pickled as the plain set pydantic would have made


_ALL_FIELDS: dict[type[BaseModel], _AllFields] = {}


def _all_fields(cls: type[BaseModel]) -> _AllFields:
    fields = _ALL_FIELDS.get(cls)
    if fields is None:
        fields = _ALL_FIELDS[cls] = _AllFields(cls.model_fields)
    return fields


def _built(cls: type[BaseModel], values: dict[str, Any]) -> Any:
    """What ``cls.model_construct(**values)`` builds when ``values`` holds every field, at a
    fraction of its cost (it looks up each field's default: ~50 µs a record, seconds at 100k)
    and memory (the fields set is shared)."""
    fields = _all_fields(cls)
    if values.keys() != fields:
        return cls.model_construct(**{k: v for k, v in values.items() if v is not None})
    return _model(cls, values, fields)


# BaseModel's slots, set through their descriptors (a fifth faster than object.__setattr__).
_SET_DICT = BaseModel.__dict__["__dict__"].__set__
_SET_FIELDS = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_SET_EXTRA = BaseModel.__dict__["__pydantic_extra__"].__set__
_SET_PRIVATE = BaseModel.__dict__["__pydantic_private__"].__set__


def _model(cls: type[BaseModel], values: dict[str, Any], fields: _AllFields) -> Any:
    model = cls.__new__(cls)
    _SET_DICT(model, values)
    _SET_FIELDS(model, fields)
    _SET_EXTRA(model, None)
    _SET_PRIVATE(model, None)
    return model


def _compact_dicts(fields: tuple[str, ...]) -> Callable[[list[Any]], dict[str, Any]]:
    """A maker of ``dict(zip(fields, row))`` for rows of exactly ``len(fields)`` values, as a
    key-sharing dict: the instance dict of an object whose attributes were set in ``fields``'
    order shares one key table with every other such dict (CPython's split dicts), ~185 bytes
    for a shelf's 11 fields against ~470 for a dict of its own (about 50 MB at 100k SKUs +
    scales + shelves). A record's dict is never changed (the models are frozen); changing it
    would only turn it into an ordinary dict."""
    width = len(fields)
    if not all(name.isidentifier() for name in fields):
        raise ValueError(f"not attribute names: {fields}")
    # The attribute stores written out (as dataclasses writes its __init__): a loop of
    # setattr calls cost ~10 µs a record, seconds at 100k.
    stores = "\n".join(f"    self.{name} = row[{i}]" for i, name in enumerate(fields))
    namespace: dict[str, Any] = {}
    exec(f"def __init__(self, row):\n{stores}\n", namespace)
    values_type = type("Values", (), {"__init__": namespace["__init__"]})

    def make(row: list[Any]) -> dict[str, Any]:
        if len(row) != width:
            raise ValueError(f"a row of {len(row)} values for {width} fields")
        values: dict[str, Any] = values_type(row).__dict__
        return values

    return make


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


def builder(kind: Kind, columns: Sequence[str]) -> Callable[[list[Any]], Model]:
    """What builds the model of a record validated before from its values in ``columns``'
    order (a row read back from the journal; the list is consumed): `construct` in one step
    when ``columns`` are the current `COLUMNS` of ``kind`` (no intermediate record), else
    through a record of the columns (a journal written with other columns)."""
    names = tuple(columns)
    if names != COLUMNS[kind]:
        return _remapped(kind, names)
    cls = MODELS[kind]
    fields = tuple(cls.model_fields)
    shared = _all_fields(cls)
    values_of = _compact_dicts(fields)
    if kind == "sku" and names == fields:
        return lambda row: cast(SkuConfig, _model(SkuConfig, values_of(row), shared))
    if kind == "scale" and names == fields:
        at = fields.index("esphome_sensors")

        def scale(row: list[Any]) -> Model:
            row[at] = tuple(row[at]) if row[at] else ()
            return cast(ScaleConfig, _model(ScaleConfig, values_of(row), shared))

        return scale
    if kind == "shelf" and names == (*fields[:-1], *SHELF_REORDER) and fields[-1] == "reorder":
        reorders: dict[tuple[int, int], ShelfReorderConfig] = {}
        reorder_fields = _all_fields(ShelfReorderConfig)

        def shelf(row: list[Any]) -> Model:
            safety = row.pop()
            point = row.pop()
            if point is None:
                row.append(None)
            else:
                key = (point, safety or 0)
                reorder = reorders.get(key)
                if reorder is None:  # frozen: shelves with the same policy share one
                    values = {"reorder_point": key[0], "safety_stock": key[1]}
                    reorder = reorders[key] = _model(ShelfReorderConfig, values, reorder_fields)
                row.append(reorder)
            return cast(ShelfConfig, _model(ShelfConfig, values_of(row), shared))

        return shelf
    return lambda row: construct(kind, dict(zip(names, row, strict=True)))


def _remapped(kind: Kind, names: tuple[str, ...]) -> Callable[[list[Any]], Model]:
    """The builder of rows in other columns than the current ones: a journal written before a
    column was added (its default fills it in, as `model_input` leaves an unset column out) or
    in another order; a column this version does not know goes through `construct`."""
    fields = MODELS[kind].model_fields
    plan: list[tuple[int, Any]] = []
    for column in COLUMNS[kind]:
        if column in names:
            plan.append((names.index(column), None))
        elif column in SHELF_REORDER:
            plan.append((-1, None))
        elif column in fields and not fields[column].is_required():
            plan.append((-1, fields[column].get_default(call_default_factory=True)))
        else:
            plan = []
            break
    if not plan or not set(names) <= set(COLUMNS[kind]):
        return lambda row: construct(kind, dict(zip(names, row, strict=True)))
    build = builder(kind, COLUMNS[kind])
    width = len(names)
    if names == COLUMNS[kind][:width]:  # columns added at the end: the common case
        tail = [default for _, default in plan[width:]]

        def extended(row: list[Any]) -> Model:
            if len(row) != width:
                raise ValueError(f"a {kind} row of {len(row)} values for {width} columns")
            row += tail
            return build(row)

        return extended

    def remapped(row: list[Any]) -> Model:
        if len(row) != width:
            raise ValueError(f"a {kind} row of {len(row)} values for {width} columns")
        return build([row[i] if i >= 0 else default for i, default in plan])

    return remapped


def shared_columns(kind: Kind, columns: Sequence[str]) -> dict[type, tuple[int, ...]]:
    """Where the values of rows in ``columns`` repeat across records, by value type (``str``,
    ``int``, ``float``): the indexes of the columns of zones, formats, the ids a shelf names (not
    free text, not a shelf's own id) and of the number columns."""
    fields = MODELS[kind].model_fields
    at: dict[type, list[int]] = {str: [], int: [], float: []}
    for i, column in enumerate(columns):
        if column in SHELF_REORDER:
            at[int].append(i)
            continue
        field = fields.get(column)
        if field is None or column in _FREE_TEXT or (kind == "shelf" and column == "id"):
            continue
        value_type = _value_type(field.annotation)
        if value_type is not None:
            at[value_type].append(i)
    return {t: tuple(i) for t, i in at.items()}


_FREE_TEXT: Final[frozenset[str]] = frozenset({"name", "location"})


def _value_type(annotation: Any) -> type | None:
    """``str``, ``int`` or ``float`` when every value of a field so annotated is one (or
    ``None``), else ``None``."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _value_type(get_args(annotation)[0])
    if origin is Literal:
        return str if all(isinstance(a, str) for a in get_args(annotation)) else None
    if origin is Union or origin is UnionType:
        types = {_value_type(a) for a in get_args(annotation) if a is not type(None)}
        return types.pop() if len(types) == 1 else None
    return cast(type, annotation) if annotation in (str, int, float) else None
