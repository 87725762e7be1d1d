"""Which event loop answers a request: the HTTP loop, or the home loop that owns the state.

``floorhand run`` serves HTTP from an event loop of its own in a thread of its own (named
``http``, `serve_apart`), so that receiving, parsing and answering a request waits behind no
ingest group; the runtime (ingest, alerts, supervision, the bus, the journal's main connection,
the live feed) stays on the **home loop**, the main thread's (docs/architecture.md, "Three
event loops"). `LoopRouter`, an ASGI middleware just inside the security middleware, sends
each request to the loop that owns what it touches:

* routes whose route class is marked `on_http_loop` (the pick and order routes: they reach the
  order desk only through `controller.control.ControlLoop` crossings, which are thread-safe)
  run on the HTTP loop, as long as ``http_loop_ok()`` holds (the control loop runs; before and
  after, those crossings would run the desk in the caller's thread);
* a request no route matches (404, 405) is answered on the HTTP loop: it touches no state;
* every other route, and the lifespan (which starts and stops the runtime), runs on the home
  loop: the rest of the app (exception middleware, router, route) is run there with
  ``asyncio.run_coroutine_threadsafe``, an HTTP request's body read first on the HTTP loop (so
  the body limit still applies where it did), and every ``receive`` / ``send`` of the server
  carried back to the HTTP loop, where the server's connection lives.

The middleware outside (`controller.api.limits.SecurityMiddleware`: body limit, rate limit
buckets, fail-closed check, accounting) therefore always runs on the HTTP loop, so its mutable
state has one thread. Without a home loop set (``app.state.home_loop``, tests that run uvicorn
or an ASGI transport on their own loop) or when the home loop is the running one, everything is
called straight through: one loop, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controller.api.auth import effective_routes

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

log = logging.getLogger("floorhand.api.loops")

__all__ = [
    "HTTP_LOOP_ATTR",
    "LoopRouter",
    "LoopWatch",
    "cancel_leftovers",
    "on_home",
    "on_http_loop",
    "serve_apart",
    "set_home_loop",
]

HTTP_LOOP_ATTR = "__floorhand_http_loop__"
LEFTOVER_TASKS_S = 0.3
"""Bound on a loop's tasks still running once the server returned (cancelled, then
abandoned)."""

R = TypeVar("R", bound=type)
T = TypeVar("T")


def on_http_loop(route_class: R) -> R:
    """Mark a route class whose handlers may run on the HTTP loop: they touch no home-loop
    state, and reach other loops' state only through thread-safe crossings."""
    setattr(route_class, HTTP_LOOP_ATTR, True)
    return route_class


