"""``floorhand catalog`` and ``check-config`` in process: export -> import is no change, an
inline site refuses an import, progress on long imports, check-config with the journal's
catalogue (docs/catalogue.md)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from controller.__main__ import main
from controller.adapters import catalog_store
from tests.sites import write_small_site


def test_export_then_import_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = write_small_site(tmp_path, mqtt_port=1883, scales=3, catalogue_csv=True)
    assert main(["check-config", str(site)]) == 2  # no catalogue yet
    assert "the journal holds no catalogue" in capsys.readouterr().err
    assert main(["catalog", "export", "--site", str(site)]) == 2
    assert "the journal holds no catalogue" in capsys.readouterr().err
    csv = str(tmp_path / "catalogue.csv")
    assert main(["catalog", "import", csv, "--site", str(site), "--actor", "wms sync"]) == 0
    assert "catalogue version 1" in capsys.readouterr().out
    db = sqlite3.connect(tmp_path / "journal.sqlite")
    assert [v.actor for v in catalog_store.versions(db)] == ["wms sync"]
    db.close()
    for fmt in ("jsonl", "csv"):
        out = tmp_path / f"export.{fmt}"
        assert (
            main(["catalog", "export", "--site", str(site), "--format", fmt, "--out", str(out)])
            == 0
        )
        assert "exported 9 records from journal version 1" in capsys.readouterr().err
        assert main(["catalog", "import", str(out), "--site", str(site)]) == 0
        assert "catalogue version 1 " in capsys.readouterr().out  # no new version
    assert main(["check-config", str(site)]) == 0
    printed = capsys.readouterr().out
    assert "catalog journal version 1" in printed
    assert "shelves 3" in printed


def test_an_inline_site_refuses_an_import(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = write_small_site(tmp_path, mqtt_port=1883, scales=2)
    assert main(["check-config", str(site)]) == 0
    assert "catalog inline in the site file" in capsys.readouterr().out
    assert main(["catalog", "export", "--site", str(site)]) == 0
    exported = capsys.readouterr().out
    assert exported.count("\nshelf,") == 2
    csv = tmp_path / "c.csv"
    csv.write_text(exported)
    assert main(["catalog", "import", str(csv), "--site", str(site)]) == 2
    assert "declares the catalogue inline" in capsys.readouterr().err
    assert not (tmp_path / "journal.sqlite").exists()


def test_a_long_import_reports_progress(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = write_small_site(tmp_path, mqtt_port=1883, scales=3_400, catalogue_csv=True)
    assert main(["catalog", "import", str(tmp_path / "catalogue.csv"), "--site", str(site)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert "catalog: read 10000 rows" in err
    assert "catalog: validated 10000 rows" in err
    assert "catalog: wrote 10000/10200 records" in err
    assert err[-1] == "catalog: wrote 10200/10200 records"
