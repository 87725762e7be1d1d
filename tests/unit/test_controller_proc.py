"""tests/controller_proc.py: the API port it gives a controller."""

from __future__ import annotations

from pathlib import Path

from tests.controller_proc import ControllerProcess


def ephemeral_low() -> int:
    """The first port the kernel hands to outgoing connections (and to a bind to port 0)."""
    return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


def test_the_api_port_is_outside_the_range_outgoing_connections_take(tmp_path: Path) -> None:
    """The port is chosen seconds before the controller binds it: one from the ephemeral range
    can meanwhile become the local port of any outgoing connection on the machine, and the
    start is refused ("the API address ... is in use", seen in test_shutdown)."""
    low = ephemeral_low()
    ports = {ControllerProcess(tmp_path / "site.toml", tmp_path).api_port for _ in range(50)}
    assert all(1024 <= port < low for port in ports), sorted(p for p in ports if p >= low)[:5]
    assert len(ports) > 40  # spread out: several controllers of one test do not collide