async def on_home(app: FastAPI, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` (a plain function) on the app's home loop, awaited from the caller's
    loop: how a route on the HTTP loop touches the runtime's state (journal, bus). Straight
    through without a home loop or on it."""
    home: asyncio.AbstractEventLoop | None = getattr(app.state, "home_loop", None)
    if home is None or home is asyncio.get_running_loop():
        return fn(*args)

    async def call() -> T:
        return fn(*args)

    return await _await_on(home, call())


def set_home_loop(app: FastAPI, loop: asyncio.AbstractEventLoop | None) -> None:
    """The loop that owns the runtime: the lifespan and the unmarked routes run there."""
    app.state.home_loop = loop


class LoopWatch:
    """Whether a loop in another thread still runs its callbacks (the HTTP loop, for the
    systemd watchdog, which the main loop feeds): `ping` queues a callback on it, at most one
    at a time; `alive` says whether the one queued is answered or younger than ``stale_s``."""

    def __init__(self, name: str, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._monotonic = monotonic
        self._pending_since: float | None = None
        self._stale = False

    def bind(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Watch ``loop`` (None: nothing, and nothing waits)."""
        self.loop = loop
        self._pending_since = None

    def ping(self) -> None:
        """Queue the next callback (from any thread but the watched loop's)."""
        loop = self.loop
        if loop is None or loop.is_closed() or self._pending_since is not None:
            return
        self._pending_since = self._monotonic()
        with contextlib.suppress(RuntimeError):  # closed meanwhile
            loop.call_soon_threadsafe(self._answered)

    def _answered(self) -> None:
        self._pending_since = None

    def alive(self, stale_s: float) -> bool:
        """False once a queued callback has waited longer than ``stale_s`` (logged once per
        such stretch, and its end)."""
        since = self._pending_since
        waited_s = 0.0 if since is None else self._monotonic() - since
        alive = waited_s <= stale_s
        if alive == self._stale:
            self._stale = not alive
            if alive:
                log.warning("the %s loop runs again", self.name)
            else:
                log.error("the %s loop has run nothing for %.1f s", self.name, waited_s)
        return alive


def _marked(route: Any) -> bool:
    original = getattr(route, "original_route", route)
    return bool(getattr(type(original), HTTP_LOOP_ATTR, False))


class LoopRouter:
    """ASGI middleware: runs the rest of the app on the loop that owns a request's route
    (module doc). ``http_loop_ok`` says whether marked routes may run on the HTTP loop now."""

    def __init__(self, app: ASGIApp, *, http_loop_ok: Callable[[], bool] = lambda: True) -> None:
        self.app = app
        self.http_loop_ok = http_loop_ok
        self._routes: list[tuple[Any, bool]] = []
        self._size = -1

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        home: asyncio.AbstractEventLoop | None = getattr(scope["app"].state, "home_loop", None)
        if home is None or home is asyncio.get_running_loop() or self._stays(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "http":
            receive = await _read_body(receive)
        await _run_on(home, self.app, scope, receive, send)

    def _stays(self, scope: Scope) -> bool:
        """Whether the request is answered on the HTTP loop (lifespan: never)."""
        if scope["type"] not in ("http", "websocket"):
            return False
        for route, marked in self._table(scope["app"]):
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return marked and self.http_loop_ok()
        return True  # 404 / 405: nothing but the route table, which never changes

    def _table(self, app: Any) -> list[tuple[Any, bool]]:
        routes = app.router.routes
        if len(routes) != self._size:  # built once the app is complete (first request)
            self._routes = [(r, _marked(r)) for r in effective_routes(routes)]
            self._size = len(routes)
        return self._routes


async def _read_body(receive: Receive) -> Receive:
    """Read the request body here (the server's ``receive`` belongs to this loop); the
    returned ``receive`` replays it, then waits for the server's next message (disconnect)."""
    messages: list[Message] = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request" or not message.get("more_body", False):
            break
    messages.reverse()

    async def replay() -> Message:
        if messages:
            return messages.pop()
        return await receive()

    return replay


async def _run_on(
    loop: asyncio.AbstractEventLoop, app: ASGIApp, scope: Scope, receive: Receive, send: Send
) -> None:
    """``app(scope, receive, send)`` on ``loop``; its ``receive`` and ``send`` run back here.
    Exceptions propagate; cancelling the caller cancels the app's task."""
    here = asyncio.get_running_loop()

    async def receive_here() -> Message:
        return await _await_on(here, receive())

    async def send_here(message: Message) -> None:
        await _await_on(here, send(message))

    await _await_on(loop, app(scope, receive_here, send_here))


async def _await_on(loop: asyncio.AbstractEventLoop, awaitable: Awaitable[T]) -> T:
    """Run ``awaitable`` on ``loop`` and await its outcome on the caller's loop."""
    if loop is asyncio.get_running_loop():
        return await awaitable
    coro = awaitable if asyncio.iscoroutine(awaitable) else _coroutine(awaitable)
    try:
        future = asyncio.run_coroutine_threadsafe(coro, loop)
    except RuntimeError:  # the loop is closed: nothing will ever run it
        coro.close()
        raise
    out: T = await asyncio.wrap_future(future)
    return out


async def _coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable


async def serve_apart(
    server: uvicorn.Server,
    sockets: list[socket.socket] | None,
    app: FastAPI,
    *,
    watch: LoopWatch | None = None,
) -> None:
    """Serve ``app`` with ``server`` (on ``sockets``, else on its configured address) on a new
    event loop in a thread of its own (``http``);
    the calling loop becomes the app's home loop (the lifespan, so the runtime, runs on it).
    Returns once the server has stopped and its loop is closed; the server's own exceptions
    (uvicorn's ``SystemExit`` when the lifespan startup failed) are raised here. ``watch``
    watches the HTTP loop while it runs."""
    home = asyncio.get_running_loop()
    set_home_loop(app, home)
    done: asyncio.Future[None] = home.create_future()
    failure: list[BaseException] = []

    def finished() -> None:
        if not done.done():
            done.set_result(None)

    def run() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        if watch is not None:
            watch.bind(loop)
        try:
            loop.run_until_complete(server.serve(sockets=sockets))
        except BaseException as exc:  # handed to the home loop, raised there
            failure.append(exc)
        finally:
            try:
                # The lifespan's task ends one hop after the server returned (the home loop's
                # answer crosses back): let it, rather than cut it short (an error log).
                loop.run_until_complete(cancel_leftovers(LEFTOVER_TASKS_S, grace_s=0.5))
            finally:
                if watch is not None:
                    watch.bind(None)
                asyncio.set_event_loop(None)
                loop.close()
                with contextlib.suppress(RuntimeError):  # home loop closed: nobody waits
                    home.call_soon_threadsafe(finished)

    thread = threading.Thread(target=run, name="http", daemon=True)
    thread.start()
    try:
        await asyncio.shield(done)
    finally:
        if not done.done():  # the caller was cancelled: stop the server, then wait for it
            server.should_exit = True
            await asyncio.wait({done}, timeout=LEFTOVER_TASKS_S + 5.0)
        set_home_loop(app, None)
    if failure:
        raise failure[0]


async def cancel_leftovers(timeout_s: float, *, grace_s: float = 0.0) -> None:
    """Cancel this loop's other tasks (those still running ``grace_s`` from now), wait at
    most ``timeout_s``, abandon the rest."""
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    if tasks and grace_s > 0:
        await asyncio.wait(tasks, timeout=grace_s)
        tasks = [t for t in tasks if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=timeout_s)
    stuck = [t.get_name() for t in tasks if not t.done()]
    if stuck:
        log.error("abandoned %d task(s) that ignored cancellation: %s", len(stuck), stuck)
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout_s):
            await asyncio.get_running_loop().shutdown_asyncgens()
