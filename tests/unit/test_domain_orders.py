"""Orders, pick tasks and routing: pure domain, plain asserts and hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.domain.orders import (
    InvalidTransition,
    Order,
    OrderState,
    PickTask,
    TaskState,
    body_digest,
)
from controller.domain.routing import (
    AllocationError,
    Station,
    StockSource,
    Topology,
    ZoneRoute,
    plan,
)

TOPO = Topology(
    zones={
        "A": ZoneRoute(("c-a", "c-main"), "sorter-1"),
        "B": ZoneRoute(("c-b",), "sorter-1"),
        "X": ZoneRoute((), "sorter-2"),
        "N": ZoneRoute((), None),
    },
    stations={"PS1": Station("sorter-1", 3), "PS2": Station("sorter-2", 1)},
)


def test_lifecycle_happy_path_and_events() -> None:
    order = Order("o1", "api", "W-1", "PS1", [("K", 2)], created_ts=10.0)
    assert order.state is OrderState.RECEIVED
    assert order.open
    steps = [
        OrderState.VALIDATED,
        OrderState.ALLOCATED,
        OrderState.PICKING,
        OrderState.SORTED,
        OrderState.PACKED,
        OrderState.SHIPPED,
    ]
    for i, new in enumerate(steps):
        ev = order.transition(new, 11.0 + i)
        assert (ev["kind"], ev["new"], ev["order_id"]) == ("order_state", new.value, "o1")
    assert not order.open
    assert [h[1] for h in order.history] == ["RECEIVED", *(s.value for s in steps)]
    assert order.updated_ts == 16.0


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        ([], OrderState.PICKING),
        ([OrderState.VALIDATED, OrderState.ALLOCATED, OrderState.PICKING], OrderState.SHIPPED),
        ([OrderState.EXCEPTION], OrderState.PICKING),
        ([OrderState.VALIDATED, OrderState.EXCEPTION], OrderState.SORTED),
    ],
)
def test_invalid_transitions_are_refused_and_change_nothing(
    path: list[OrderState], bad: OrderState
) -> None:
    order = Order("o1", "api", "W-1", "PS1", [("K", 2)], created_ts=0.0)
    for step in path:
        order.transition(step, 1.0)
    before = order.as_dict()
    with pytest.raises(InvalidTransition):
        order.transition(bad, 2.0)
    assert order.as_dict() == before


def test_exception_keeps_the_reason() -> None:
    order = Order("o1", "api", "W-1", "PS1", [("K", 2)], created_ts=0.0)
    order.transition(OrderState.EXCEPTION, 1.0, "jam on c-a")
    assert order.reason == "jam on c-a"
    assert not order.open


def test_order_round_trips_through_its_dict() -> None:
    order = Order("o1", "wms", "W-1", "PS1", [("K", 2), ("L", 1)], created_ts=5.0, principal="p")
    order.transition(OrderState.VALIDATED, 6.0)
    order.tasks.append(
        PickTask(0, 0, "K", 2, "sh1", "A", ("c-a",), "sorter-1", 3, 7, 42, 8, plc_epoch=9)
    )
    order.tasks[0].state = TaskState.DIVERTED
    again = Order.from_dict(order.as_dict())
    assert again.as_dict() == order.as_dict()
    assert again.tasks[0].conveyors == ("c-a",)
    assert not again.tasks_final()
    again.tasks[0].state = TaskState.SHORT
    assert again.tasks_final()


def test_body_digest_ignores_key_order_only() -> None:
    a = {"order_id": "W", "lines": [["K", 1]], "pack_station": "PS1"}
    b = {"pack_station": "PS1", "lines": [["K", 1]], "order_id": "W"}
    assert body_digest(a) == body_digest(b)
    assert body_digest(a) != body_digest({**a, "lines": [["K", 2]]})


def src(shelf: str, zone: str, available: int | None) -> StockSource:
    return StockSource(shelf, zone, available)


def test_plan_prefers_the_fullest_shelf_and_routes_it() -> None:
    sources = {"K": [src("a1", "A", 3), src("b1", "B", 10)]}
    (task,) = plan([("K", 4)], "PS1", TOPO, sources)
    assert (task.shelf, task.qty, task.conveyors, task.sorter, task.lane) == (
        "b1",
        4,
        ("c-b",),
        "sorter-1",
        3,
    )


def test_plan_splits_a_line_only_when_no_shelf_has_enough() -> None:
    sources = {"K": [src("a1", "A", 3), src("b1", "B", 4)]}
    tasks = plan([("K", 6)], "PS1", TOPO, sources)
    assert [(t.shelf, t.qty) for t in tasks] == [("b1", 4), ("a1", 2)]


def test_lines_of_the_same_sku_share_availability() -> None:
    sources = {"K": [src("a1", "A", 5)]}
    with pytest.raises(AllocationError) as err:
        plan([("K", 3), ("K", 3)], "PS1", TOPO, sources)
    (problem,) = err.value.problems
    assert (problem.line_no, problem.code, problem.available) == (1, "insufficient_stock", 2)


def test_problems_name_every_bad_line_and_plan_nothing() -> None:
    sources = {
        "K": [src("a1", "A", 5)],
        "U": [src("a2", "A", None)],
        "F": [src("x1", "X", 9)],  # zone X reaches sorter-2, not PS1's sorter-1
        "N": [src("n1", "N", 9)],  # zone N has no sorter at all
    }
    with pytest.raises(AllocationError) as err:
        plan([("K", 1), ("U", 1), ("F", 1), ("N", 1), ("Q", 1)], "PS1", TOPO, sources)
    codes = [(p.line_no, p.code) for p in err.value.problems]
    assert codes == [
        (1, "stock_unknown"),
        (2, "no_route"),
        (3, "no_route"),
        (4, "unknown_sku"),
    ]


@given(
    avail=st.lists(st.one_of(st.none(), st.integers(0, 50)), min_size=1, max_size=5),
    qtys=st.lists(st.integers(1, 60), min_size=1, max_size=4),
)
def test_plan_never_promises_more_than_is_there(avail: list[int | None], qtys: list[int]) -> None:
    shelves = [src(f"s{i}", "A" if i % 2 else "B", a) for i, a in enumerate(avail)]
    lines = [("K", q) for q in qtys]
    known = [a for a in avail if a is not None]
    # Line by line against what earlier lines left (a line that does not fit takes nothing).
    left, fits = sum(known), bool(known)
    for q in qtys:
        if q <= left:
            left -= q
        else:
            fits = False
    if not fits:
        with pytest.raises(AllocationError):
            plan(lines, "PS1", TOPO, {"K": shelves})
        return
    tasks = plan(lines, "PS1", TOPO, {"K": shelves})
    for line_no, qty in enumerate(qtys):
        assert sum(t.qty for t in tasks if t.line_no == line_no) == qty
    for shelf in shelves:
        taken = sum(t.qty for t in tasks if t.shelf == shelf.shelf)
        assert taken <= (shelf.available or 0)
    assert all(t.qty > 0 for t in tasks)
