"""Conditioning of one shelf's raw weight stream: spike rejection and settling.

The window holds the last ``settle_window`` accepted readings. Once it holds at least three, a
reading further than ``spike_g`` from the window median is held back as a suspected spike. A
real pick or restock is a step, so two consecutive suspects that agree within ``settle_band_g``
are accepted as the new level and the window restarts from them; a lone suspect is dropped.
The window is settled when it holds at least ``min(3, settle_window)`` readings spanning no
more than ``settle_band_g``.
"""

from __future__ import annotations

from collections.abc import Iterable

from controller.domain.model import ShelfSpec

_SPIKE_MIN_WINDOW = 3
"""Below this a median says too little to call anything a spike."""
_CONFIRM_READINGS = 2


def _median(sorted_values: list[float]) -> float:
    n = len(sorted_values)
    mid = n // 2
    if n % 2:
        return sorted_values[mid]
    return (sorted_values[mid - 1] + sorted_values[mid]) / 2.0


class ScaleConditioner:
    """Mutable conditioner for one shelf, owned by that shelf's ``ShelfState``.

    ``push`` is on the hot path (every reading), hence a plain slotted class mutated in place
    with the median and settledness cached between readings.
    """

    __slots__ = ("_median", "_settled", "pending", "window")

    def __init__(
        self, window: Iterable[float] = (), pending: Iterable[float] = (), *, spec: ShelfSpec
    ) -> None:
        self.window: list[float] = list(window)
        self.pending: list[float] = list(pending)
        self._median = 0.0
        self._settled = False
        self._refresh(spec)

    def _refresh(self, spec: ShelfSpec) -> None:
        window = self.window
        excess = len(window) - spec.settle_window
        if excess > 0:
            del window[:excess]
        if not window:
            self._median = 0.0
            self._settled = False
            return
        ordered = sorted(window)
        self._median = _median(ordered)
        self._settled = (
            len(ordered) >= min(3, spec.settle_window)
            and ordered[-1] - ordered[0] <= spec.settle_band_g
        )

    @property
    def settled(self) -> bool:
        return self._settled

    @property
    def weight_g(self) -> float | None:
        """Median of the window, or ``None`` when it is empty."""
        return self._median if self.window else None

    def reset(self, spec: ShelfSpec) -> None:
        """Forget every reading (after a gap or an over-range reading)."""
        self.window.clear()
        self.pending.clear()
        self._refresh(spec)

    def push(self, weight_g: float, spec: ShelfSpec) -> tuple[bool, float, bool]:
        """Feed one reading; return ``(settled, weight_g, spike)``.

        ``weight_g`` is the window median; ``spike`` is true when this reading was held back.
        """
        window = self.window
        if len(window) >= _SPIKE_MIN_WINDOW and abs(weight_g - self._median) > spec.spike_g:
            pending = self.pending
            if pending and abs(weight_g - pending[-1]) <= spec.settle_band_g:
                pending.append(weight_g)
                if len(pending) >= _CONFIRM_READINGS:
                    self.window = pending
                    self.pending = []
                    self._refresh(spec)
                    return self._settled, self._median, False
            else:
                pending.clear()
                pending.append(weight_g)
            return self._settled, self._median, True
        if self.pending:
            self.pending.clear()
        # Inlined _refresh: this is the per-reading path.
        window.append(weight_g)
        size = spec.settle_window
        n = len(window)
        if n > size:
            del window[: n - size]
            n = size
        ordered = sorted(window)
        mid = n >> 1
        median_g = ordered[mid] if n & 1 else (ordered[mid - 1] + ordered[mid]) / 2.0
        settled = n >= (size if size < 3 else 3) and ordered[-1] - ordered[0] <= spec.settle_band_g
        self._median = median_g
        self._settled = settled
        return settled, median_g, False
