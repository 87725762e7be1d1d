"""The control loop: an asyncio event loop in a thread of its own for the PLC side.

The PLC links (heartbeats, resync), their drivers, the order desk and the pick executor run
on this loop (docs/architecture.md, "Three event loops"); ingest, alerts, the historian,
supervision and most API routes stay on the main loop (the pick and order routes run on the
HTTP loop, `controller.api.loops`, and reach this loop the same way the main loop does; the
crossings below work from any loop). Nothing on one loop ever blocks waiting for
the other, so a long ingest group delays neither a heartbeat nor a pick's first Modbus
write; with the GIL the two threads still share one interpreter (the switch interval,
``sys.getswitchinterval()``, 5 ms by default, bounds how long a runnable thread waits).

Crossing between the loops, in both directions, only through:

* `ControlLoop.call` (main loop → control loop, awaited): ``await call(fn, *args)`` runs
  ``fn(*args)`` (a coroutine function's result is awaited) on the control loop;
* `ControlLoop.call_blocking`: the same from a thread that is not running the control loop
  and may block (tests, tools; the control loop never waits for the main loop, so this
  cannot deadlock);
* `ControlLoop.post` / `post_to`: a callback queued with ``call_soon_threadsafe`` (FIFO per
  target loop, so events keep their order).

**Precedence.** With the GIL the control thread still shares one interpreter with ingest: while
both run Python they take turns of a switch interval, so a pick's ~0.5 ms of Python took twice
that and more under load. A main loop made by `new_main_loop` (``floorhand run``'s) therefore
gives the control loop precedence (`Precedence`, `PRECEDENCE`): while a control loop runs
callbacks (from the moment its selector returns until it next waits), the main loop pauses
before its next iteration, at most ``max_pause_s`` per such burst (``[process]
control_precedence_ms``), then goes on regardless. Nothing is lost by the pause: the broker and
the socket buffers hold what arrives meanwhile.

**Commands first.** On the control loop itself a pick's command goes before work already
queued: `ControlLoop.call_first` puts a submission at the head of the loop's ready queue (not
behind a burst of earlier orders' completions: 20–50 callbacks, 2–4 ms, when a group of scale
confirmations arrives), and `run_next` does the same for the task that executes a new order, so
the order's first Modbus write follows its commit directly.

**Real-time priority.** ``ControlLoop(realtime_priority=N)`` (``[process]
control_realtime_priority``) runs the loop's thread under ``SCHED_FIFO`` at priority N: the
kernel runs it the moment it is runnable instead of after a time slice of whatever else runs
(ingest, the broker, the PLC simulators on a small machine). ``SCHED_RESET_ON_FORK``: a thread
it starts runs with normal scheduling. Refused without the right (``RLIMIT_RTPRIO``, e.g.
systemd's ``LimitRTPRIO=``, or root): the loop runs with normal scheduling and says why
(`ControlLoop.realtime_refused`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import inspect
import logging
import os
import selectors
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, TypeVar

log = logging.getLogger("floorhand.control")

__all__ = [
    "PRECEDENCE",
    "ControlLoop",
    "ControlTask",
    "Precedence",
    "new_main_loop",
    "run_next",
]

T = TypeVar("T")


class Precedence:
    """The control loops' work before the main loop's (module doc): the control loops' selectors
    report `busy` / `idle`; a main loop's selector calls `wait_turn` after each select."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._busy = 0
        self._busy_since = 0.0
        self.max_pause_s = 0.0
        """The longest the main loop pauses for one burst of control-loop work (0: never)."""
        self.pauses = 0
        """Main-loop iterations that paused (waited for a control loop)."""
        self.paused_s = 0.0
        """Time the main loop spent paused, in total (s)."""
        self.waiting = False
        """Whether the main loop is paused now (tests watch it)."""

    def set_max_pause(self, seconds: float) -> None:
        self.max_pause_s = max(0.0, seconds)

    @property
    def busy_loops(self) -> int:
        """Control loops running callbacks now."""
        return self._busy

    def busy(self) -> None:
        """A control loop's selector returned: it runs callbacks from now on."""
        with self._lock:
            if not self._busy:
                self._busy_since = time.monotonic()
                self._idle.clear()
            self._busy += 1

    def idle(self) -> None:
        """A control loop is about to wait (nothing left to run)."""
        with self._lock:
            self._busy = max(0, self._busy - 1)
            if not self._busy:
                self._idle.set()

    def wait_turn(self) -> None:
        """On the main loop's thread, between two iterations: while a control loop runs
        callbacks, wait until it waits again, at most until ``max_pause_s`` after its burst
        began."""
        if self._idle.is_set() or self.max_pause_s <= 0.0:
            return
        now = time.monotonic()
        left = self._busy_since + self.max_pause_s - now
        if left <= 0.0:
            return
        self.waiting = True
        try:
            self._idle.wait(left)
        finally:
            self.waiting = False
        self.pauses += 1
        self.paused_s += time.monotonic() - now


