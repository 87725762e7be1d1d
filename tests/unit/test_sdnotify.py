"""controller.sdnotify: addresses, the watchdog interval and its pacing, datagrams sent."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from controller.sdnotify import Notifier, socket_address, watchdog_interval_s


def test_addresses_paths_and_the_abstract_namespace() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@floorhand/notify") == b"\0floorhand/notify"
    assert socket_address("vsock:2:1234") is None


def test_watchdog_interval_only_for_this_process() -> None:
    pid = os.getpid()
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}, pid) == 30.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(pid)}, pid)
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, pid) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "soon"}, pid) is None
    assert watchdog_interval_s({}, pid) is None


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier.from_environ({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog_s is None
    notifier.ready("ready")
    notifier.watchdog()
    assert notifier.sent == 0


def test_datagrams_to_an_abstract_socket_watchdog_paced_at_half_the_interval() -> None:
    name = f"floorhand-test-{os.getpid()}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(b"\0" + name.encode())
    receiver.settimeout(2.0)
    now = [100.0]
    env = {"NOTIFY_SOCKET": f"@{name}", "WATCHDOG_USEC": "4000000"}
    notifier = Notifier.from_environ(env)
    notifier = Notifier(notifier.address, notifier.watchdog_s, monotonic=lambda: now[0])
    try:
        notifier.status("starting")
        notifier.status("starting")  # unchanged: not sent again
        notifier.ready("ready: site s")
        notifier.ready("ready: site s")  # once
        for t in (100.0, 101.0, 101.9, 102.0, 103.0, 104.0):
            now[0] = t
            notifier.watchdog()
        notifier.stopping()
        notifier.stopping()
        got = []
        for _ in range(6):
            got.append(receiver.recv(4096).decode())
        assert got == [
            "STATUS=starting",
            "READY=1\nSTATUS=ready: site s",
            "WATCHDOG=1",  # 100.0
            "WATCHDOG=1",  # 102.0: 2 s = half of 4 s
            "WATCHDOG=1",  # 104.0
            "STOPPING=1\nSTATUS=stopping",
        ]
        receiver.setblocking(False)
        assert notifier.sent == 6
    finally:
        notifier.close()
        receiver.close()


def test_a_missing_socket_is_logged_not_raised(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens"))
    notifier.ready("ready")
    assert not notifier.ready_sent
    assert notifier.sent == 0
