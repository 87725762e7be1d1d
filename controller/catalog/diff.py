"""What an import would change: records added, removed and changed, per kind, by id."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from controller.catalog.records import KINDS, Catalogue, Kind, flat


@dataclass(frozen=True, slots=True)
class Change:
    """One record's change: ``op`` ``add``, ``remove`` or ``change``; ``before`` / ``after``
    the whole record (``None`` when absent); ``fields`` column → (before, after) of a change."""

    kind: Kind
    id: str
    op: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    fields: dict[str, tuple[Any, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CatalogueDiff:
    changes: list[Change]

    def __bool__(self) -> bool:
        return bool(self.changes)

    def counts(self) -> dict[str, int]:
        """Changes per op (``add``, ``remove``, ``change``)."""
        out = {"add": 0, "remove": 0, "change": 0}
        for c in self.changes:
            out[c.op] += 1
        return out

    def render(self) -> list[str]:
        """One line per change: ``+ shelf S1``, ``- sku K9``,
        ``~ shelf S2: capacity_units 40 -> 50, tare_g 500.0 -> 450.0``."""
        lines: list[str] = []
        for c in self.changes:
            if c.op == "change":
                detail = ", ".join(
                    f"{k} {_show(b)} -> {_show(a)}" for k, (b, a) in c.fields.items()
                )
                lines.append(f"~ {c.kind} {c.id}: {detail}")
            else:
                lines.append(f"{'+' if c.op == 'add' else '-'} {c.kind} {c.id}")
        return lines


def _show(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, list | tuple):
        return " ".join(map(str, value)) or "(none)"
    return str(value)


def diff(before: Catalogue, after: Catalogue) -> CatalogueDiff:
    """The changes that turn ``before`` into ``after`` (per kind: removed, added, changed)."""
    changes: list[Change] = []
    for kind in KINDS:
        old = {m.id: m for m in before.records(kind)}
        new = {m.id: m for m in after.records(kind)}
        for ident, model in old.items():
            if ident not in new:
                changes.append(Change(kind, ident, "remove", flat(kind, model), None))
        for ident, model in new.items():
            prev = old.get(ident)
            if prev is None:
                changes.append(Change(kind, ident, "add", None, flat(kind, model)))
            elif prev != model:
                b, a = flat(kind, prev), flat(kind, model)
                fields = {k: (b[k], a[k]) for k in a if b.get(k) != a[k]}
                if fields:
                    changes.append(Change(kind, ident, "change", b, a, fields))
    return CatalogueDiff(changes)