PRECEDENCE: Final = Precedence()
"""The process's: every control loop reports to it, every `new_main_loop` loop waits on it."""


class _ControlSelector(selectors.DefaultSelector):
    """A control loop's selector: idle while it may block, busy from its return on."""

    def __init__(self, precedence: Precedence) -> None:
        super().__init__()
        self._precedence = precedence
        self._busy = False

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout != 0 and self._busy:  # nothing ready to run: the loop may block
            self._busy = False
            self._precedence.idle()
        try:
            return super().select(timeout)
        finally:
            if not self._busy:
                self._busy = True
                self._precedence.busy()

    def close(self) -> None:
        if self._busy:
            self._busy = False
            self._precedence.idle()
        super().close()


class _MainSelector(selectors.DefaultSelector):
    """A main loop's selector: after each select, the control loops' work goes first."""

    def __init__(self, precedence: Precedence) -> None:
        super().__init__()
        self._precedence = precedence

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(timeout)
        self._precedence.wait_turn()
        return ready


def new_main_loop() -> asyncio.AbstractEventLoop:
    """A new event loop for the runtime's main (home) thread that gives the control loops
    precedence (module doc). ``floorhand run`` and the benchmarks run the runtime on one; on
    any other loop the runtime works the same, without the precedence."""
    return asyncio.SelectorEventLoop(_MainSelector(PRECEDENCE))


class _ControlEventLoop(asyncio.SelectorEventLoop):
    """The control loop's event loop: a `SelectorEventLoop` (on a `_ControlSelector`) that
    can put work at the head of its ready queue (module doc, "Commands first"). Uses the
    queue of CPython's ``BaseEventLoop`` (``_ready``, a deque of handles run first-in,
    first-out); on an interpreter where a task's step cannot be found there, `run_next` leaves
    the order as it was (first-in, first-out)."""

    _SCAN: Final = 8
    """How far from the tail `run_next` looks for the task's step (it was just queued)."""

    def run_next(self, task: asyncio.Task[Any]) -> bool:
        """Move ``task``'s queued step to the head of the ready queue (from this loop's
        thread, right after creating the task); whether it was found.

        Other threads append to the queue meanwhile (``call_soon_threadsafe``): no iterator
        over it (one fails with "deque mutated during iteration" when they do), only single
        operations, each atomic under the interpreter lock — an index from the tail (the step
        only moves further from it as others append) and ``remove`` by identity. Whatever
        happens, the task runs: at worst in its first-in, first-out place."""
        ready: collections.deque[asyncio.Handle] = self._ready  # type: ignore[attr-defined]
        for back in range(1, self._SCAN + 1):
            try:
                handle = ready[-back]
            except IndexError:  # fewer queued than that (the loop's thread took some)
                return False
            if getattr(handle._callback, "__self__", None) is task:  # type: ignore[attr-defined]
                try:
                    ready.remove(handle)
                except ValueError:  # already taken off (not by us: cannot happen, but safe)
                    return False
                ready.appendleft(handle)
                return True
        return False

    def call_first_threadsafe(self, callback: Callable[..., object], *args: Any) -> None:
        """`call_soon_threadsafe` at the head of the queue: ``callback`` runs before every
        callback queued so far (from any thread)."""
        self._check_closed()  # type: ignore[attr-defined]
        self._ready.appendleft(asyncio.Handle(callback, args, self))  # type: ignore[attr-defined]
        self._write_to_self()  # type: ignore[attr-defined]


