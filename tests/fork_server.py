"""``floorhand run`` processes without the interpreter start: a fork server for tests that start
the controller many times (tests/integration/test_shutdown.py: 50 bounded stops; the kill -9,
restart and second-instance tests through the session's server, ``controller_forks`` in
tests/conftest.py).

A fresh ``python -m controller run`` spends 1.5-3 s here importing FastAPI, pydantic,
uvicorn and the controller before it does anything; on a loaded 2-core machine that was most of
each stop test's time. The server (``python -m tests.fork_server``, one per test or one per
session) imports all of that once, single-threaded, then forks one child per request. The child
redirects its output to the controller's log, takes the requested environment and working
directory and runs ``controller.__main__.main(["run", SITE])``: the same command, from argument
parsing through the signal handling and the stop to its exit code, in its own process. The test
signals the child by PID; the server reaps it and reports its exit code (negative: killed by
that signal, as ``asyncio.subprocess.Process.returncode``).

Line protocol (JSON requests on stdin, one per line; replies on stdout):
``READY`` once imported; ``PID <pid>`` per request; ``EXIT <pid> <code>`` per child that ended.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.controller_proc import ROOT, ControllerProcess

PRELOAD = (
    "controller.__main__",
    "controller.api.app",
    "controller.runtime",
    "uvicorn",
    "uvicorn.config",
    "uvicorn.server",
    "uvicorn.lifespan.on",
    "uvicorn.loops.auto",
    "uvicorn.loops.asyncio",
    "uvicorn.protocols.http.auto",
    "uvicorn.protocols.http.h11_impl",
    "uvicorn.protocols.http.httptools_impl",
)
"""Imported before the first fork. A module missing here is imported by the child (slower,
same behaviour). uvicorn's WebSocket implementation is left to the child: importing it warns
(a deprecation), and that warning belongs in the controller's log."""


# ---------------------------------------------------------------------------------------------
# The server process


def _child(request: dict[str, Any], wake_fds: tuple[int, int]) -> None:
    """In the forked child: become ``floorhand run`` and never return."""
    code: int = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in wake_fds:
            os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        argv: list[str] = request["argv"]
        sys.argv = ["floorhand", *argv]
        from controller.__main__ import main

        try:
            code = main(argv)
        except SystemExit as exc:  # argparse, config errors: as the interpreter would map them
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        # What the interpreter does after `sys.exit(main())`: wait for non-daemon threads,
        # run the atexit callbacks (logging's flush), flush the standard streams.
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join()
        atexit._run_exitfuncs()
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    import importlib

    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    assert threading.active_count() == 1, "the fork server must stay single-threaded"
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.set_wakeup_fd(wake_w)
    out = sys.stdout
    stdin = sys.stdin.fileno()
    pending = b""
    children: set[int] = set()
    out.write("READY\n")
    out.flush()
    eof = False
    while not eof or children:
        fds = [wake_r] if eof else [stdin, wake_r]
        readable, _, _ = select.select(fds, [], [], 1.0)  # retried on EINTR (PEP 475)
        if wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 512)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            out.write(f"EXIT {pid} {os.waitstatus_to_exitcode(status)}\n")
        if stdin in readable:
            chunk = os.read(stdin, 65_536)
            eof = not chunk
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                out.flush()
                pid = os.fork()
                if pid == 0:
                    _child(json.loads(line), (wake_r, wake_w))
                children.add(pid)
                out.write(f"PID {pid}\n")
        out.flush()


# ---------------------------------------------------------------------------------------------
# The test side


class ForkedProcess:
    """A child of the fork server, with the part of `asyncio.subprocess.Process` that
    tests/controller_proc.py uses."""

    def __init__(self, pid: int, exited: asyncio.Future[int]) -> None:
        self.pid = pid
        self._exited = exited

    @property
    def returncode(self) -> int | None:
        return self._exited.result() if self._exited.done() else None

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)


def _resolve(fut: asyncio.Future[int], value: int) -> None:
    if not fut.done():
        fut.set_result(value)


def _deliver(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[int], value: int) -> None:
    """Resolve ``fut`` in its own loop, from the reader thread; nothing if that loop is gone
    (a test that ended with a child still running: its teardown killed the child)."""
    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
        loop.call_soon_threadsafe(_resolve, fut, value)


