"""`ControlLoop` (the control loop's thread and the ways across) and the journal's second
connection the control loop commits through."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.adapters.journal import Journal, WriterTurns
from controller.control import PRECEDENCE, ControlLoop, Precedence, new_main_loop, run_next
from controller.ports import EventRow, JournalUnavailable
from tests.realtime import needs_fifo
from tests.waiting import wait_for_condition, wait_for_condition_sync


@pytest.fixture
def control() -> Iterator[ControlLoop]:
    loop = ControlLoop("test-control")
    loop.start()
    yield loop
    assert loop.close(timeout_s=2.0)


async def test_calls_run_on_the_control_thread_and_raise_there(control: ControlLoop) -> None:
    main = threading.current_thread()
    where = await control.call(threading.current_thread)
    assert where is not main
    assert where.name == "test-control"
    assert not control.in_loop()
    assert await control.call(control.in_loop)

    async def coro(x: int) -> int:
        await asyncio.sleep(0)
        return x * 2

    assert await control.call_async(coro, 21) == 42

    def boom() -> None:
        raise ValueError("on the control loop")

    with pytest.raises(ValueError, match="on the control loop"):
        await control.call(boom)


async def test_posts_keep_their_order_and_blocking_calls_work_from_threads(
    control: ControlLoop,
) -> None:
    seen: list[int] = []
    for i in range(200):
        control.post(seen.append, i)
    # A blocking call from another thread is queued behind the posts (FIFO).
    got = await asyncio.to_thread(control.call_blocking, lambda: list(seen))
    assert got == list(range(200))
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    control.post(ControlLoop.post_to, loop, done.set)  # and back to this loop
    await asyncio.wait_for(done.wait(), 5)


async def test_a_spawned_task_ends_only_when_cancelled_itself(control: ControlLoop) -> None:
    started = threading.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    task = control.spawn(forever(), name="forever")
    assert await asyncio.to_thread(started.wait, 5)
    waiter = asyncio.create_task(task.result())
    await asyncio.sleep(0)
    waiter.cancel()  # a waiter going away leaves the task running
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not await task.wait(0.05)
    task.cancel()
    assert await task.wait(5)
    assert task.future.cancelled()


def test_the_second_connection_shares_the_journal_and_its_outbox_count(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    journal.open()
    second = journal.second_connection(busy_timeout_s=0.05)
    second.open_second()
    try:
        before = journal.outbox_rows
        body = {"order_id": "o-1", "channel": "api", "external_id": "e-1", "state": "PICKING",
                "updated_ts": 1.0}  # fmt: skip
        second.commit_orders(
            [body], counters={"cmd:s": 7}, events=[EventRow(1.0, "order_state", {"kind": "x"})]
        )
        # One source of truth: the primary reads what the second connection committed.
        assert journal.order("o-1") == body
        assert journal.counters() == {"cmd:s": 7}
        assert journal.outbox_rows == before + 1 == second.outbox_rows
        # While the primary holds the write lock, the second connection's commit fails as
        # retryable after its busy timeout instead of waiting (its thread heartbeats PLCs).
        journal.db.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(JournalUnavailable):
                second.commit_orders([], counters={"cmd:s": 8})
        finally:
            journal.db.execute("ROLLBACK")
        # The same while a transaction of the primary holds the process's writer lock.
        assert journal._writers.acquire(timeout=1.0)
        try:
            with pytest.raises(JournalUnavailable):
                second.commit_orders([], counters={"cmd:s": 8})
        finally:
            journal._writers.release()
        second.commit_orders([], counters={"cmd:s": 8})
        assert journal.counters() == {"cmd:s": 8}
    finally:
        second.close()
        journal.close()


def test_a_priority_writer_goes_before_the_ordinary_writers_already_waiting() -> None:
    """The control loop's order commit waits for the commit in progress only, not behind
    every ingest commit that queued before it (a plain lock let them all go first)."""
    turns = WriterTurns()
    order: list[str] = []

    def writer(name: str, priority: bool) -> None:
        assert turns.acquire(timeout=5.0, priority=priority)
        order.append(name)
        turns.release()

    assert turns.acquire(timeout=1.0)  # a commit in progress
    ordinary = [threading.Thread(target=writer, args=(f"ingest-{i}", False)) for i in range(3)]
    for t in ordinary:
        t.start()
    wait_for_condition_sync(lambda: turns.waiting == 3, timeout_s=5.0, what="3 ingest waiting")
    urgent = threading.Thread(target=writer, args=("orders", True))
    urgent.start()
    wait_for_condition_sync(lambda: turns.waiting == 4, timeout_s=5.0, what="orders waiting")
    turns.release()
    for t in [*ordinary, urgent]:
        t.join(5.0)
    assert order[0] == "orders"
    assert sorted(order[1:]) == ["ingest-0", "ingest-1", "ingest-2"]


def test_a_priority_writer_that_gives_up_lets_the_others_go() -> None:
    turns = WriterTurns()
    assert turns.acquire(timeout=1.0)
    assert not turns.acquire(timeout=0.05, priority=True)  # timed out behind the holder
    turns.release()
    assert turns.acquire(timeout=0.05)  # an ordinary writer is not held back by it
    assert not turns.acquire(timeout=0.01)  # one at a time
    turns.release()


def test_the_control_loops_order_journal_commits_with_priority(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    journal.open()
    second = journal.second_connection(priority=True)
    second.open_second()

    def body(by: str) -> dict[str, object]:
        return {"order_id": "o-1", "channel": "api", "external_id": by, "state": "PICKING",
                "updated_ts": 1.0}  # fmt: skip

    try:
        assert journal._writers.acquire(timeout=1.0)
        done = threading.Event()
        ingest = threading.Thread(
            target=lambda: journal.commit_orders([body("ingest")]) or done.set()
        )
        ingest.start()
        wait_for_condition_sync(
            lambda: journal._writers.waiting == 1, timeout_s=5.0, what="ingest waiting"
        )
        orders = threading.Thread(target=lambda: second.commit_orders([body("orders")]))
        orders.start()
        wait_for_condition_sync(
            lambda: journal._writers.waiting == 2, timeout_s=5.0, what="orders waiting"
        )
        journal._writers.release()
        ingest.join(5.0)
        orders.join(5.0)
        assert done.is_set()
        order = journal.order("o-1")
        assert order is not None
        assert order["external_id"] == "ingest"  # it went last
    finally:
        second.close()
        journal.close()


# -- precedence: the control loop's work before the main loop's ------------------------------


def test_a_main_loop_waits_while_a_control_loop_is_busy_until_it_is_idle() -> None:
    precedence = Precedence()
    precedence.set_max_pause(10.0)  # far longer than the test: only idle() ends the wait
    precedence.busy()
    released = threading.Event()

    def release_once_waiting() -> None:
        wait_for_condition_sync(lambda: precedence.waiting, 5.0, what="the main side waits")
        released.set()
        precedence.idle()

    helper = threading.Thread(target=release_once_waiting)
    helper.start()
    try:
        precedence.wait_turn()
        assert released.is_set(), "wait_turn returned while the control loop was busy"
        assert precedence.pauses == 1
    finally:
        helper.join(5.0)
    precedence.wait_turn()  # idle: at once
    assert precedence.pauses == 1


def test_a_pause_is_bounded_per_burst_of_control_work() -> None:
    """A control loop busy past ``max_pause_s`` holds the main loop once, that long: the next
    iterations of the same burst go on at once."""
    precedence = Precedence()
    precedence.set_max_pause(0.02)
    precedence.busy()
    precedence.wait_turn()
    assert precedence.pauses == 1
    assert precedence.paused_s >= 0.02 * 0.9
    precedence.wait_turn()
    assert precedence.pauses == 1, "a second pause in the same burst"
    precedence.idle()
    precedence.busy()  # a new burst: its own pause
    precedence.wait_turn()
    assert precedence.pauses == 2


def test_no_pause_when_the_runtime_allows_none() -> None:
    precedence = Precedence()
    precedence.busy()
    precedence.wait_turn()  # max_pause_s 0: the default until a runtime sets it
    assert precedence.pauses == 0
    precedence.set_max_pause(-1.0)
    assert precedence.max_pause_s == 0.0


def test_two_control_loops_busy_keep_the_main_loop_waiting_until_both_are_idle() -> None:
    precedence = Precedence()
    precedence.busy()
    precedence.busy()
    precedence.idle()
    assert precedence.busy_loops == 1
    precedence.set_max_pause(0.01)
    precedence.wait_turn()
    assert precedence.pauses == 1  # still one busy: it waited
    precedence.idle()
    assert precedence.busy_loops == 0
    precedence.busy()
    precedence.idle()
    precedence.wait_turn()
    assert precedence.pauses == 1


@pytest.mark.parametrize("main_loop", ["new_main_loop", "plain"])
def test_while_the_control_loop_runs_a_callback_the_main_loop_makes_no_progress(
    main_loop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real loops: a control loop's callback that runs Python for a while (0.2 s, with a
    pause allowed of 1 s) sees the main loop (`new_main_loop`) make no iteration meanwhile;
    a plain event loop in its place goes on (the test can fail)."""
    monkeypatch.setattr(PRECEDENCE, "max_pause_s", 1.0)
    control = ControlLoop("test-precedence")
    control.start()
    spins: list[int] = [0]

    def busy_python() -> int:
        # From when the main loop is held (bounded: a plain loop never is); an iteration
        # it had begun before this loop woke may still end meanwhile.
        held_by = time.monotonic() + 0.1
        while not PRECEDENCE.waiting and time.monotonic() < held_by:
            pass
        start = spins[0]
        deadline = time.monotonic() + 0.2
        while time.monotonic() < deadline:  # Python work: the GIL is shared, not held
            pass
        return spins[0] - start

    async def main() -> int:
        stop = False

        async def spin() -> None:
            while not stop:
                spins[0] += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(spin())
        await wait_for_condition(lambda: spins[0] > 100, 5.0, what="the main loop spins")
        try:
            return await control.call(busy_python)
        finally:
            stop = True
            await task

    factory = new_main_loop if main_loop == "new_main_loop" else asyncio.new_event_loop
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            progress = runner.run(main())
    finally:
        assert control.close(timeout_s=2.0)
    if main_loop == "new_main_loop":
        assert progress == 0
    else:
        assert progress > 0


