"""Real history servers for tests and benchmarks: Debian's ``influxd`` 1.6.7 and
``victoria-metrics``, each on free 127.0.0.1 ports with its data in a temporary folder.

Never a system service: the Debian packages may install (and on some machines start) their
own services on the default ports; these helpers always start private instances. Readiness is
polled on the HTTP ping endpoint with a deadline; ``stop``/``kill`` signal only the process
this helper started (by its PID). The methods block: from async code call them through
``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.controller_proc import api_port
from tests.waiting import wait_for_condition_sync

INFLUXD_BIN = shutil.which("influxd") or "/usr/bin/influxd"
VICTORIA_BIN = shutil.which("victoria-metrics") or "/usr/bin/victoria-metrics"


def free_port() -> int:
    """A free port below the kernel's ephemeral range (`tests.controller_proc.api_port`): one
    from the range can be taken by an outgoing connection before influxd binds it (CI: "bind:
    address already in use")."""
    return api_port()


def have_influxd() -> bool:
    return os.access(INFLUXD_BIN, os.X_OK)


def have_victoria() -> bool:
    return os.access(VICTORIA_BIN, os.X_OK)


class _Server:
    name = "server"
    ping_path = "/ping"
    ping_ok = frozenset({200, 204})

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = self.folder / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout_s: float = 20.0) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.folder
            )
        self.starts += 1
        proc = self._proc
        with httpx.Client(trust_env=False, timeout=1.0) as client:

            def ping() -> int:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {proc.returncode}:\n{self.log_tail()}"
                    )
                return client.get(self.url + self.ping_path).status_code

            try:
                wait_for_condition_sync(
                    ping,
                    timeout_s,
                    what=f"{self.name} to answer its ping",
                    until=lambda code: code in self.ping_ok,
                    retry_on=(httpx.HTTPError,),
                    context=self.log_tail,
                )
            except TimeoutError:
                self.kill()
                raise

    def _signal(self, sig: signal.Signals, timeout_s: float) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM and wait for the exit (SIGKILL after the timeout)."""
        self._signal(signal.SIGTERM, timeout_s)

    def kill(self) -> None:
        self._signal(signal.SIGKILL, 10.0)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class InfluxD(_Server):
    """InfluxDB 1.x (Debian's 1.6.7): HTTP API on ``port``, RPC on another free port."""

    name = "influxd"

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.rpc_port = free_port()
        self.config_path = self.folder / "influxd.conf"

    def argv(self) -> list[str]:
        d = self.folder
        self.config_path.write_text(
            f"""reporting-disabled = true
bind-address = "127.0.0.1:{self.rpc_port}"
[meta]
  dir = "{d}/meta"
  logging-enabled = false
[data]
  dir = "{d}/data"
  wal-dir = "{d}/wal"
  query-log-enabled = false
  wal-fsync-delay = "0s"
[monitor]
  store-enabled = false
[http]
  bind-address = "127.0.0.1:{self.port}"
  log-enabled = false
  pprof-enabled = false
[continuous_queries]
  enabled = false
[logging]
  level = "warn"
  suppress-logo = true
"""
        )
        return [INFLUXD_BIN, "run", "-config", str(self.config_path)]

    def query(self, q: str, db: str | None = None) -> list[dict[str, Any]]:
        params = {"q": q, "epoch": "ms"}
        if db:
            params["db"] = db
        r = httpx.post(self.url + "/query", data=params, trust_env=False, timeout=30)
        r.raise_for_status()
        results: list[dict[str, Any]] = r.json()["results"]
        for res in results:
            if "error" in res:
                raise RuntimeError(res["error"])
        return results

    def create_database(self, db: str) -> None:
        self.query(f'CREATE DATABASE "{db}"')

    def count(self, db: str, measurement: str, field: str) -> int:
        res = self.query(f'SELECT count("{field}") FROM "{measurement}"', db)
        series = res[0].get("series") or []
        return int(series[0]["values"][0][1]) if series else 0

    def times(self, db: str, measurement: str, field: str) -> list[int]:
        res = self.query(f'SELECT "{field}" FROM "{measurement}"', db)
        series = res[0].get("series") or []
        return [int(v[0]) for v in series[0]["values"]] if series else []


class VictoriaMetrics(_Server):
    """victoria-metrics, deduplicating samples of one series within the same millisecond (as
    InfluxDB overwrites a point with the same series and timestamp)."""

    name = "victoria-metrics"
    ping_path = "/health"

    def __init__(self, folder: Path, *, dedup: bool = True) -> None:
        super().__init__(folder)
        self.dedup = dedup

    def argv(self) -> list[str]:
        argv = [
            VICTORIA_BIN,
            f"-httpListenAddr=127.0.0.1:{self.port}",
            f"-storageDataPath={self.folder / 'data'}",
            "-retentionPeriod=100y",
            "-loggerLevel=ERROR",
        ]
        if self.dedup:
            argv.append("-dedup.minScrapeInterval=1ms")
        return argv

    def export(self, match: str) -> list[dict[str, Any]]:
        """Every stored series matching the selector, with its values and ms timestamps
        (``/api/v1/export``: the write endpoints answer 204 even for rows they drop)."""
        with httpx.Client(trust_env=False, timeout=30) as client:
            client.get(self.url + "/internal/force_flush")
            r = client.post(self.url + "/api/v1/export", data={"match[]": match})
        r.raise_for_status()
        import orjson

        return [orjson.loads(line) for line in r.content.splitlines() if line.strip()]

    def samples(self, match: str) -> int:
        return sum(len(s["values"]) for s in self.export(match))

    def wait_samples(self, match: str, expected: int, timeout_s: float = 15.0) -> int:
        """Poll the export until ``expected`` samples are visible (data becomes searchable
        about a second after ingestion); returns the count, TimeoutError (naming the last count)
        if it stays below ``expected``."""
        return wait_for_condition_sync(
            lambda: self.samples(match),
            timeout_s,
            what=f"{expected} samples of {match}",
            until=lambda n: n >= expected,
            interval_s=0.1,
        )


@contextlib.contextmanager
def running(server: _Server) -> Iterator[Any]:
    server.start()
    try:
        yield server
    finally:
        server.stop()
