"""Device-layer exceptions: the only ones that escape a device adapter.

Third-party exceptions (socket errors, paho, pymodbus) are translated into these at the
adapter boundary. Only `DeviceUnavailable`, `DeviceBusy` and `ProtocolError` are worth
retrying; the others mean a retry would get the same answer. A `NoReply` (a subclass of
`DeviceUnavailable`) is retryable for reads only: a write may have run.
"""

from __future__ import annotations


class DeviceError(Exception):
    """Base class for every device-layer error."""


class DeviceUnavailable(DeviceError):
    """The link to the device is down or did not come up in time; fail fast, retry later."""


class DeviceConfigError(DeviceError):
    """The configuration is wrong or the device rejected it; never retried."""


class ProtocolError(DeviceError):
    """The peer sent bytes that violate the protocol; the connection is dropped."""


class SessionTakenOver(DeviceError):
    """Another client with our client id took our session; fatal, do not reconnect."""


class AuthError(DeviceError):
    """The peer refused our credentials or authorisation; fatal."""


# -- Modbus / PLC ---------------------------------------------------------------------------


class DeviceBusy(DeviceError):
    """The device answered "busy" (Modbus exception 06) and did not execute the request.

    The link retries busy answers by itself within a short budget; this is raised once the
    budget is spent (or when the link's own request queue is full). Safe to retry later.
    """


class IllegalAddress(DeviceConfigError):
    """The device refused an address (Modbus exception 02): the register map and the PLC
    program disagree. A configuration error, never retried."""


class DeviceFaulty(ProtocolError):
    """The device answered with a malformed reply (bad header, short frame, wrong unit or
    function, wrong echo) or reported a device failure (exception 04).

    ``reason`` says which; the link marks the device FAULTY and, for malformed frames, drops
    the connection (the framing can no longer be trusted) and reconnects.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NoReply(DeviceUnavailable):
    """A request was sent but no reply came (timeout or connection lost).

    The request may or may not have been executed: a write must not be re-sent blindly.
    Drivers read the device's state back to find out.
    """


class CommandRefused(DeviceError):
    """The PLC took a command but refused to act on it (e.g. START while an e-stop is active,
    a mailbox submission it reports as duplicate or invalid). ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CommandOutcomeUnknown(DeviceError):
    """Whether a command ran cannot be established (the PLC restarted with the command
    pending, or stayed unreachable past the confirmation deadline). Never re-sent
    automatically: the command is UNKNOWN until someone looks (see `SorterDriver.lookup`)."""

    def __init__(self, cmd_id: int, reason: str) -> None:
        super().__init__(f"command {cmd_id}: {reason}")
        self.cmd_id = cmd_id
        self.reason = reason


class ResultTimeout(DeviceError):
    """An accepted command did not complete in time (belt stopped, jammed...). It stays
    pending on the PLC; wait again or look it up later."""
