"""Whether this machine lets the test process run a thread under SCHED_FIFO (root with
CAP_SYS_NICE, or an ``RLIMIT_RTPRIO`` that allows it): a container without either refuses."""

from __future__ import annotations

import os
import threading

import pytest


def fifo_allowed(priority: int = 10) -> bool:
    """Try SCHED_FIFO at ``priority`` on a throwaway thread (nothing else changes)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        except OSError:
            result.append(False)
        else:
            result.append(True)

    thread = threading.Thread(target=probe, name="fifo-probe")
    thread.start()
    thread.join(5)
    return bool(result and result[0])


needs_fifo = pytest.mark.skipif(
    not fifo_allowed(), reason="this machine refuses SCHED_FIFO (no CAP_SYS_NICE, RLIMIT_RTPRIO 0)"
)
