"""The start rule: which catalogue a controller runs with (docs/catalogue.md, "At start").

A site file that declares any of ``[[skus]]``, ``[[scales]]``, ``[[shelves]]`` inline holds the
catalogue (validated with the file; journaled as a new version, source ``site file``, when it
differs from the journal's). A site file that declares none runs with the journal's catalogue,
read in one pass without validating its rows again (they were validated on import); only their
zones are checked against the site file's. A site with neither does not start.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable

from controller.adapters import catalog_store
from controller.catalog.records import Catalogue
from controller.config import ConfigError, SiteConfig
from controller.ports import JournalError

log = logging.getLogger("floorhand.catalog")

SITE_FILE_SOURCE = "site file"
"""The audit source of a catalogue declared inline in the site file."""


class NoCatalogue(ConfigError):
    """Neither the site file nor the journal holds a catalogue."""


def is_inline(site: SiteConfig) -> bool:
    """Whether the site file declares the catalogue inline."""
    return bool(site.skus or site.scales or site.shelves)


def inline_catalogue(site: SiteConfig) -> Catalogue:
    return Catalogue(site.skus, site.scales, site.shelves)


def journal_catalogue(site: SiteConfig) -> Catalogue:
    """The catalogue of the site's journal (read-only), its zones checked against the site's;
    NoCatalogue when the journal holds none, ConfigError for an unknown zone."""
    path = site.journal.path
    catalogue = catalog_store.read_journal(path)
    if catalogue is None:
        raise NoCatalogue(
            str(path),
            [
                (
                    "catalogue",
                    "the site file declares no [[skus]], [[scales]] or [[shelves]] and the "
                    "journal holds no catalogue: import one with "
                    "`floorhand catalog import FILE --site SITE` (docs/catalogue.md)",
                )
            ],
        )
    zones = {z.id for z in site.zones}
    errors: list[tuple[str, str]] = []
    for kind, located in (("scale", catalogue.scales), ("shelf", catalogue.shelves)):
        for model in located:
            if model.zone not in zones:
                errors.append(
                    (f"catalogue {kind} {model.id}", f"zone {model.zone!r} is not in the site file")
                )
    if errors:
        raise ConfigError(f"{path} (catalogue version {catalogue.version})", errors)
    return catalogue


def with_catalogue(site: SiteConfig) -> tuple[SiteConfig, int]:
    """The site the controller runs and the journal's catalogue version it holds: ``site``
    itself (version 0) when it declares the catalogue inline, else its topology with the
    journal's catalogue (no validation: one pass over the rows)."""
    if is_inline(site):
        return site, 0
    t0 = time.monotonic()
    catalogue = journal_catalogue(site)
    fields = {name: getattr(site, name) for name in SiteConfig.model_fields}
    fields.update(skus=catalogue.skus, scales=catalogue.scales, shelves=catalogue.shelves)
    out = SiteConfig.model_construct(**fields)
    log.info(
        "catalogue version %d from the journal: %d SKU(s), %d scale(s), %d shelf(s) in %.0f ms",
        catalogue.version,
        len(catalogue.skus),
        len(catalogue.scales),
        len(catalogue.shelves),
        (time.monotonic() - t0) * 1000,
    )
    return out, catalogue.version


def settle_catalogue(
    site: SiteConfig, db: sqlite3.Connection, started_with: int, clock: Callable[[], float]
) -> int:
    """At start, with the journal open and locked: journal an inline catalogue as a new version
    when it differs from the journal's; for a journal catalogue, check it is still the version
    the runtime was built with; delete the audit rows older than ``[journal]
    catalog_audit_keep_days``. Returns the catalogue version in force.

    ``started_with`` (`with_catalogue`'s version) tells which: 0 for an inline catalogue, the
    journal's version (≥ 1) for the journal's. ``site`` itself cannot tell: the runtime's site
    holds the journal's catalogue merged in, and comparing it with the journal again at every
    start cost seconds at site size."""
    try:
        trimmed = catalog_store.keep_audit(db, site.journal.catalog_audit_keep_days, clock)
    except JournalError as exc:  # the next start or version trims it
        log.error("%s", exc)
        trimmed = 0
    if trimmed:
        log.info(
            "catalogue audit: %d row(s) older than %g day(s) deleted",
            trimmed,
            site.journal.catalog_audit_keep_days,
        )
    if started_with == 0 and is_inline(site):
        version, changes = catalog_store.replace(
            db,
            inline_catalogue(site),
            actor="controller",
            source=SITE_FILE_SOURCE,
            detail="[[skus]], [[scales]], [[shelves]] of the site file",
            clock=clock,
        )
        if changes:
            c = changes.counts()
            log.info(
                "catalogue version %d from the site file: %d added, %d removed, %d changed",
                version,
                c["add"],
                c["remove"],
                c["change"],
            )
        return version
    version = catalog_store.current_version(db)
    if version != started_with:
        raise JournalError(
            f"the catalogue of journal {site.journal.path} changed while the controller started "
            f"(version {started_with} -> {version}): start it again"
        )
    return version