# -- commands first -----------------------------------------------------------------------------


def _block(control: ControlLoop) -> threading.Event:
    """Hold the control loop in a callback until the returned event is set."""
    release, holding = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        release.wait(10)

    control.post(hold)
    assert holding.wait(5)
    return release


@pytest.mark.parametrize("first", [True, False], ids=["call_first", "call_async"])
async def test_call_first_starts_before_the_work_already_queued_on_the_control_loop(
    control: ControlLoop, first: bool
) -> None:
    release = _block(control)
    seen: list[str] = []
    for i in range(5):
        control.post(seen.append, f"posted {i}")

    async def submission() -> str:
        seen.append("submission")
        await asyncio.sleep(0)
        return "answered"

    call = control.call_first if first else control.call_async
    answer = asyncio.create_task(call(submission))
    queued = control.loop._ready  # type: ignore[attr-defined]

    def call_queued() -> bool:  # the call's callback is in the blocked loop's queue
        names = [getattr(h._callback, "__qualname__", "") for h in list(queued)]
        ours = ("call_first.<locals>.start", "run_coroutine_threadsafe.<locals>.callback")
        return any(n.endswith(ours) for n in names)

    await wait_for_condition(call_queued, 5.0, what="the call queued")
    release.set()
    assert await asyncio.wait_for(answer, 5) == "answered"
    posted = [f"posted {i}" for i in range(5)]
    # call_async queues behind the posts (twice: its callback, then its task's first step).
    assert seen == (["submission", *posted] if first else [*posted, "submission"])


