"""Run ``floorhand run`` as a child process (so tests can SIGKILL it) and talk to its API."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import httpx

from tests.sites import auth_headers
from tests.waiting import wait_for_condition

ROOT = Path(__file__).resolve().parents[1]

SHARED_SSL = ssl.create_default_context()
"""For every httpx client of the tests: the API is plain HTTP on 127.0.0.1, but an httpx client
built without one loads the CA bundle into a new SSL context (about 150 ms of CPU each, so a
wait polling with a client per request kept a core busy)."""


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def api_port() -> int:
    """A port on 127.0.0.1 nobody listens on, below the kernel's ephemeral range. A port from
    that range (bind to port 0) can be taken by any outgoing connection on the machine in the
    seconds before the controller binds it; that refused a start ("the API address ... is in
    use") in test_shutdown on a busy machine."""
    low = _ephemeral_low()
    while True:
        port = random.randrange(max(1024, low - 12_000), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


class ChildProcess(Protocol):
    """What this module uses of a controller process: an `asyncio.subprocess.Process`, or a
    child of tests/fork_server.py."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...

    async def wait(self) -> int: ...


class ControllerProcess:
    def __init__(self, site: Path, folder: Path, *, env: dict[str, str] | None = None) -> None:
        self.site = site
        self.folder = folder
        self.api_port = api_port()
        self.env = env or {}
        self.proc: ChildProcess | None = None
        self.starts = 0
        self.log_path = folder / "controller.log"
        self.ready_after_s: list[float] = []
        self.stopped_after_s: list[float] = []

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    async def start(self, ready_timeout_s: float = 20.0, *, wait_ready: bool = True) -> float:
        """Start and wait until /api/v1/ready answers 200 (with ``wait_ready=False``: answers
        at all, 503 included, e.g. while the broker is down); returns seconds to that point."""
        t0 = time.monotonic()
        await self.spawn()
        await self.wait_ready(ready_timeout_s, wait_ready=wait_ready, since=t0)
        elapsed = time.monotonic() - t0
        self.ready_after_s.append(elapsed)
        return elapsed

    async def wait_ready(
        self, timeout_s: float = 20.0, *, wait_ready: bool = True, since: float | None = None
    ) -> None:
        """Wait until the running process's /api/v1/ready answers 200 (or at all)."""
        assert self.proc is not None
        t0 = time.monotonic() if since is None else since
        proc = self.proc

        async with httpx.AsyncClient(base_url=self.base, timeout=1.0, verify=SHARED_SSL) as client:

            async def answers() -> int:
                if proc.returncode is not None:
                    raise RuntimeError(f"controller exited ({proc.returncode}):\n{self.tail()}")
                return (await client.get("/api/v1/ready")).status_code

            await wait_for_condition(
                answers,
                max(0.0, t0 + timeout_s - time.monotonic()),
                what="/api/v1/ready to answer 200" if wait_ready else "/api/v1/ready to answer",
                until=lambda code: code == 200 or not wait_ready,
                interval_s=0.05,
                retry_on=(httpx.TransportError,),
                context=self.tail,
            )

    def child_env(self) -> dict[str, str]:
        """The process's environment: ours, ``env`` and the API address."""
        return {**os.environ, **self.env, "FLOORHAND_API_BIND": f"127.0.0.1:{self.api_port}"}

    async def spawn(self) -> None:
        """Start the process without waiting for anything."""
        env = self.child_env()
        log = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "controller",
            "run",
            str(self.site),
            stdout=log,
            stderr=log,
            env=env,
            cwd=str(ROOT),
        )
        log.close()
        self.starts += 1

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self, timeout_s: float = 10.0, sig: signal.Signals = signal.SIGTERM) -> int:
        """Send ``sig`` and return the exit code; SIGKILL after ``timeout_s`` (then the code
        is -9). The time from the signal to the exit is appended to ``stopped_after_s``."""
        if self.proc is None:
            return 0
        if self.proc.returncode is not None:
            return self.proc.returncode
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        try:
            async with asyncio.timeout(timeout_s):
                code = await self.proc.wait()
        except TimeoutError:
            self.proc.send_signal(signal.SIGKILL)
            code = await self.proc.wait()
        self.stopped_after_s.append(time.monotonic() - t0)
        return code

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` without waiting."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout_s: float) -> int:
        """The exit code once the process ended; TimeoutError (process left running) after
        ``timeout_s``."""
        assert self.proc is not None
        async with asyncio.timeout(timeout_s):
            return await self.proc.wait()

    async def wait_log(self, text: str, timeout_s: float = 10.0) -> None:
        """Wait until the process's log contains ``text``."""
        await wait_for_condition(
            lambda: text in self.log_text(),
            timeout_s,
            what=f"{text!r} in the log",
            interval_s=0.05,
            context=self.tail,
        )

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    async def get(self, path: str, role: str = "engineer") -> Any:
        """GET ``path`` with the test token of ``role`` (tests/sites.py)."""
        async with httpx.AsyncClient(
            base_url=self.base, timeout=5.0, headers=auth_headers(role), verify=SHARED_SSL
        ) as client:
            r = await client.get(path)
            r.raise_for_status()
            return r.json()

    async def get_all(self, path: str, role: str = "engineer") -> list[Any]:
        """Every item of the list read ``path`` (no query string), page by page (docs/api.md,
        "Pages")."""
        items: list[Any] = []
        params: dict[str, str | int] = {"limit": 5000}
        async with httpx.AsyncClient(
            base_url=self.base, timeout=5.0, headers=auth_headers(role), verify=SHARED_SSL
        ) as client:
            while True:
                r = await client.get(path, params=params)
                r.raise_for_status()
                items += r.json()
                if "x-next-cursor" not in r.headers:
                    return items
                params["cursor"] = r.headers["x-next-cursor"]

    async def wait_applied(self, max_seq: dict[str, int], timeout_s: float = 30.0) -> None:
        """Wait until every device's applied cursor reached its highest published seq."""

        async def cursors() -> dict[str, int]:
            devices = {d["id"]: d for d in await self.get_all("/api/v1/devices")}
            return {k: devices[k]["last_seq"] for k in max_seq}

        await wait_for_condition(
            cursors,
            timeout_s,
            what=f"applied cursors {max_seq}",
            until=lambda got: got == max_seq,
            interval_s=0.1,
            context=self.tail,
        )

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
