"""``floorhand catalog import|export`` (docs/catalogue.md).

Exit codes: 0 done; 2 the site file or the catalogue file is invalid (every error on stderr,
nothing imported), or (``--url``) the controller refused it; 3 the controller of the site is
running (the journal's lock is held: send it with ``--url`` instead); 1 the journal (or, with
``--url``, the controller) cannot be reached or could not store it.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from controller.adapters import catalog_store
from controller.adapters.journal import Journal, JournalError, JournalLocked
from controller.catalog import formats
from controller.catalog.diff import diff
from controller.catalog.records import Catalogue
from controller.catalog.start import inline_catalogue, is_inline, journal_catalogue
from controller.catalog.validate import parse
from controller.config import ConfigError, SiteConfig, load_site

EXIT_OK = 0
EXIT_JOURNAL = 1
EXIT_INVALID = 2
EXIT_RUNNING = 3

TOKEN_ENV = "FLOORHAND_API_TOKEN"
"""The API token of ``import --url`` when no ``--token-file`` is given."""

IMPORT_SOURCE = "import"
"""The audit source of a catalogue written by ``floorhand catalog import``."""


def _err(message: str) -> None:
    print(f"floorhand: {message}", file=sys.stderr)


def _site(args: argparse.Namespace) -> SiteConfig | None:
    try:
        return load_site(args.site, {"journal_path": args.journal} if args.journal else None)
    except ConfigError as exc:
        _err(str(exc))
        return None


def _actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def _actor_name(value: str) -> str:
    if not 1 <= len(value) <= 128 or not value.isprintable():
        raise argparse.ArgumentTypeError("1 to 128 printable characters")
    return value


_MEDIA_TYPES: dict[str, str] = {"csv": "text/csv", "jsonl": "application/x-ndjson"}


def _token(args: argparse.Namespace) -> str | None:
    """The API token: ``--token-file`` (its first line), else ``FLOORHAND_API_TOKEN``."""
    if args.token_file is not None:
        lines = Path(args.token_file).read_text(encoding="utf-8").splitlines()
        return lines[0].strip() if lines else ""
    return os.environ.get(TOKEN_ENV) or None


def _api_error_lines(source: str, status: int, body: dict[str, Any]) -> list[str]:
    lines = [f"{source}: {status} {body.get('title', '')}: {body.get('detail', '')}"]
    for e in body.get("errors") or ():
        err = formats.RowError(e["line"], e["column"], e["message"], e["kind"], e["id"])
        lines.append(f"  {err.render(source)}")
    lines += [f"  {item}" for item in body.get("refused") or ()]
    return lines


UPLOAD_CHUNK_BYTES = 1 << 20
"""``import --url`` sends the file in pieces this size, a progress line after each."""


def _upload(data: bytes) -> Iterator[bytes]:
    """``data`` in ``UPLOAD_CHUNK_BYTES`` pieces, with progress on stderr; then a line saying
    the controller has it (reading, validating, comparing and applying take seconds at 100k
    rows)."""
    total = len(data)
    view = memoryview(data)
    for start in range(0, total, UPLOAD_CHUNK_BYTES):
        yield bytes(view[start : start + UPLOAD_CHUNK_BYTES])
        sent = min(total, start + UPLOAD_CHUNK_BYTES)
        print(f"catalog: sent {sent}/{total} bytes", file=sys.stderr)
    print("catalog: uploaded; the controller validates and applies it", file=sys.stderr)


def import_to_controller(args: argparse.Namespace) -> int:
    """``import FILE --url URL``: PUT the file to a running controller's API, which validates
    it, journals it as a new version and applies it without a restart (docs/catalogue.md)."""
    path: Path = args.file
    try:
        fmt = formats.format_of(path, args.format)
        data = path.read_bytes()
        token = _token(args)
    except ValueError as exc:
        _err(str(exc))
        return EXIT_INVALID
    except OSError as exc:
        _err(f"{exc.filename}: {exc.strerror or exc}")
        return EXIT_INVALID
    url = args.url.rstrip("/") + "/api/v1/catalog"
    headers = {"Content-Type": _MEDIA_TYPES[fmt], "Content-Length": str(len(data))}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    print(f"catalog: sending {len(data)} bytes to {url}", file=sys.stderr)
    t0 = time.monotonic()
    try:
        r = httpx.put(
            url,
            content=_upload(data),
            headers=headers,
            params={"dry_run": "true"} if args.dry_run else None,
            timeout=args.timeout_s,
            trust_env=False,
        )
    except httpx.TimeoutException:
        _err(
            f"{url}: no answer within {args.timeout_s:g} s (--timeout-s): the controller may "
            "still apply it; GET /api/v1/catalog/versions tells"
        )
        return EXIT_JOURNAL
    except httpx.HTTPError as exc:
        _err(f"{url}: {type(exc).__name__}: {exc}")
        return EXIT_JOURNAL
    try:
        body = r.json()
    except ValueError:
        body = {"detail": r.text[:500]}
    if r.status_code != 200:
        for line in _api_error_lines(str(path), r.status_code, body):
            print(line, file=sys.stderr)
        if r.status_code == 413:
            print(
                f"  the controller takes catalogues up to its [api] catalog_max_body_bytes; "
                f"this file is {len(data)} bytes",
                file=sys.stderr,
            )
        return EXIT_INVALID if r.status_code in (400, 403, 409, 413, 415, 422) else EXIT_JOURNAL
    for line in body.get("lines", ()):
        print(line)
    c = body["counts"]
    what = "dry run: catalogue version" if args.dry_run else "catalogue version"
    print(
        f"{what} {body['from_version']} -> {body['version']}: {c['add']} added, "
        f"{c['remove']} removed, {c['change']} changed"
        + ("; nothing written" if args.dry_run else "")
        + f" ({time.monotonic() - t0:.2f} s)"
    )
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    """Validate FILE against the site's topology; print the diff (``--dry-run``) or write it
    as a new catalogue version into the site's journal. With ``--url``: send it to a running
    controller instead."""
    if args.url is not None:
        return import_to_controller(args)
    if args.site is None:
        _err(
            "catalog import needs --site SITE (into its journal) or --url URL (a running "
            "controller)"
        )
        return EXIT_INVALID
    site = _site(args)
    if site is None:
        return EXIT_INVALID
    if is_inline(site):
        _err(
            f"{args.site} declares the catalogue inline ([[skus]], [[scales]], [[shelves]]): it "
            "is the catalogue, and would replace an imported one at the next start. Export it "
            "(floorhand catalog export), remove those tables, then import (docs/catalogue.md)"
        )
        return EXIT_INVALID
    path: Path = args.file
    source = str(path)
    t0 = time.monotonic()
    try:
        fmt = formats.format_of(path, args.format)
        data = path.read_bytes()
    except ValueError as exc:
        _err(str(exc))
        return EXIT_INVALID
    except OSError as exc:
        _err(f"{path}: {exc.strerror or exc}")
        return EXIT_INVALID

    def read_progress(step: str, n: int) -> None:
        print(f"catalog: {step} {n} rows", file=sys.stderr)

    try:
        catalogue, n_rows = parse(data, fmt, {z.id for z in site.zones}, source, read_progress)
    except formats.CatalogueInvalid as exc:
        print(exc.report(), file=sys.stderr)
        return EXIT_INVALID
    print(
        f"catalog: {n_rows} rows valid ({len(catalogue.skus)} SKU(s), "
        f"{len(catalogue.scales)} scale(s), {len(catalogue.shelves)} shelf(s)) in "
        f"{time.monotonic() - t0:.2f} s",
        file=sys.stderr,
    )
    journal_path = site.journal.path
    if args.dry_run:
        try:
            current = catalog_store.read_journal(journal_path) or Catalogue()
        except JournalError as exc:
            _err(str(exc))
            return EXIT_JOURNAL
        changes = diff(current, catalogue)
        for line in changes.render():
            print(line)
        c = changes.counts()
        print(
            f"dry run: catalogue version {current.version} -> "
            f"{current.version + 1 if changes else current.version}: {c['add']} added, "
            f"{c['remove']} removed, {c['change']} changed; nothing written"
        )
        return EXIT_OK
    journal = Journal(journal_path, synchronous=site.journal.synchronous)
    try:
        journal.lock()
    except JournalLocked:
        _err(
            f"the controller of site {site.site.id} is running (journal {journal_path} is "
            "locked): stop it to import a catalogue"
        )
        return EXIT_RUNNING
    except JournalError as exc:
        _err(str(exc))
        return EXIT_JOURNAL

    def write_progress(done: int, total: int) -> None:
        print(f"catalog: wrote {done}/{total} records", file=sys.stderr)

    try:
        journal.open()
        version, changes = catalog_store.replace(
            journal.db,
            catalogue,
            actor=args.actor or _actor(),
            source=IMPORT_SOURCE,
            detail=str(path.resolve()),
            progress=write_progress,
        )
    except JournalError as exc:
        _err(str(exc))
        return EXIT_JOURNAL
    finally:
        journal.close()
    c = changes.counts()
    print(
        f"catalogue version {version} in {journal_path}: {c['add']} added, {c['remove']} "
        f"removed, {c['change']} changed ({time.monotonic() - t0:.2f} s)"
        + ("" if changes else "; unchanged, no new version")
    )
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    """Write the site's catalogue (inline, or the journal's) as CSV or JSON Lines."""
    site = _site(args)
    if site is None:
        return EXIT_INVALID
    try:
        catalogue = inline_catalogue(site) if is_inline(site) else journal_catalogue(site)
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_INVALID
    except JournalError as exc:
        _err(str(exc))
        return EXIT_JOURNAL
    fmt: formats.Format = "jsonl" if args.format == "jsonl" else "csv"
    out: Path | None = args.out
    if out is None:
        n = formats.write(catalogue, fmt, sys.stdout)
    else:
        try:
            n = _write_file(out, catalogue, fmt)
        except OSError as exc:
            _err(f"{out}: {exc.strerror or exc}")
            return EXIT_JOURNAL
    origin = "the site file" if is_inline(site) else f"journal version {catalogue.version}"
    print(f"catalog: exported {n} records from {origin}", file=sys.stderr)
    return EXIT_OK


def _write_file(out: Path, catalogue: Catalogue, fmt: formats.Format) -> int:
    """Write beside ``out`` and rename over it: a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent or Path("."))
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            n = formats.write(catalogue, fmt, f)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """``floorhand catalog`` and its actions, on the command line's subparsers ``sub``."""
    p_cat = sub.add_parser(
        "catalog", help="the site's catalogue: SKUs, scales, shelves (import, export)",
        parents=parents,
    )  # fmt: skip
    cat = p_cat.add_subparsers(dest="catalog_command", required=True, metavar="ACTION")
    p_imp = cat.add_parser(
        "import",
        help="validate a catalogue file (CSV or JSON Lines) and make it the site's catalogue "
        "(the controller must be stopped)",
        parents=parents,
    )
    p_imp.add_argument("file", type=Path, help="the catalogue file (.csv, .jsonl)")
    p_imp.add_argument("--site", type=Path, help="the site file (TOML): import into its journal")
    p_imp.add_argument(
        "--url",
        help="a running controller's API (http://127.0.0.1:8080): PUT the file there instead",
    )
    p_imp.add_argument(
        "--token-file",
        type=Path,
        help=f"with --url: a file holding the API token (default: env {TOKEN_ENV})",
    )
    p_imp.add_argument(
        "--timeout-s", type=float, default=300.0, help="with --url: bound on the request"
    )
    p_imp.add_argument("--journal", help="override [journal] path (env FLOORHAND_JOURNAL)")
    p_imp.add_argument("--format", choices=formats.FORMATS, help="default: by the suffix")
    p_imp.add_argument(
        "--dry-run", action="store_true", help="print what would change; write nothing"
    )
    p_imp.add_argument(
        "--actor",
        type=_actor_name,
        help="who the audit trail names (default: the operating-system user)",
    )
    p_imp.set_defaults(fn=cmd_import)
    p_exp = cat.add_parser(
        "export", help="write the site's catalogue as CSV or JSON Lines", parents=parents
    )
    p_exp.add_argument("--site", type=Path, required=True, help="the site file (TOML)")
    p_exp.add_argument("--journal", help="override [journal] path (env FLOORHAND_JOURNAL)")
    p_exp.add_argument("--format", choices=formats.FORMATS, default="csv")
    p_exp.add_argument("--out", type=Path, help="the file to write (default: stdout)")
    p_exp.set_defaults(fn=cmd_export)