async def test_call_first_raises_its_error_and_a_cancelled_caller_cancels_it(
    control: ControlLoop,
) -> None:
    async def boom() -> None:
        raise ValueError("refused on the control loop")

    with pytest.raises(ValueError, match="refused on the control loop"):
        await control.call_first(boom)

    started, cancelled = threading.Event(), threading.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    caller = asyncio.create_task(control.call_first(forever))
    assert await asyncio.to_thread(started.wait, 5)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert await asyncio.to_thread(cancelled.wait, 5)


async def _first_step_vs_queued(loop_check: asyncio.AbstractEventLoop) -> list[str]:
    """On the running loop: five callbacks queued, then a task moved first with `run_next`."""
    assert asyncio.get_running_loop() is loop_check
    seen: list[str] = []
    for i in range(5):
        loop_check.call_soon(seen.append, f"queued {i}")

    async def command() -> None:
        seen.append("command")

    task = asyncio.get_running_loop().create_task(command())
    run_next(task)
    await task
    await asyncio.sleep(0)
    return seen


def test_run_next_puts_a_new_task_first_on_the_control_loop_only(control: ControlLoop) -> None:
    queued = [f"queued {i}" for i in range(5)]
    on_control = asyncio.run_coroutine_threadsafe(
        _first_step_vs_queued(control.loop), control.loop
    ).result(5)
    assert on_control == ["command", *queued]
    # Any other loop keeps first-in, first-out (the same code, nothing moved).
    plain = asyncio.new_event_loop()
    try:
        assert plain.run_until_complete(_first_step_vs_queued(plain)) == [*queued, "command"]
    finally:
        plain.close()


