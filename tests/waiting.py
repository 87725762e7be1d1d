"""The one way tests wait for state: check a cheap probe until a condition holds, with a bound.

The probe is checked at once, then again after each wake-up: the given event being set (when
the code under test signals changes) or else a short poll interval. On time-out the error names
what was awaited and the last value observed, so a failure says how far the state got.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")

_NOT_OBSERVED = "(never observed)"
_SHOWN_CHARS = 600


def _timed_out(what: str, timeout_s: float, last: object, context: Callable[[], str] | None) -> str:
    shown = repr(last)
    if len(shown) > _SHOWN_CHARS:
        shown = f"{shown[:_SHOWN_CHARS]}… ({len(shown)} characters)"
    extra = f"\n{context()}" if context is not None else ""
    return f"timed out after {timeout_s} s waiting for {what}; last observed: {shown}{extra}"


@overload
async def wait_for_condition(
    probe: Callable[[], Awaitable[T]],
    timeout_s: float,
    *,
    what: str,
    until: Callable[[T], object] = ...,
    interval_s: float = ...,
    wake: asyncio.Event | None = ...,
    retry_on: tuple[type[Exception], ...] = ...,
    context: Callable[[], str] | None = ...,
) -> T: ...


@overload
async def wait_for_condition(
    probe: Callable[[], T],
    timeout_s: float,
    *,
    what: str,
    until: Callable[[T], object] = ...,
    interval_s: float = ...,
    wake: asyncio.Event | None = ...,
    retry_on: tuple[type[Exception], ...] = ...,
    context: Callable[[], str] | None = ...,
) -> T: ...


async def wait_for_condition(
    probe: Callable[[], Any],
    timeout_s: float,
    *,
    what: str,
    until: Callable[[Any], object] = bool,
    interval_s: float = 0.01,
    wake: asyncio.Event | None = None,
    retry_on: tuple[type[Exception], ...] = (),
    context: Callable[[], str] | None = None,
) -> Any:
    """Return the first value of ``probe()`` (awaited if it is awaitable) that satisfies
    ``until`` (truthiness by default).

    ``wake``: an event the code under test sets on every change; the probe is checked after
    each set instead of every ``interval_s`` (the event is cleared before each check).
    ``retry_on``: exceptions of the probe that mean "not yet" (e.g. a server still starting);
    any other exception propagates. ``context``: extra text for the time-out message (a
    process's log tail). Raises ``TimeoutError`` naming ``what`` and the last observed value.
    """
    deadline = time.monotonic() + timeout_s
    last: object = _NOT_OBSERVED
    while True:
        if wake is not None:
            wake.clear()
        try:
            result = probe()
            value = (await result) if inspect.isawaitable(result) else result
        except retry_on as exc:
            last = exc
        else:
            last = value
            if until(value):
                return value
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            raise TimeoutError(_timed_out(what, timeout_s, last, context))
        if wake is None:
            await asyncio.sleep(min(interval_s, remaining_s))  # the poll interval, bounded
        else:
            try:
                async with asyncio.timeout(remaining_s):
                    await wake.wait()
            except TimeoutError:
                pass  # one last check above, then the time-out error


def wait_for_condition_sync(
    probe: Callable[[], T],
    timeout_s: float,
    *,
    what: str,
    until: Callable[[T], object] = bool,
    interval_s: float = 0.02,
    retry_on: tuple[type[Exception], ...] = (),
    context: Callable[[], str] | None = None,
) -> T:
    """``wait_for_condition`` for code outside an event loop (a thread, a sync fixture):
    polls ``probe`` every ``interval_s``; same arguments and errors."""
    deadline = time.monotonic() + timeout_s
    last: object = _NOT_OBSERVED
    while True:
        try:
            value = probe()
        except retry_on as exc:
            last = exc
        else:
            last = value
            if until(value):
                return value
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            raise TimeoutError(_timed_out(what, timeout_s, last, context))
        time.sleep(min(interval_s, remaining_s))  # the poll interval, bounded
