"""Conditioning of one shelf's raw weight stream: spike rejection and settling.

The window holds the last ``settle_window`` accepted readings. Once it holds at least three, a
reading further than ``spike_g`` from the window median is held back as a suspected spike. A
real pick or restock is a step, so two consecutive suspects that agree within ``settle_band_g``
are accepted as the new level and the window restarts from them; a lone suspect is dropped.
The window is settled when it holds at least ``min(3, settle_window)`` readings spanning no
more than ``settle_band_g``.

The rules run on a row of a `ShelfTable` (controller/domain/shelf_table.py: the controller
keeps every shelf's conditioner in its columns); `ScaleConditioner` is one shelf's view of its
row, or of a table of its own when built alone.
"""

from __future__ import annotations

from collections.abc import Iterable

from controller.domain.model import ShelfSpec
from controller.domain.shelf_table import ShelfTable


class ScaleConditioner:
    """The conditioner of one shelf: a view of row ``row`` of ``table``.

    ``ScaleConditioner(window, pending, spec=spec)`` builds one on a table of its own;
    ``ShelfState.conditioner`` gives the view of a shelf's row. ``window`` and ``pending`` are
    copies (oldest first); change them through ``push`` and ``reset``.
    """

    __slots__ = ("_row", "_table")

    def __init__(
        self, window: Iterable[float] = (), pending: Iterable[float] = (), *, spec: ShelfSpec
    ) -> None:
        self._table = ShelfTable.of((spec,))
        self._row = 0
        self._table.load_conditioner(0, window, pending, spec)

    @classmethod
    def view(cls, table: ShelfTable, row: int) -> ScaleConditioner:
        """The conditioner of ``table``'s row ``row`` (live: reads and writes the row)."""
        self = cls.__new__(cls)
        self._table = table
        self._row = row
        return self

    @property
    def window(self) -> list[float]:
        return self._table.get_window(self._row)

    @property
    def pending(self) -> list[float]:
        return self._table.get_pending(self._row)

    @property
    def settled(self) -> bool:
        return self._table.is_settled(self._row)

    @property
    def weight_g(self) -> float | None:
        """Median of the window, or ``None`` when it is empty."""
        return self._table.median(self._row)

    def reset(self, spec: ShelfSpec) -> None:
        """Forget every reading (after a gap or an over-range reading)."""
        self._table.reset_window(self._row)

    def push(self, weight_g: float, spec: ShelfSpec) -> tuple[bool, float, bool]:
        """Feed one reading; return ``(settled, weight_g, spike)``.

        ``weight_g`` is the window median; ``spike`` is true when this reading was held back.
        """
        return self._table.push(self._row, weight_g, spec)