class ForkServer:
    """One fork server process; `spawn` starts one ``floorhand run`` from it.

    Not tied to an event loop: a thread reads the server's replies and resolves each child's
    futures in the loop of the test that spawned it, so one server can serve a whole session
    (`start` / `close`, the ``controller_forks`` fixture of tests/conftest.py) or one test
    (``async with ForkServer()``). Leaving (or `close`) kills (SIGKILL, by PID) any child still
    running and ends the server."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._waiting: collections.deque[
            tuple[asyncio.AbstractEventLoop, asyncio.Future[int], asyncio.Future[int]]
        ] = collections.deque()
        self._exits: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[int]]] = {}
        self._live: set[int] = set()

    def start(self, ready_timeout_s: float = 60.0) -> ForkServer:
        """Start the server and wait until it imported everything (``READY``)."""
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fork_server"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=str(ROOT),
        )
        self._reader = threading.Thread(target=self._read, name="fork-server-reader", daemon=True)
        self._reader.start()
        if not self._ready.wait(ready_timeout_s):
            self.close()
            raise TimeoutError(f"the fork server was not ready within {ready_timeout_s} s")
        return self

    def close(self) -> None:
        """SIGKILL every child still running, end the server, join the reader."""
        assert self._proc is not None
        with self._lock:
            live = list(self._live)
        for pid in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert self._proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10.0)  # the server exits once its children were reaped
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=10.0)

    async def __aenter__(self) -> ForkServer:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.to_thread(self.close)

    def _read(self) -> None:
        assert self._proc is not None
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            words = line.decode().split()
            if words == ["READY"]:
                self._ready.set()
            elif words[0] == "PID":
                pid = int(words[1])
                with self._lock:
                    loop, pid_fut, exit_fut = self._waiting.popleft()
                    self._exits[pid] = (loop, exit_fut)
                    self._live.add(pid)
                _deliver(loop, pid_fut, pid)
            elif words[0] == "EXIT":
                pid, code = int(words[1]), int(words[2])
                with self._lock:
                    self._live.discard(pid)
                    waiter = self._exits.pop(pid, None)
                if waiter is not None:
                    _deliver(*waiter, code)

    async def spawn(
        self, argv: list[str], *, env: Mapping[str, str], cwd: Path, log: Path
    ) -> ForkedProcess:
        """Fork ``floorhand <argv>`` with ``env`` (the whole environment) in ``cwd``, stdout
        and stderr appended to ``log``."""
        assert self._proc is not None
        assert self._proc.stdin is not None
        if self._proc.poll() is not None:
            raise RuntimeError(f"the fork server exited ({self._proc.returncode})")
        loop = asyncio.get_running_loop()
        pid_fut: asyncio.Future[int] = loop.create_future()
        exit_fut: asyncio.Future[int] = loop.create_future()
        request = {"argv": argv, "env": dict(env), "cwd": str(cwd), "log": str(log)}
        # The server answers requests in order: the n-th PID line is the n-th request's.
        with self._lock:
            self._waiting.append((loop, pid_fut, exit_fut))
            self._proc.stdin.write(json.dumps(request).encode() + b"\n")
            self._proc.stdin.flush()
        async with asyncio.timeout(10.0):
            pid = await pid_fut
        return ForkedProcess(pid, exit_fut)


class ForkedController(ControllerProcess):
    """A `ControllerProcess` whose starts are children of ``server``; with ``exec_first``
    its first start is a fresh ``python -m controller run`` instead (so a test also covers
    the interpreter's own start)."""

    def __init__(
        self,
        site: Path,
        folder: Path,
        server: ForkServer,
        *,
        exec_first: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(site, folder, env=env)
        self.server = server
        self.exec_first = exec_first

    async def spawn(self) -> None:
        if self.exec_first and self.starts == 0:
            await super().spawn()
            return
        self.proc = await self.server.spawn(
            ["run", str(self.site)], env=self.child_env(), cwd=ROOT, log=self.log_path
        )
        self.starts += 1


if __name__ == "__main__":
    serve()
