"""Catalogue files: CSV with a header row, or JSON Lines; one record per row (docs/catalogue.md).

Both formats carry the same columns (`records.HEADER`): ``kind`` (``sku``, ``scale`` or
``shelf``), ``id`` and the kind's fields. A CSV file's header names the columns it uses, in any
order; an empty cell is unset. A JSON Lines file holds one object per line; a missing key or
``null`` is unset. Reading never raises on bad content: each problem becomes a `RowError`.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TextIO

import orjson

from controller.catalog.records import HEADER, KINDS, LIST_COLUMNS, Catalogue, flat

Format = Literal["csv", "jsonl"]
FORMATS: Final[tuple[Format, ...]] = ("csv", "jsonl")
_SUFFIXES: Final[dict[str, Format]] = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


@dataclass(frozen=True, slots=True)
class Row:
    """One record as read: its line in the file and its cells (strings from CSV, JSON values
    from JSON Lines; unset cells left out)."""

    line: int
    cells: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RowError:
    """A problem with one row (``line`` 0: the file as a whole) and column (``-``: the row)."""

    line: int
    column: str
    message: str
    kind: str = ""
    id: str = ""

    def render(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line else source
        what = f" {self.kind} {self.id}" if self.kind and self.id else ""
        col = f" column {self.column}:" if self.column != "-" else ""
        return f"{where}:{what}{col} {self.message}".replace(": :", ":")


class CatalogueInvalid(Exception):
    """The file (or the catalogue it holds) has errors; nothing was imported."""

    def __init__(self, source: str, errors: list[RowError]) -> None:
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: {len(errors)} error(s); nothing imported")

    def report(self) -> str:
        """Every error, one line each, after a summary line."""
        lines = [f"{self.source}: {len(self.errors)} error(s); nothing imported"]
        lines += [f"  {e.render(self.source)}" for e in self.errors]
        return "\n".join(lines)


def format_of(path: Path, given: str | None) -> Format:
    """``given`` (``csv`` or ``jsonl``), else the file's suffix; ValueError when neither says."""
    if given is not None:
        if given not in FORMATS:
            raise ValueError(f"unknown format {given!r}: csv or jsonl")
        return "csv" if given == "csv" else "jsonl"
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: cannot tell the format from the suffix; pass --format csv|jsonl")
    return fmt


def _decode(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise CatalogueInvalid(source, [RowError(line, "-", "not UTF-8 text")]) from None


def read_rows(
    data: bytes,
    fmt: Format,
    source: str,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[Row], list[RowError]]:
    """The rows of a catalogue file and the problems found while reading it."""
    text = _decode(data, source)
    rows = _csv_rows(text) if fmt == "csv" else _jsonl_rows(text)
    out: list[Row] = []
    errors: list[RowError] = []
    for item in rows:
        if isinstance(item, RowError):
            errors.append(item)
        else:
            out.append(item)
            if progress is not None and len(out) % PROGRESS_EVERY_ROWS == 0:
                progress(len(out))
    return out, errors


PROGRESS_EVERY_ROWS: Final = 10_000
"""Rows between two progress lines of a long import."""


def _csv_rows(text: str) -> Iterator[Row | RowError]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        yield RowError(1, "-", f"not CSV: {exc}")
        return
    if header is None:
        yield RowError(0, "-", "the file is empty (a header row is required)")
        return
    names = [h.strip() for h in header]
    known = set(HEADER)
    bad = False
    for name in names:
        if name not in known:
            yield RowError(1, name or "-", f"unknown column {name!r} (docs/catalogue.md)")
            bad = True
    dup = sorted({n for n in names if names.count(n) > 1})
    for name in dup:
        yield RowError(1, name, "column named twice in the header")
        bad = True
    for required in ("kind", "id"):
        if required not in names:
            yield RowError(1, required, "the header lacks this column")
            bad = True
    if bad:
        return
    lists = [n for n in names if n in LIST_COLUMNS]
    line = reader.line_num + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield RowError(line, "-", f"not CSV: {exc}")
            return
        if not any(c.strip() for c in cells):
            line = reader.line_num + 1
            continue  # blank line
        if len(cells) != len(names):
            yield RowError(line, "-", f"{len(cells)} cell(s) for {len(names)} column(s)")
        else:
            row: dict[str, Any] = {
                n: v for n, c in zip(names, cells, strict=True) if (v := c.strip())
            }
            for name in lists:
                if name in row:
                    row[name] = row[name].split()
            yield Row(line, row)
        line = reader.line_num + 1


def _jsonl_rows(text: str) -> Iterator[Row | RowError]:
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            yield RowError(n, "-", f"not JSON: {exc}")
            continue
        if not isinstance(obj, dict):
            yield RowError(n, "-", f"a JSON object per line, not {type(obj).__name__}")
            continue
        unknown = [k for k in obj if k not in HEADER]
        for key in unknown:
            yield RowError(n, str(key), f"unknown column {key!r} (docs/catalogue.md)")
        if not unknown:
            yield Row(n, {k: v for k, v in obj.items() if v is not None})


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return " ".join(str(v) for v in value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    return str(value)


def write(catalogue: Catalogue, fmt: Format, out: TextIO) -> int:
    """Write every record (SKUs, then scales, then shelves); the number of records."""
    n = 0
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(HEADER)
        for kind in KINDS:
            for model in catalogue.records(kind):
                rec = flat(kind, model)
                writer.writerow(
                    [kind if c == "kind" else _cell(rec.get(c)) if c in rec else "" for c in HEADER]
                )
                n += 1
        return n
    for kind in KINDS:
        for model in catalogue.records(kind):
            rec = {k: v for k, v in flat(kind, model).items() if v is not None and v != []}
            out.write(orjson.dumps({"kind": kind, **rec}).decode())
            out.write("\n")
            n += 1
    return n
