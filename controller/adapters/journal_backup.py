"""``floorhand journal backup``: a consistent copy of the journal, safe while a controller runs.

SQLite's online backup API (``sqlite3.Connection.backup``) copies the journal page by page
from a read transaction held for the whole copy. The journal runs in WAL mode, so that read
transaction sees one committed state (the one at its start, WAL content included) and does
not block the controller's commits; and since the snapshot cannot change under it, the backup
never restarts however busy the controller is. The copy is written to ``DEST.partial``,
checked with ``PRAGMA integrity_check`` and only then renamed to ``DEST``. Restoring is a
file copy with the controller stopped (docs/deployment.md, "Backups and restore").
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PAGES_PER_STEP = 256
"""Pages copied per backup step (4 KiB pages: 1 MiB), each step reporting progress."""

BUSY_TIMEOUT_S = 10.0
"""How long opening the read transaction waits on a lock (a checkpoint truncating the WAL)."""


class BackupError(Exception):
    """The backup could not be made, or the copy failed its integrity check."""


@dataclass(frozen=True, slots=True)
class BackupResult:
    dest: Path
    pages: int
    bytes: int
    took_s: float


def backup_journal(
    source: Path,
    dest: Path,
    *,
    pages_per_step: int = PAGES_PER_STEP,
    progress: Callable[[int, int], None] | None = None,
) -> BackupResult:
    """Copy the journal at ``source`` to ``dest`` (which must not exist); ``progress(copied,
    total)`` after each step. `BackupError` on any failure (no ``dest`` is left then)."""
    if not source.is_file():
        raise BackupError(f"no journal at {source}")
    if dest.exists():
        raise BackupError(f"{dest} exists: choose a new file (a backup never overwrites)")
    if not dest.parent.is_dir():
        raise BackupError(f"{dest.parent} is not a directory")
    partial = dest.with_name(dest.name + ".partial")
    t0 = time.monotonic()
    try:
        # Not mode=ro: a read-only connection cannot create the WAL index (-shm) of a
        # journal whose controller is stopped. Only reads are issued.
        src = sqlite3.connect(source, isolation_level=None, timeout=BUSY_TIMEOUT_S)
    except sqlite3.Error as exc:
        raise BackupError(f"cannot open journal {source}: {exc}") from exc
    try:
        partial.unlink(missing_ok=True)
        dst = sqlite3.connect(partial, isolation_level=None)
        try:
            # One read transaction for the whole copy: one consistent state, no restarts.
            src.execute("BEGIN")
            src.execute("SELECT count(*) FROM sqlite_master").fetchone()

            def step(status: int, remaining: int, total: int) -> None:
                if progress is not None:
                    progress(total - remaining, total)

            src.backup(dst, pages=pages_per_step, progress=step)
            src.execute("COMMIT")
            pages = int(dst.execute("PRAGMA page_count").fetchone()[0])
        finally:
            dst.close()
        _check(partial)
        with open(partial, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(partial, dest)
        _fsync_dir(dest.parent)
    except sqlite3.Error as exc:
        partial.unlink(missing_ok=True)
        raise BackupError(f"backup of {source} failed: {exc}") from exc
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        src.close()
    return BackupResult(dest, pages, dest.stat().st_size, time.monotonic() - t0)


def _check(path: Path) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        rows = [r[0] for r in db.execute("PRAGMA integrity_check").fetchall()]
    finally:
        db.close()
    if rows != ["ok"]:
        raise BackupError(f"the copy failed PRAGMA integrity_check: {'; '.join(rows[:5])}")


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
