"""`LinkSupervisor`: the one supervisor loop of every device link (MQTT, Modbus).

A link subclasses it and supplies one session: `_open_session` (connect and make the
connection usable), `_serve_session` (until the connection ends; returns why) and
`_close_session` (close what is left; called after every attempt, also when cancelled). The
supervisor owns everything around it, the same for every link:

* the loop: connect → serve → back off, until cancelled, `disconnect`-ed or a fatal error
  (the link's ``_fatal_errors``: raised from `run` without reconnecting);
* the state (`watch`, a `StateWatch`: CONNECTING → UP → DOWN) and the times around it
  (`since`, `retry_delay_s`, `last_error`, `last_down_reason`);
* the one connection counter, `connection_number`, raised at every connect attempt, so a
  consumer can tell whether something it holds belongs to the current connection;
* the reconnect schedule, one `Backoff` per `run`: a connection resets it only after it
  stayed up the link's ``reset_after_s`` (``session_ended``); a failed attempt or a peer
  that accepts and drops us at once gets the next, longer delay;
* logging once per state change and per reason, never per retry: "up" / "back after",
  "down after", and while down each distinct reason of failed attempts once per outage
  ("cannot connect to"), the rest at DEBUG;
* the session's tasks (timers, heartbeats, up hooks): `SessionTasks`, in a TaskGroup per
  session, all ended before the next attempt (and before `run` returns), so a stopped link
  leaves no task or timer behind;
* cancellation always ends `run`: a cancellation that a library's ``asyncio.wait_for``
  swallowed (Python 3.11 drops one that arrives in the same loop step as the result) is
  raised again at the next step of the loop (`raise_lost_cancel`);
* use as an async context manager: ``async with link:`` runs `run` in a task and cancels
  it on exit (cancellation is the links' shutdown), re-raising a fatal error of `run`.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, ClassVar, Self

from devices.errors import DeviceError, DeviceUnavailable
from devices.link.backoff import Backoff
from devices.link.state import LinkState, StateWatch

__all__ = [
    "RETRYABLE",
    "LinkSupervisor",
    "SessionTasks",
    "cancel_requests",
    "describe_error",
    "raise_lost_cancel",
]

RETRYABLE: tuple[type[Exception], ...] = (DeviceError, OSError, TimeoutError)
"""Errors of a connect attempt that are retried with the backoff (unless the link lists
them among its fatal errors)."""

_MAX_REASONS_LOGGED = 8  # distinct failure reasons logged per outage; more go to DEBUG


def cancel_requests() -> int:
    """Cancellation requests pending on the current task (``Task.cancelling()``)."""
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0


def raise_lost_cancel(before: int) -> None:
    """Raise `asyncio.CancelledError` if the current task was cancelled since ``before``
    (from `cancel_requests`) was taken and the cancellation got lost on the way."""
    if cancel_requests() > before:
        raise asyncio.CancelledError


def describe_error(exc: BaseException | None) -> str:
    """An error as one line for a log or a health field: our own errors by their text,
    others with their type name."""
    if exc is None:
        return "unknown"
    text = str(exc)
    if isinstance(exc, DeviceError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class SessionTasks:
    """The tasks of one session (keepalive, linger, heartbeat, up hooks), in the session's
    TaskGroup: the supervisor cancels what is left when the session closes and goes on only
    once every one has ended. A task that raises is logged and ends alone; it never takes
    the session down."""

    __slots__ = ("_group", "_log", "_tasks")

    def __init__(self, group: asyncio.TaskGroup, log: logging.Logger) -> None:
        self._group = group
        self._log = log
        self._tasks: list[asyncio.Task[None]] = []

    def spawn(
        self, name: str, func: Callable[..., Awaitable[object]], *args: Any
    ) -> asyncio.Task[None]:
        """Run ``await func(*args)`` as the task ``name`` of this session."""
        self._tasks = [t for t in self._tasks if not t.done()]
        task = self._group.create_task(self._guard(name, func, args), name=name)
        self._tasks.append(task)
        return task

    async def _guard(
        self, name: str, func: Callable[..., Awaitable[object]], args: tuple[Any, ...]
    ) -> None:
        # The coroutine is made here, inside the task: a task cancelled before it starts
        # then leaves no coroutine that was never awaited.
        try:
            await func(*args)
        except Exception:
            self._log.exception("%s failed", name)

    async def stop(self) -> None:
        """Cancel the tasks still running and wait until they have ended."""
        pending = [t for t in self._tasks if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)


class LinkSupervisor(abc.ABC):
    """Connect → serve → back off for one device link; see the module docstring.

    Subclasses implement the session (`_open_session`, `_serve_session`, `_close_session`,
    `_stop_session`) and may refine the hooks (`_describe_failure`, `_up_note`, `_on_up`,
    `_on_down`). Only the supervisor sets the state.
    """

    _fatal_errors: ClassVar[tuple[type[Exception], ...]] = ()
    """Errors that end `run` (raised from it) instead of being retried."""

    def __init__(
        self,
        *,
        name: str,
        endpoint: str,
        logger: logging.Logger,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._endpoint = endpoint
        self._log = logger
        self._clock = clock  # for up/down times; injected by tests
        self.watch = StateWatch(LinkState.DOWN)
        self.retry_delay_s = 0.0
        """The delay waited before the current (or last) connect attempt; 0 for the first."""
        self.last_error = ""
        """Why the link last went down or failed to connect, not counting our own stops
        ("" until it did)."""
        self.last_down_reason: str | None = None
        """Why the link last went down or could not connect, our own stops included (None
        until the first attempt ended; kept while it is UP again)."""
        self._connection_number = 0
        self._attempts_before_up = 0  # failed attempts before the current connection
        self._running = False
        self._closing = False
        self._closing_event = asyncio.Event()
        self._ever_up = False
        self._up_since = 0.0
        self._down_since = clock()
        self._reasons_logged: set[str] = set()  # failure reasons logged in this outage
        self._run_task: asyncio.Task[None] | None = None  # while used with `async with`

    # -- what a link supplies -------------------------------------------------------------

    @abc.abstractmethod
    def _reconnect_backoff(self) -> Backoff:
        """A fresh reconnect schedule (one per `run`)."""

    @abc.abstractmethod
    async def _open_session(self, tasks: SessionTasks) -> None:
        """Connect and make the connection usable; raise if it is not (a `RETRYABLE` error
        is retried, a fatal one ends `run`)."""

    @abc.abstractmethod
    async def _serve_session(self, tasks: SessionTasks) -> str:
        """Serve the open connection until it ends; return why. A fatal error ends `run`."""

    @abc.abstractmethod
    async def _close_session(self, reason: str) -> None:
        """Close what is left of the session's connection (``reason``: why, if it is still
        open) and wait until it is closed. Called after every attempt, even a failed or
        cancelled one."""

    @abc.abstractmethod
    async def _stop_session(self) -> None:
        """`disconnect` asks the current connection, if any, to end."""

    def _describe_failure(self, exc: Exception) -> tuple[str, int]:
        """A failed attempt's reason and the level it is logged at (once per outage)."""
        return describe_error(exc), logging.WARNING

    def _up_note(self, first: bool) -> tuple[int, str]:
        """The level and the text appended to the "up (endpoint…)" line (``first``) or to
        the "back after N s…" line."""
        return logging.INFO, ""

    def _on_up(self) -> None:
        """Called when the link enters UP, before the watch's listeners."""
        return None

    def _on_down(self, reason: str, was_up: bool) -> None:
        """Called after the link entered DOWN (from UP when ``was_up``)."""
        return None

    # -- public surface -------------------------------------------------------------------

    @property
    def state(self) -> LinkState:
        """The link state (same as ``watch.state``)."""
        return self.watch.state

    @property
    def since(self) -> float:
        """The clock's time (``time.monotonic()``) when the link came up (while UP), else when
        it last went down (the last UP → not-UP change; when `run` started if it was never
        up). Unlike ``watch.since`` it does not move with every failed retry."""
        return self._up_since if self.watch.state is LinkState.UP else self._down_since

    @property
    def connection_number(self) -> int:
        """Number of the current (or last) connection attempt; 0 before the first. Raised at
        every attempt, so anything tied to one connection (an MQTT packet id, a PLC's
        mailbox) can be checked against it after an ``await``."""
        return self._connection_number

    async def wait_up(self, timeout_s: float) -> None:
        """Return when the link is UP; raise `DeviceUnavailable` after ``timeout_s``."""
        try:
            await self.watch.wait_for(LinkState.UP, timeout_s)
        except TimeoutError:
            raise DeviceUnavailable(f"{self.name} not up after {timeout_s:g} s") from None

    async def disconnect(self) -> None:
        """End the current connection and make `run` return (no reconnect)."""
        self._closing = True
        self._closing_event.set()
        await self._stop_session()

    async def __aenter__(self) -> Self:
        """Start `run` in a task of its own."""
        if self._run_task is not None:
            raise RuntimeError(f"{self.name}: already entered")
        self._run_task = asyncio.get_running_loop().create_task(self.run(), name=self.name)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Cancel `run` and wait for it (a second cancellation of ours is passed on, which
        cuts a polite close short); re-raise the error `run` ended with, if any."""
        task, self._run_task = self._run_task, None
        if task is None:
            return
        task.cancel()
        cancelled = False
        while not task.done():
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError:
                cancelled = True
                task.cancel()
        if cancelled:
            raise asyncio.CancelledError
        if exc_type is None and not task.cancelled():
            error = task.exception()
            if error is not None:
                raise error

    async def run(self) -> None:
        """Connect, serve and reconnect until cancelled, `disconnect`-ed or fatal; re-raises
        `asyncio.CancelledError` and the link's fatal errors."""
        if self._running:
            raise RuntimeError(f"{self.name}: run() is already running")
        self._running = True
        self._closing = False
        self._closing_event.clear()
        if not self._ever_up:
            self._down_since = self._clock()
        backoff = self._reconnect_backoff()
        cancels = cancel_requests()
        failed_attempts = 0  # since the last connection that came up
        try:
            while not self._closing:
                raise_lost_cancel(cancels)
                self._connection_number += 1
                self.watch.set(LinkState.CONNECTING)
                up_s, reason, failure_level = await self._session(cancels, failed_attempts)
                if up_s is None:
                    failed_attempts += 1
                else:
                    failed_attempts = 0
                    backoff.session_ended(up_s)
                self._enter_down(reason, expected=self._closing, failure_level=failure_level)
                if self._closing:
                    break
                self.retry_delay_s = backoff.next_delay()
                await self._sleep_unless_closing(self.retry_delay_s)
        finally:
            if self.watch.state is not LinkState.DOWN:
                self._enter_down("link stopped", expected=True)
            self._running = False

    # -- the loop's parts -----------------------------------------------------------------

    async def _session(
        self, cancels: int, failed_attempts: int
    ) -> tuple[float | None, str, int | None]:
        """One connect attempt and, if it came up, its life: how long it was up (None if it
        never was), why it ended, and for a failed attempt the level to log it at."""
        reason = "link stopped"
        up_s: float | None = None
        failure_level: int | None = None
        error: Exception | None = None
        async with asyncio.TaskGroup() as group:
            tasks = SessionTasks(group, self._log)
            try:
                try:
                    await self._open_session(tasks)
                except self._fatal_errors:
                    raise
                except RETRYABLE as exc:
                    raise_lost_cancel(cancels)
                    reason, failure_level = self._describe_failure(exc)
                else:
                    self._attempts_before_up = failed_attempts
                    self._enter_up()
                    try:
                        reason = await self._serve_session(tasks)
                    except self._fatal_errors:
                        raise
                    except RETRYABLE as exc:
                        reason = self._describe_failure(exc)[0]
                    up_s = self._clock() - self._up_since
            except Exception as exc:  # raised below, once the session's tasks have ended
                error = exc
                if isinstance(exc, self._fatal_errors):
                    self._enter_down(str(exc), fatal=True)
                    self._log.error("%s stopped: %s", self.name, exc)
            finally:
                try:
                    await self._close_session(reason)
                finally:
                    await tasks.stop()
        if error is not None:
            raise error
        return up_s, reason, failure_level

    async def _sleep_unless_closing(self, delay_s: float) -> None:
        try:
            async with asyncio.timeout(delay_s):
                await self._closing_event.wait()
        except TimeoutError:
            pass

    def _enter_up(self) -> None:
        now = self._clock()
        level, note = self._up_note(not self._ever_up)
        if self._ever_up:
            self._log.log(level, "%s back after %.1f s%s", self.name, now - self._down_since, note)
        else:
            self._log.log(level, "%s up (%s%s)", self.name, self._endpoint, note)
        self._ever_up = True
        self._reasons_logged.clear()
        self._up_since = now
        self._on_up()
        self.watch.set(LinkState.UP, now)

    def _enter_down(
        self,
        reason: str,
        *,
        expected: bool = False,
        fatal: bool = False,
        failure_level: int | None = None,
    ) -> None:
        """Enter DOWN and log why: ``expected`` for our own stop, ``fatal`` when `run` is
        about to raise (that error is logged apart), ``failure_level`` for a failed
        attempt (logged once per reason and outage)."""
        now = self._clock()
        was_up = self.watch.state is LinkState.UP
        self.last_down_reason = reason
        if not expected:
            self.last_error = reason
        if was_up:
            self._down_since = now
            self._log.log(
                logging.INFO if expected else logging.WARNING,
                "%s down after %.1f s: %s",
                self.name,
                now - self._up_since,
                reason,
            )
        elif expected or fatal or failure_level is None:
            self._log.debug("%s stopped while %s", self.name, self.watch.state.value)
        elif reason in self._reasons_logged or len(self._reasons_logged) >= _MAX_REASONS_LOGGED:
            self._log.debug("%s connect attempt failed: %s", self.name, reason)
        else:
            self._reasons_logged.add(reason)
            self._log.log(
                failure_level,
                "%s cannot connect to %s: %s (retrying)",
                self.name,
                self._endpoint,
                reason,
            )
        self.watch.set(LinkState.DOWN, now)
        self._on_down(reason, was_up)
