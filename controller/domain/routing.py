"""Allocation and routing of pick lines, pure.

*Allocation* chooses the shelves a line is picked from: the shelves holding the SKU, most
available units first, splitting a line over several shelves only when no single shelf has
enough. Available = counted units − units reserved by open tasks; a shelf whose count is not
known (no settled reading, STALE, ambiguous) offers nothing — a pick is never allocated against
a guess.

*Routing* turns a shelf into a path: the shelf's zone feeds one or more conveyor segments that
end at a sorter; the pack station is a lane of a sorter. A shelf whose zone does not reach the
pack station's sorter cannot be routed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "AllocationError",
    "LineProblem",
    "Station",
    "StockSource",
    "TaskPlan",
    "Topology",
    "ZoneRoute",
    "plan",
]


@dataclass(frozen=True, slots=True)
class ZoneRoute:
    conveyors: tuple[str, ...]
    sorter: str | None


@dataclass(frozen=True, slots=True)
class Station:
    sorter: str
    lane: int


@dataclass(frozen=True, slots=True)
class Topology:
    zones: Mapping[str, ZoneRoute]
    stations: Mapping[str, Station]


@dataclass(frozen=True, slots=True)
class StockSource:
    """One shelf that holds a SKU. ``available`` is None when its count is not known."""

    shelf: str
    zone: str
    available: int | None


@dataclass(frozen=True, slots=True)
class TaskPlan:
    line_no: int
    sku: str
    qty: int
    shelf: str
    zone: str
    conveyors: tuple[str, ...]
    sorter: str
    lane: int


@dataclass(frozen=True, slots=True)
class LineProblem:
    line_no: int
    sku: str
    code: str  # "insufficient_stock" | "stock_unknown" | "no_route" | "unknown_sku"
    detail: str
    available: int = 0


class AllocationError(Exception):
    """One or more lines cannot be allocated; nothing was planned."""

    def __init__(self, problems: Sequence[LineProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(f"line {p.line_no} ({p.sku}): {p.detail}" for p in problems))


def plan(
    lines: Sequence[tuple[str, int]],
    station_id: str,
    topology: Topology,
    sources: Mapping[str, Sequence[StockSource]],
) -> list[TaskPlan]:
    """Allocate and route every line for ``station_id``, or raise `AllocationError` listing
    every line that cannot be served (all or nothing). Lines of the same SKU share the
    availability. ``station_id`` must be in the topology (checked by the caller)."""
    station = topology.stations[station_id]
    problems: list[LineProblem] = []
    planned: list[TaskPlan] = []
    taken: dict[str, int] = {}  # shelf -> units already planned by earlier lines
    for line_no, (sku, qty) in enumerate(lines):
        shelves = sources.get(sku)
        if not shelves:
            problems.append(LineProblem(line_no, sku, "unknown_sku", f"no shelf holds {sku}"))
            continue
        routable = [s for s in shelves if _reaches(topology, s.zone, station)]
        if not routable:
            problems.append(
                LineProblem(
                    line_no,
                    sku,
                    "no_route",
                    f"no shelf holding {sku} is in a zone that reaches sorter {station.sorter}",
                )
            )
            continue
        known = [s for s in routable if s.available is not None]
        if not known:
            problems.append(
                LineProblem(
                    line_no, sku, "stock_unknown", f"the count of {sku} is not known right now"
                )
            )
            continue
        free = sorted(
            ((max(0, (s.available or 0) - taken.get(s.shelf, 0)), s) for s in known),
            key=lambda t: (-t[0], t[1].shelf),
        )
        total = sum(n for n, _ in free)
        if total < qty:
            problems.append(
                LineProblem(
                    line_no,
                    sku,
                    "insufficient_stock",
                    f"{qty} requested, {total} available",
                    available=total,
                )
            )
            continue
        left = qty
        for n, src in free:
            if left == 0:
                break
            if n == 0:
                continue
            take = min(n, left)
            left -= take
            taken[src.shelf] = taken.get(src.shelf, 0) + take
            route = topology.zones[src.zone]
            assert route.sorter is not None
            planned.append(
                TaskPlan(
                    line_no, sku, take, src.shelf, src.zone, route.conveyors, station.sorter,
                    station.lane,
                )
            )  # fmt: skip
    if problems:
        raise AllocationError(problems)
    return planned


def _reaches(topology: Topology, zone: str, station: Station) -> bool:
    route = topology.zones.get(zone)
    return route is not None and route.sorter == station.sorter