def _copy_outcome(task: asyncio.Task[T], future: concurrent.futures.Future[T]) -> None:
    """A finished control-loop task's outcome, to the future another thread waits on."""
    if task.cancelled():
        future.cancel()
    if not future.set_running_or_notify_cancel():  # cancelled (by either side)
        return
    exc = task.exception()
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(task.result())


def run_next(task: asyncio.Task[Any]) -> None:
    """On the control loop: ``task``'s first step runs before the callbacks queued before it
    (module doc, "Commands first"). On any other loop: nothing (first-in, first-out)."""
    loop = task.get_loop()
    if isinstance(loop, _ControlEventLoop):
        loop.run_next(task)


class ControlTask:
    """A task running on the control loop, seen from another thread: ``cancel()`` is
    thread-safe, ``wait()`` awaits its end from any loop (bounded), ``future`` is its
    outcome."""

    def __init__(self, loop: asyncio.AbstractEventLoop, future: concurrent.futures.Future[Any]):
        self._loop = loop
        self.future = future
        self._task: asyncio.Task[Any] | None = None

    def cancel(self) -> None:
        """Cancel the task (from any thread)."""
        task = self._task
        if task is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(task.cancel)

    def done(self) -> bool:
        return self.future.done()

    def _observe(self) -> asyncio.Future[Any]:
        """A future of the caller's loop that copies the task's outcome. Unlike
        ``asyncio.wrap_future``, cancelling it (a waiter being cancelled) leaves the task
        alone: only `cancel` stops it."""
        loop = asyncio.get_running_loop()
        mirror: asyncio.Future[Any] = loop.create_future()

        def copy() -> None:
            if mirror.done():
                return
            source = self.future
            if source.cancelled():
                mirror.cancel()
            elif (exc := source.exception()) is not None:
                mirror.set_exception(exc)
            else:
                mirror.set_result(source.result())

        def on_done(_: concurrent.futures.Future[Any]) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(copy)

        self.future.add_done_callback(on_done)
        return mirror

    async def wait(self, timeout_s: float) -> bool:
        """Wait (on the caller's loop) until the task has ended, at most ``timeout_s``;
        whether it ended. Cancelling the waiter does not cancel the task."""
        if self.future.done():
            return True
        await asyncio.wait({self._observe()}, timeout=max(0.0, timeout_s))
        return self.future.done()

    async def result(self) -> Any:
        """The task's result (or its exception), awaited on the caller's loop; cancelling
        the waiter does not cancel the task."""
        return await self._observe()


