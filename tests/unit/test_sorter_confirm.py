"""SorterDriver's read-back after a mailbox write whose reply was lost: what another read
already learned about the command wins over a failed read of its own."""

from __future__ import annotations

from devices.link.modbus import ModbusLink, ModbusLinkConfig
from devices.sorter import SorterDriver, _Phase, _Record


async def test_an_accept_seen_by_another_read_is_not_turned_into_an_unknown_outcome() -> None:
    """While this confirm waited for a link that went down, another read (the status poll, a
    concurrent command's confirm) saw the PLC accept the command; the link stays down past the
    confirm deadline. The command is accepted, not of unknown outcome (the pick task would
    otherwise need a supervisor to resolve it)."""
    link = ModbusLink(ModbusLinkConfig(port=1), name="down")  # never started: stays DOWN
    driver = SorterDriver(link, confirm_timeout_s=0.05, poll_interval_s=0.01)
    rec = _Record(7, 1, 1, 0)
    rec.phase = _Phase.ACCEPTED  # marked by the other read
    assert await driver._confirm(rec) is True
    assert rec.phase is _Phase.ACCEPTED