# -- real-time priority -------------------------------------------------------------------------


def _policy_of(thread_id: int) -> int:
    return os.sched_getscheduler(thread_id) & ~os.SCHED_RESET_ON_FORK


@needs_fifo
def test_the_control_thread_runs_sched_fifo_and_what_it_starts_does_not() -> None:
    control = ControlLoop("test-realtime", realtime_priority=7)
    control.start()
    try:
        assert (control.realtime_granted, control.realtime_refused) == (7, None)
        tid = control.call_blocking(threading.get_native_id)
        assert _policy_of(tid) == os.SCHED_FIFO
        assert os.sched_getscheduler(tid) & os.SCHED_RESET_ON_FORK
        assert os.sched_getparam(tid).sched_priority == 7
        # A thread the control thread starts (an executor's) runs with normal scheduling.
        child = asyncio.run_coroutine_threadsafe(
            asyncio.to_thread(threading.get_native_id), control.loop
        ).result(5)
        assert _policy_of(child) == os.SCHED_OTHER
        assert _policy_of(threading.get_native_id()) == os.SCHED_OTHER  # the caller's unchanged
    finally:
        assert control.close(timeout_s=2.0)


def test_a_refused_priority_leaves_the_control_loop_running_and_says_why() -> None:
    control = ControlLoop("test-refused", realtime_priority=100)  # beyond SCHED_FIFO's range
    control.start()
    try:
        assert control.realtime_granted == 0
        assert control.realtime_refused == "Invalid argument"
        assert _policy_of(control.call_blocking(threading.get_native_id)) == os.SCHED_OTHER
    finally:
        assert control.close(timeout_s=2.0)


def test_no_priority_asked_means_normal_scheduling(control: ControlLoop) -> None:
    assert (control.realtime_granted, control.realtime_refused) == (0, None)
    assert _policy_of(control.call_blocking(threading.get_native_id)) == os.SCHED_OTHER


async def test_call_first_answers_every_call_while_other_threads_keep_queueing(
    control: ControlLoop,
) -> None:
    """`run_next` looks through the ready queue while other threads append to it (the main
    loop's and the HTTP loop's posts): it must never fail a submission (a failure there once
    left a pick request unanswered: "deque mutated during iteration")."""
    errors: list[dict[str, object]] = []
    control.call_blocking(
        lambda: control.loop.set_exception_handler(lambda _, ctx: errors.append(ctx))
    )
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch as often as the interpreter allows
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            for _ in range(50):
                control.post(lambda: None)
            time.sleep(0)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()

    async def submission(i: int) -> int:
        return i

    try:
        answers = await asyncio.wait_for(
            asyncio.gather(*(control.call_first(submission, i) for i in range(1000))), 60
        )
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        sys.setswitchinterval(before)
    assert answers == list(range(1000))
    assert errors == []
