"""The systemd notification protocol (``sd_notify``), without a dependency.

Under a ``Type=notify`` unit systemd passes ``NOTIFY_SOCKET`` (an ``AF_UNIX`` datagram socket:
a path, or ``@name`` in the abstract namespace) and, with ``WatchdogSec=``, ``WATCHDOG_USEC``
(and ``WATCHDOG_PID``). ``floorhand run`` sends ``READY=1`` once the journal is open, the
broker session is up and the API serves, ``STATUS=`` lines on the way, ``WATCHDOG=1`` from the
supervision loop at half the watchdog interval (a wedged event loop stops feeding it, and
systemd restarts the service), and ``STOPPING=1`` when it begins to stop
(docs/deployment.md). Without ``NOTIFY_SOCKET`` every call does nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("floorhand.sdnotify")


def socket_address(value: str) -> str | bytes | None:
    """``NOTIFY_SOCKET``'s address: a filesystem path, or an abstract name (``@name`` becomes
    ``b"\\0name"``); None for anything else (systemd also allows ``vsock:``, not used here)."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def watchdog_interval_s(environ: Mapping[str, str], pid: int) -> float | None:
    """The watchdog interval systemd asked for (``WATCHDOG_USEC``), in seconds; None when there
    is none, it is malformed, or ``WATCHDOG_PID`` names another process."""
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    return int(usec) / 1_000_000


class Notifier:
    """Sends state lines to systemd's notification socket; every method is a no-op without
    one. A failed send is logged once and never raised: notifying is not worth a crash."""

    def __init__(
        self,
        address: str | bytes | None,
        watchdog_s: float | None = None,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.address = address
        self.watchdog_s = watchdog_s
        self._monotonic = monotonic
        self._sock: socket.socket | None = None
        self._last_watchdog: float | None = None
        self._failed = False
        self._status = ""
        self.ready_sent = False
        self.stopping_sent = False
        self.sent = 0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        address = socket_address(raw) if raw else None
        if raw and address is None:
            log.warning("NOTIFY_SOCKET %r is not a path or an @abstract name: not notifying", raw)
        return cls(address, watchdog_interval_s(env, os.getpid()) if address else None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """One datagram of ``KEY=value`` lines; False when it could not be sent."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            if not self._failed:
                log.warning("cannot notify systemd at %r: %s", self.address, exc)
                self._failed = True
            return False
        self.sent += 1
        return True

    def status(self, text: str) -> None:
        """A ``STATUS=`` line, sent only when it differs from the last one."""
        if text != self._status:
            self._status = text
            self.send(f"STATUS={text}")

    def ready(self, status: str) -> None:
        """``READY=1`` (once) with a status line."""
        if not self.ready_sent:
            self.ready_sent = self.send("READY=1", f"STATUS={status}")

    def stopping(self, status: str = "stopping") -> None:
        """``STOPPING=1`` (once)."""
        if not self.stopping_sent:
            self.stopping_sent = True
            self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> None:
        """``WATCHDOG=1`` if half the watchdog interval passed since the last one."""
        if self.watchdog_s is None:
            return
        now = self._monotonic()
        if self._last_watchdog is None or now - self._last_watchdog >= self.watchdog_s / 2:
            self._last_watchdog = now
            self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
