"""Optional dependencies: the extras of ``pyproject.toml`` and the error naming the one to
install when a site needs a package the core install leaves out (docs/deployment.md)."""

from __future__ import annotations

import importlib.util

from controller.config import SiteConfig

EXTRAS: dict[str, tuple[str, str]] = {
    "influxdb2": ("influxdb_client", "influxdb-client"),
}
"""extra -> (the module imported, the package that provides it)."""


class MissingExtraError(RuntimeError):
    """A feature the site uses needs a package that is not installed."""


def require(extra: str, what: str) -> None:
    """Raise `MissingExtraError` naming ``floorhand[extra]`` if its package is missing."""
    module, package = EXTRAS[extra]
    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(
            f"{what} needs the {package} package, which is not installed: "
            f"pip install 'floorhand[{extra}]'"
        )


def check_site(site: SiteConfig) -> None:
    """Every optional package the site's configuration needs is installed."""
    if site.history.backend == "influxdb2":
        require("influxdb2", 'the history backend "influxdb2"')
