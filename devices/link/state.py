"""Link state as an explicit enum that other components can watch."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable

_log = logging.getLogger(__name__)

StateListener = Callable[["LinkState", "LinkState"], None]


class LinkState(enum.Enum):
    """Connection state of a device link."""

    CONNECTING = "connecting"
    UP = "up"
    DOWN = "down"


class StateWatch:
    """The current state of one link, when it was entered, and ways to follow it.

    Only the link that owns the watch calls `set`. Listeners are called synchronously with
    ``(old, new)`` on every change; a listener that raises is logged and otherwise ignored.
    """

    __slots__ = ("_listeners", "_since", "_state", "_waiters", "_waiters_lock")

    def __init__(self, initial: LinkState = LinkState.DOWN) -> None:
        self._state = initial
        self._since = time.monotonic()
        self._listeners: list[StateListener] = []
        self._waiters: list[tuple[LinkState, asyncio.Future[None]]] = []
        # A waiter may sit on another thread's event loop than the link's (control loop).
        self._waiters_lock = threading.Lock()

    @property
    def state(self) -> LinkState:
        """The current state."""
        return self._state

    @property
    def since(self) -> float:
        """``time.monotonic()`` when the current state was entered."""
        return self._since

    def add_listener(self, callback: StateListener) -> None:
        """Call ``callback(old, new)`` on every state change."""
        self._listeners.append(callback)

    def remove_listener(self, callback: StateListener) -> None:
        """Stop calling ``callback``; unknown callbacks are ignored."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(callback)

    def set(self, new: LinkState, now: float | None = None) -> None:
        """Enter ``new`` (no-op if already in it), then notify waiters and listeners."""
        old = self._state
        if new is old:
            return
        self._state = new
        self._since = time.monotonic() if now is None else now
        if self._waiters:
            with self._waiters_lock:
                keep: list[tuple[LinkState, asyncio.Future[None]]] = []
                for wanted, fut in self._waiters:
                    if fut.done():
                        continue
                    if wanted is new:
                        _resolve_soon(fut)
                    else:
                        keep.append((wanted, fut))
                self._waiters = keep
        for callback in tuple(self._listeners):
            try:
                callback(old, new)
            except Exception:
                _log.exception("link state listener %r failed", callback)

    async def wait_for(self, state: LinkState, timeout_s: float) -> None:
        """Return once the link is in ``state``; raise `TimeoutError` after ``timeout_s``."""
        if self._state is state:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._waiters_lock:
            self._waiters.append((state, fut))
        if self._state is state:  # entered (on another thread) before the waiter was listed
            _resolve(fut)
        try:
            async with asyncio.timeout(timeout_s):
                await fut
        finally:
            if not fut.done():
                fut.cancel()
                with self._waiters_lock, contextlib.suppress(ValueError):
                    self._waiters.remove((state, fut))


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _resolve_soon(fut: asyncio.Future[None]) -> None:
    """Resolve a waiter's future: at once on its own loop, else through that loop (a link
    running on another thread's loop than its waiter: docs/architecture.md, "Two event
    loops")."""
    loop = fut.get_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        fut.set_result(None)
    elif not loop.is_closed():
        loop.call_soon_threadsafe(_resolve, fut)
