"""`StopGuard` (floorhand run's stop bound): a stop signal that arrives after the process
began leaving on its own (``arm()``: the server stopped, the runtime died) is a first signal,
not a second one. The guard thread may read a signal's byte later than the main thread ran
its handler (a loaded machine): it must not take it for a second signal then."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, threading
    from controller.__main__ import StopGuard

    guard = StopGuard(bound_s=5.0)
    calls = []
    both = threading.Event()

    def on_stop():
        calls.append(threading.current_thread().name)
        if len(calls) == 2:
            both.set()

    guard.install(on_stop)
    guard.arm()  # the process is already leaving (its server stopped)
    os.kill(os.getpid(), signal.SIGTERM)
    # The handler (main thread) and the guard thread both ask for the stop; a guard that
    # took the signal for a second one would have exited 143 instead.
    sys.exit(0 if both.wait(10) else 9)
    """
)


def test_a_signal_after_arm_is_a_first_signal_not_a_second() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    assert "second SIGTERM" not in proc.stderr
