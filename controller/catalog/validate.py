"""Validate catalogue rows, all or nothing, against the site's topology.

Each row goes through its model in controller/config.py (types, ranges, a SKU's thresholds in
order), then the whole catalogue through the site's cross-checks (`catalogue_problems`: unique
ids, known zones, SKUs and scales, a free scale channel, a full shelf within the scale's range).
Every problem is reported with its row's line and column; none stops the others being found.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, cast

from pydantic import ValidationError

from controller.catalog.formats import (
    PROGRESS_EVERY_ROWS,
    CatalogueInvalid,
    Format,
    Row,
    RowError,
    read_rows,
)
from controller.catalog.records import (
    COLUMNS,
    KIND_OF_SECTION,
    KINDS,
    MODELS,
    SHELF_REORDER,
    Catalogue,
    Kind,
    Model,
    model_input,
)
from controller.config import (
    SKU_DEFAULTS,
    ScaleConfig,
    ShelfConfig,
    SkuConfig,
    catalogue_problems,
    with_sku_defaults,
)

_REORDER_COLUMN = {v: k for k, v in SHELF_REORDER.items()}
_ALLOWED = {kind: frozenset(COLUMNS[kind]) for kind in KINDS}


def _column(kind: Kind, loc: tuple[int | str, ...], message: str) -> str:
    """The file column a pydantic error location (or a model-level message) points at."""
    if not loc:
        word = message.split(" ", 1)[0]
        return word if word in COLUMNS[kind] else "-"
    head = str(loc[0])
    if head == "reorder":
        return (
            _REORDER_COLUMN.get(str(loc[1]), "shelf_reorder_point")
            if len(loc) > 1
            else ("shelf_safety_stock")
        )
    return head


def _row_model(
    row: Row, errors: list[RowError], skus: Mapping[str, Mapping[str, Any]] | None = None
) -> tuple[Kind, Model] | None:
    cells: Mapping[str, Any] = row.cells
    if skus and cells.get("kind") == "shelf":
        cells = with_sku_defaults(cells, skus.get(str(cells.get("sku"))))
    raw_kind = cells.get("kind")
    ident = str(cells.get("id", ""))
    if raw_kind not in KINDS:
        what = "missing" if raw_kind is None else f"{raw_kind!r} is not sku, scale or shelf"
        errors.append(RowError(row.line, "kind", what, id=ident))
        return None
    kind = cast(Kind, raw_kind)
    record: dict[str, Any] = dict(cells)
    del record["kind"]
    foreign = record.keys() - _ALLOWED[kind]
    for name in sorted(foreign):
        errors.append(
            RowError(row.line, name, f"not a column of a {kind} row", kind=kind, id=ident)
        )
        del record[name]
    bad = bool(foreign)
    try:
        model = MODELS[kind].model_validate(model_input(kind, record))
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            msg = err["msg"].removeprefix("Value error, ")
            column = _column(kind, err["loc"], msg)
            if err["type"] == "missing":
                msg = (
                    f"required (on the shelf, or on its SKU {record.get('sku')})"
                    if kind == "shelf" and column in SKU_DEFAULTS
                    else "required"
                )
            elif "input" in err and column != "-" and not isinstance(err["input"], dict):
                msg = f"{msg} (got {err['input']!r})"
            errors.append(RowError(row.line, column, msg, kind=kind, id=ident))
        return None
    return None if bad else (kind, model)


def parse(
    data: bytes,
    fmt: Format,
    zones: Collection[str],
    source: str,
    progress: Callable[[str, int], None] | None = None,
) -> tuple[Catalogue, int]:
    """Read and validate a catalogue file: the catalogue and its number of rows; CatalogueInvalid
    with every problem of the file (reading and validation alike) otherwise. ``progress(step,
    rows)`` is called every `PROGRESS_EVERY_ROWS` rows read and validated."""
    rows, errors = read_rows(
        data, fmt, source, None if progress is None else lambda n: progress("read", n)
    )
    validated = None if progress is None else lambda n: progress("validated", n)
    return validate(rows, zones, source, errors, validated), len(rows)


def validate(
    rows: Sequence[Row],
    zones: Collection[str],
    source: str,
    errors_so_far: Sequence[RowError] = (),
    progress: Callable[[int], None] | None = None,
) -> Catalogue:
    """The catalogue the rows describe, checked against the site's ``zones``; CatalogueInvalid
    with every problem (line, column, message; ``errors_so_far`` too) otherwise."""
    errors: list[RowError] = list(errors_so_far)
    kept: dict[Kind, list[tuple[int, Model]]] = {k: [] for k in KINDS}
    rejected: dict[Kind, set[str]] = {k: set() for k in KINDS}
    # A shelf row that leaves out its unit weight or tolerance takes its SKU's (any line).
    skus_given = {
        str(row.cells.get("id")): row.cells
        for row in rows
        if row.cells.get("kind") == "sku" and any(row.cells.get(c) for c in SKU_DEFAULTS)
    }
    for n, row in enumerate(rows, start=1):
        if progress is not None and n % PROGRESS_EVERY_ROWS == 0:
            progress(n)
        found = _row_model(row, errors, skus_given)
        if found is None:
            kind = row.cells.get("kind")
            if kind in KINDS and "id" in row.cells:
                rejected[cast(Kind, kind)].add(str(row.cells["id"]))
            continue
        kind, model = found
        kept[kind].append((row.line, model))
    skus = cast(list[SkuConfig], [m for _, m in kept["sku"]])
    scales = cast(list[ScaleConfig], [m for _, m in kept["scale"]])
    shelves = cast(list[ShelfConfig], [m for _, m in kept["shelf"]])

    def line_of(section: str, index: int) -> int:
        return kept[KIND_OF_SECTION[section]][index][0]

    problems = catalogue_problems(
        zones, skus, scales, shelves, lambda section, i: f"line {line_of(section, i)}"
    )
    for section, i, key, msg in problems:
        kind = KIND_OF_SECTION[section]
        model = kept[kind][i][1]
        if kind == "shelf" and key in ("sku", "scale"):
            ref = getattr(model, key)
            if ref in rejected[cast(Kind, key)]:
                continue  # that row's own error is reported already
        column = "shelf_safety_stock" if key == "reorder" else key
        errors.append(RowError(line_of(section, i), column, msg, kind=kind, id=model.id))
    if errors:
        errors.sort(key=lambda e: e.line)
        raise CatalogueInvalid(source, errors)
    return Catalogue(tuple(skus), tuple(scales), tuple(shelves))
