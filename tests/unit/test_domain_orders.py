"""Orders, pick tasks and routing: pure domain, plain asserts and hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.domain.orders import (
    FINAL_TASK_STATES,
    TASK_TRANSITIONS,
    InvalidTransition,
    NotCancellable,
    Order,
    OrderState,
    PickTask,
    PlcKnows,
    Resolution,
    TaskEvent,
    TaskState,
    body_digest,
    next_task_state,
    reconcile_event,
    transition,
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
        assert (ev.kind, ev.new, ev.order_id, ev.ts_s) == ("order_state", new, "o1", 11.0 + i)
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


def task(state: TaskState = TaskState.DISPATCHED, task_no: int = 0) -> PickTask:
    t = PickTask(task_no, 0, "K", 2, "sh1", "A", ("c-a",), "sorter-1", 3, 7, 42 + task_no, 8)
    t.state = state
    return t


def picking_order(*tasks: PickTask) -> Order:
    order = Order("o1", "api", "W-1", "PS1", [("K", 2)], created_ts=0.0)
    for step in (OrderState.VALIDATED, OrderState.ALLOCATED, OrderState.PICKING):
        order.transition(step, 1.0)
    order.tasks.extend(tasks)
    return order


def test_the_task_happy_path_goes_through_the_table() -> None:
    t = task()
    for event, state in [
        (TaskEvent.ACCEPTED, TaskState.ACCEPTED),
        (TaskEvent.DIVERTED, TaskState.DIVERTED),
        (TaskEvent.SCALE_CONFIRMED, TaskState.CONFIRMED),
    ]:
        transition(t, event, 5.0)
        assert t.state is state
    assert (t.picked_qty, t.reason, t.updated_ts, t.final) == (2, None, 5.0, True)


@given(
    state=st.sampled_from(TaskState),
    event=st.sampled_from(TaskEvent),
)
def test_every_task_transition_follows_the_table_or_raises(
    state: TaskState, event: TaskEvent
) -> None:
    t = task(state)
    before = t.as_dict()
    expected = TASK_TRANSITIONS.get((state, event))
    if expected is None:
        with pytest.raises(InvalidTransition):
            transition(t, event, 9.0, "why")
        assert t.as_dict() == before  # refused: nothing changed
    else:
        assert transition(t, event, 9.0, "why") is state
        assert t.state is expected
        if expected in FINAL_TASK_STATES:
            assert t.reason == "why"


def test_final_states_only_leave_by_a_persons_resolution() -> None:
    for (state, event), new in TASK_TRANSITIONS.items():
        if state in FINAL_TASK_STATES:
            assert state is TaskState.UNKNOWN
            assert event in (TaskEvent.RESOLVED_PICKED, TaskEvent.RESOLVED_NOT_PICKED)
            assert new in (TaskState.CONFIRMED, TaskState.FAILED)
    # Nothing leaves CONFIRMED, SHORT, FAILED or CANCELLED.
    for state in FINAL_TASK_STATES - {TaskState.UNKNOWN}:
        for event in TaskEvent:
            with pytest.raises(InvalidTransition):
                next_task_state(state, event)


@pytest.mark.parametrize(
    ("state", "sent_epoch", "knows", "epoch", "diverted", "expected"),
    [
        (TaskState.DISPATCHED, 3, PlcKnows.DONE, 3, True, TaskEvent.DIVERTED),
        (TaskState.ACCEPTED, 3, PlcKnows.DONE, 3, False, TaskEvent.NOT_DIVERTED),
        (TaskState.DISPATCHED, 3, PlcKnows.PENDING, 3, False, TaskEvent.ACCEPTED),
        (TaskState.DISPATCHED, 3, PlcKnows.NOT_SEEN, 3, False, None),  # sent again, same id
        (TaskState.ACCEPTED, 3, PlcKnows.NOT_SEEN, 3, False, TaskEvent.LOST),
        (TaskState.DISPATCHED, 3, PlcKnows.NOT_SEEN, 4, False, TaskEvent.LOST),  # PLC restarted
        (TaskState.DISPATCHED, None, PlcKnows.NOT_SEEN, 4, False, TaskEvent.LOST),
        (TaskState.DISPATCHED, 3, PlcKnows.UNKNOWN, 3, False, TaskEvent.LOST),  # out of the ring
    ],
)
def test_reconciliation_decides_through_the_table(
    state: TaskState,
    sent_epoch: int | None,
    knows: PlcKnows,
    epoch: int,
    diverted: bool,
    expected: TaskEvent | None,
) -> None:
    event = reconcile_event(state, sent_epoch, knows, epoch, diverted)
    assert event is expected
    if event is not None:
        next_task_state(state, event)  # and the table accepts it


def test_a_final_task_has_nothing_to_reconcile() -> None:
    with pytest.raises(InvalidTransition):
        reconcile_event(TaskState.CONFIRMED, 3, PlcKnows.DONE, 3, True)


def test_cancel_before_any_command_was_sent() -> None:
    order = picking_order(task(), task(task_no=1))
    ev = order.cancel(4.0, "customer withdrew", commands_sent=False)
    assert (ev.old, ev.new, ev.reason) == ("PICKING", "CANCELLED", "customer withdrew")
    assert not order.open
    assert order.reason == "customer withdrew"
    assert [t.state for t in order.tasks] == [TaskState.CANCELLED] * 2
    assert order.tasks_final()


@pytest.mark.parametrize("sent", [True, False])
def test_cancel_is_refused_once_executing_or_closed(sent: bool) -> None:
    order = picking_order(task())
    if not sent:
        order.transition(OrderState.EXCEPTION, 2.0, "jam")
    before = order.as_dict()
    with pytest.raises(NotCancellable):
        order.cancel(4.0, "too late", commands_sent=sent)
    assert order.as_dict() == before


def test_cancel_is_refused_when_a_task_moved_on() -> None:
    order = picking_order(task(), task(TaskState.ACCEPTED, task_no=1))
    before = order.as_dict()
    with pytest.raises(NotCancellable):
        order.cancel(4.0, "too late", commands_sent=False)
    assert order.as_dict() == before


def test_resolving_the_last_unknown_task_as_picked_sorts_the_order() -> None:
    order = picking_order(task(TaskState.CONFIRMED), task(TaskState.UNKNOWN, task_no=1))
    order.tasks[1].reason = "PLC restarted"
    order.transition(OrderState.EXCEPTION, 2.0, "task 1 UNKNOWN: PLC restarted")
    with pytest.raises(InvalidTransition):  # not while a task is not CONFIRMED
        order.transition(OrderState.SORTED, 2.5)
    events = order.resolve(order.tasks[1], Resolution.CONFIRMED, 3.0, by="sup", reason="in tote")
    assert [(e.old, e.new) for e in events] == [("EXCEPTION", "SORTED")]
    t = order.tasks[1]
    assert (t.state, t.picked_qty, t.resolved_by, t.resolved_ts) == (
        TaskState.CONFIRMED,
        2,
        "sup",
        3.0,
    )
    assert t.reason == "resolved CONFIRMED by sup: in tote (was: PLC restarted)"
    assert order.reason is None
    again = Order.from_dict(order.as_dict())
    assert again.as_dict() == order.as_dict()
    order.transition(OrderState.PACKED, 4.0)  # and it goes on to the pack station


def test_resolving_as_failed_keeps_the_exception_and_a_second_resolve_is_refused() -> None:
    order = picking_order(task(TaskState.UNKNOWN))
    order.transition(OrderState.EXCEPTION, 2.0, "lost")
    assert order.resolve(order.tasks[0], Resolution.FAILED, 3.0, by="sup", reason="empty") == []
    assert (order.state, order.tasks[0].state) == (OrderState.EXCEPTION, TaskState.FAILED)
    before = order.as_dict()
    with pytest.raises(InvalidTransition):
        order.resolve(order.tasks[0], Resolution.CONFIRMED, 4.0, by="sup", reason="oops")
    assert order.as_dict() == before


def test_an_unresolved_task_keeps_its_old_journal_shape() -> None:
    assert "resolved_by" not in task().as_dict()


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
