"""Container health check: exit 0 when Floorhand's ``GET /api/v1/ready`` answers 200, else 1.

The image's HEALTHCHECK runs it (Dockerfile). It needs only the standard library and asks the
API on the address ``FLOORHAND_API_BIND`` gives (``HOST:PORT``, the image sets
``0.0.0.0:8080``): a wildcard host is asked on loopback. One line on stdout says why, which
``docker inspect`` / ``podman healthcheck run`` show.
"""

from __future__ import annotations

import http.client
import os
import sys

DEFAULT_BIND = "0.0.0.0:8080"
TIMEOUT_S = 4.0
WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}


def target(bind: str) -> tuple[str, int]:
    """The host and port to ask for a ``HOST:PORT`` bind address (``[v6]:PORT`` too)."""
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"FLOORHAND_API_BIND={bind!r} is not HOST:PORT")
    host = WILDCARDS.get(host, host).strip("[]")
    return host, int(port)


def main() -> int:
    """Ask ``/api/v1/ready`` once; 0 on 200, 1 otherwise (never raises)."""
    bind = os.environ.get("FLOORHAND_API_BIND") or DEFAULT_BIND
    try:
        host, port = target(bind)
        conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT_S)
        try:
            conn.request("GET", "/api/v1/ready")
            resp = conn.getresponse()
            body = resp.read(500).decode("utf-8", "replace")
        finally:
            conn.close()
    except (OSError, ValueError, http.client.HTTPException) as exc:
        print(f"not ready: {bind}: {exc}")
        return 1
    print(f"{resp.status} {body}")
    return 0 if resp.status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
