"""``floorhand journal backup DEST`` while a controller runs, and a restore from it
(docs/deployment.md, "Backups and restore"): real ``floorhand run`` processes, mosquitto and
the simulated conveyor and sorter PLCs."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import sys
from pathlib import Path

import pytest

from controller.adapters.journal_backup import BackupError, backup_journal
from simulators.sorter import SorterPlc
from tests.controller_proc import ROOT, ControllerProcess
from tests.integration.test_picking import picking_site
from tests.integration.test_shutdown import Shelf, plc_pair, plcs_up, submit_pick
from tests.mosquitto import MosquittoBroker


async def floorhand(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controller",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=str(ROOT),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60.0)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def order_ids(ctl: ControllerProcess) -> set[str]:
    """The client order ids (``external_id``) of the orders the controller knows."""
    return {o["external_id"] for o in await ctl.get("/api/v1/orders")}


async def executed(sorter: SorterPlc, cmd_id: int) -> None:
    await sorter.wait_until(lambda: sorter.executions.get(cmd_id, 0) >= 1, 15.0)


async def test_backup_while_running_then_restore_resyncs_the_plc_cmd_ids(
    mosquitto: MosquittoBroker, tmp_path: Path, controllers: list[ControllerProcess]
) -> None:
    """A backup taken while the controller runs holds pick 1; pick 2 comes after it. Restored
    (stop, copy back, start), the controller knows order 1 and not order 2, and its sorter
    command counter, behind the PLC's by pick 2, moves above it on connect (cmd_ids_moved):
    pick 3 gets a new id and executes once."""
    backup = tmp_path / "backups" / "journal-1.sqlite"
    backup.parent.mkdir()
    journal = tmp_path / "journal.sqlite"
    async with plc_pair() as (_conveyor, sorter, ch, sh):
        site = picking_site(tmp_path, mosquitto.port, ch.port, sh.port)
        ctl = ControllerProcess(site, tmp_path)
        controllers.append(ctl)
        await ctl.start()
        await plcs_up(ctl)
        shelf = Shelf(mosquitto.port)
        await shelf.publish(units=30)
        first = await submit_pick(ctl, "before-backup")
        await executed(sorter, first)

        code, out, err = await floorhand("journal", "backup", str(backup), "--site", str(site))
        assert code == 0, err
        assert "integrity_check ok" in out, out
        assert "pages (100%)" in err, err
        code, _, err = await floorhand("journal", "backup", str(backup), "--journal", str(journal))
        assert code == 1
        assert "never overwrites" in err

        assert await order_ids(ctl) == {"before-backup"}
        second = await submit_pick(ctl, "after-backup")
        await executed(sorter, second)
        assert second > first
        assert await ctl.stop() == 0, ctl.tail()

        # The restore, as docs/deployment.md tells it.
        for leftover in (Path(f"{journal}-wal"), Path(f"{journal}-shm")):
            leftover.unlink(missing_ok=True)
        shutil.copyfile(backup, journal)

        restored = ControllerProcess(site, tmp_path)
        controllers.append(restored)
        await restored.start()
        await plcs_up(restored)
        assert await order_ids(restored) == {"before-backup"}
        await restored.wait_log("moved above it")  # the PLC knows `second`; the journal not
        await shelf.publish(units=28)
        third = await submit_pick(restored, "after-restore")
        assert third > second, (first, second, third)
        await executed(sorter, third)
        assert all(n == 1 for n in sorter.executions.values()), sorter.executions


def test_the_copy_is_one_consistent_state_and_checked(tmp_path: Path) -> None:
    """Rows committed to the WAL only (no checkpoint) are in the copy; a writer committing
    between the backup's steps does not restart it or leak into it; bad input is refused."""
    source = tmp_path / "j.sqlite"
    db = sqlite3.connect(source, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("CREATE TABLE t (x BLOB)")
    db.executemany("INSERT INTO t VALUES (?)", [(bytes(400),) for _ in range(5_000)])
    steps: list[tuple[int, int]] = []

    def write_between_steps(copied: int, total: int) -> None:
        steps.append((copied, total))
        db.execute("INSERT INTO t VALUES (?)", (bytes(400),))

    result = backup_journal(
        source, tmp_path / "b.sqlite", pages_per_step=50, progress=write_between_steps
    )
    db.close()
    assert len(steps) > 5
    assert steps[-1][0] == steps[-1][1] == result.pages
    copy = sqlite3.connect(result.dest)
    assert copy.execute("SELECT count(*) FROM t").fetchone() == (5_000,)
    copy.close()
    assert not (tmp_path / "b.sqlite.partial").exists()
    for dest, source_path, message in (
        (result.dest, source, "never overwrites"),
        (tmp_path / "c.sqlite", tmp_path / "missing.sqlite", "no journal at"),
        (tmp_path / "no-dir" / "c.sqlite", source, "is not a directory"),
    ):
        with pytest.raises(BackupError, match=message):
            backup_journal(source_path, dest)
