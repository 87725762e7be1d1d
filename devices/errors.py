"""Device-layer exceptions: the only ones that escape a device adapter.

Third-party exceptions (socket errors, paho, pymodbus) are translated into these at the
adapter boundary. Only `DeviceUnavailable` and `ProtocolError` are worth retrying; the
others mean a retry would get the same answer.
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
