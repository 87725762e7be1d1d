"""Other MQTT brokers for the broker matrix (tests/integration/test_mqtt_broker_matrix.py).

aedes (Node.js) is installed with the machine's npm into a cache folder on first use, pinned,
and started as a child process on 127.0.0.1; only the process started here is ever signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

AEDES_VERSION = "1.2.0"
READY = "aedes ready"

# An ES module next to its node_modules, so `import 'aedes'` resolves from the cache folder.
_LAUNCHER = """\
import net from 'node:net'
import { Aedes } from 'aedes'

const port = Number(process.argv[2])
const aedes = await Aedes.createBroker()  // in-memory persistence: sessions, QoS 1 queues
const server = net.createServer(aedes.handle)
server.listen(port, '127.0.0.1', () => console.log('%s'))
process.on('SIGTERM', () => server.close(() => aedes.close(() => process.exit(0))))
"""


def cache_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "floorhand"


def ensure_aedes(timeout_s: float = 300.0) -> tuple[Path, float]:
    """The folder holding aedes ``AEDES_VERSION`` and its launcher, installed with npm on first
    use and cached across runs. Returns it and the seconds spent installing (0.0 when cached).
    Raises RuntimeError (with npm's output) when node/npm are missing or the install fails."""
    folder = cache_dir() / f"aedes-{AEDES_VERSION}"
    stamp = folder / ".floorhand-installed"
    if stamp.exists():
        return folder, 0.0
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        raise RuntimeError("node and npm are not installed (Debian packages nodejs, npm)")
    folder.mkdir(parents=True, exist_ok=True)
    with (folder.parent / f"{folder.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be installing it right now
        if stamp.exists():
            return folder, 0.0
        started = time.monotonic()
        (folder / "package.json").write_text('{"private": true, "type": "module"}\n')
        done = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--silent", f"aedes@{AEDES_VERSION}"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"npm install aedes@{AEDES_VERSION} failed ({done.returncode}):\n"
                f"{done.stdout[-3000:]}{done.stderr[-3000:]}"
            )
        (folder / "broker.mjs").write_text(_LAUNCHER % READY)
        stamp.write_text(f"aedes@{AEDES_VERSION}\n")
        return folder, time.monotonic() - started


@contextlib.asynccontextmanager
async def running_aedes(folder: Path, port: int, timeout_s: float = 20.0) -> AsyncIterator[int]:
    """Run the aedes launcher of ``folder`` on 127.0.0.1:``port``; yields its PID."""
    node = shutil.which("node") or "node"
    proc = await asyncio.create_subprocess_exec(
        node,
        str(folder / "broker.mjs"),
        str(port),
        cwd=folder,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=None,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(timeout_s):
            while True:
                line = await proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"aedes exited with {await proc.wait()} before ready")
                if line.decode(errors="replace").strip() == READY:
                    break
        yield proc.pid
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(5):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