class ControlLoop:
    """An event loop in a daemon thread (module doc). ``start()`` it, ``close()`` it."""

    def __init__(self, name: str = "control", *, realtime_priority: int = 0) -> None:
        self.name = name
        self.realtime_priority = realtime_priority
        """``SCHED_FIFO`` priority asked for the loop's thread (module doc); 0: normal."""
        self.realtime_granted = 0
        """The ``SCHED_FIFO`` priority the thread runs at (0: normal scheduling)."""
        self.realtime_refused: str | None = None
        """Why the priority asked for was refused, if it was."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Start the loop's thread; returns once the loop runs. Idempotent."""
        if self._thread is not None:
            return
        self._ready.clear()
        thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        self._thread = thread
        thread.start()
        self._ready.wait()

    def _main(self) -> None:
        self._set_realtime()
        loop = _ControlEventLoop(_ControlSelector(PRECEDENCE))
        self._loop = loop
        asyncio.set_event_loop(loop)
        loop.call_soon(self._ready.set)
        try:
            loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                for task in asyncio.all_tasks(loop):
                    task.cancel()
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _set_realtime(self) -> None:
        """On the loop's thread, before the loop runs: ``SCHED_FIFO`` at the priority asked
        for (module doc), else normal scheduling and `realtime_refused` says why."""
        self.realtime_granted, self.realtime_refused = 0, None
        if self.realtime_priority <= 0:
            return
        policy = getattr(os, "SCHED_FIFO", None)
        if policy is None or not hasattr(os, "sched_setscheduler"):
            self.realtime_refused = "SCHED_FIFO is not available on this system"
            return
        try:
            os.sched_setscheduler(
                0, policy | os.SCHED_RESET_ON_FORK, os.sched_param(self.realtime_priority)
            )
        except OSError as exc:
            self.realtime_refused = exc.strerror or str(exc)
        else:
            self.realtime_granted = self.realtime_priority

    def close(self, timeout_s: float = 1.0) -> bool:
        """Stop the loop and join its thread, at most ``timeout_s``; whether it ended (a
        thread stuck in C code is left behind: it is a daemon)."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return True
        if not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        if thread.is_alive():
            log.error("control loop thread still running %.1f s after its stop", timeout_s)
            return False
        self._thread = None
        self._loop = None
        return True

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the control loop is not running")
        return self._loop

    @property
    def running(self) -> bool:
        loop = self._loop
        return loop is not None and loop.is_running()

    def in_loop(self) -> bool:
        """Whether the caller runs on the control loop's thread."""
        return self._thread is not None and threading.current_thread() is self._thread

    # -- crossing ----------------------------------------------------------------------------
    def spawn(self, coro: Coroutine[Any, Any, T], name: str) -> ControlTask:
        """Run ``coro`` as a task of the control loop (from any thread)."""
        loop = self.loop
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        handle = ControlTask(loop, future)

        def create() -> None:
            task = loop.create_task(coro, name=name)
            handle._task = task
            task.add_done_callback(lambda t: _copy_outcome(t, future))

        loop.call_soon_threadsafe(create)
        return handle

    def _future(
        self, fn: Callable[..., Any], args: tuple[Any, ...]
    ) -> concurrent.futures.Future[Any]:
        async def run() -> Any:
            out = fn(*args)
            if inspect.isawaitable(out):
                out = await out
            return out

        return asyncio.run_coroutine_threadsafe(run(), self.loop)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` (a plain function) on the control loop, awaited from the caller's
        loop; exceptions propagate. On the control loop itself (or without it running):
        at once."""
        if self.in_loop() or not self.running:
            return fn(*args)
        out: T = await asyncio.wrap_future(self._future(fn, args))
        return out

    async def call_async(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``await fn(*args)`` on the control loop, awaited from the caller's loop."""
        if self.in_loop() or not self.running:
            return await fn(*args)
        out: T = await asyncio.wrap_future(self._future(fn, args))
        return out

    async def call_first(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        """`call_async` at the head of the control loop's queue: ``fn(*args)`` starts before
        the callbacks queued so far (module doc, "Commands first"); for a pick's submission.
        Cancelling the caller cancels it there."""
        if self.in_loop() or not self.running:
            return await fn(*args)
        loop = self.loop
        assert isinstance(loop, _ControlEventLoop)
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def start() -> None:
            if future.cancelled():  # the caller gave up before its turn
                return
            task: asyncio.Task[T] = loop.create_task(fn(*args))
            task.add_done_callback(lambda t: _copy_outcome(t, future))

            def caller_done(f: concurrent.futures.Future[T]) -> None:
                if f.cancelled():
                    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                        loop.call_soon_threadsafe(task.cancel)

            future.add_done_callback(caller_done)
            run_next(task)  # last: the answer is wired up whatever happens here

        loop.call_first_threadsafe(start)
        return await asyncio.wrap_future(future)

    def call_blocking(self, fn: Callable[..., T], *args: Any, timeout_s: float = 10.0) -> T:
        """``fn(*args)`` (a plain function) on the control loop, blocking the caller until
        it returned; at once when called on the control loop or when it is not running."""
        if self.in_loop() or not self.running:
            return fn(*args)
        out: T = self._future(fn, args).result(timeout_s)
        return out

    def post(self, fn: Callable[..., object], *args: Any) -> None:
        """Queue ``fn(*args)`` on the control loop (FIFO; at once if not running)."""
        if self.in_loop() or not self.running:
            fn(*args)
            return
        self.loop.call_soon_threadsafe(fn, *args)

    @staticmethod
    def post_to(
        loop: asyncio.AbstractEventLoop | None, fn: Callable[..., object], *args: Any
    ) -> None:
        """Queue ``fn(*args)`` on ``loop`` (FIFO): at once when the caller runs on it, or
        when it is None or closed (nothing else could run it)."""
        if loop is None or loop.is_closed():
            fn(*args)
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            fn(*args)
        else:
            loop.call_soon_threadsafe(fn, *args)
