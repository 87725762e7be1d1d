"""What this controller is: the installed release (``floorhand --version``,
``floorhand_build_info``)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version


def version() -> str:
    """The installed package's version (importlib.metadata)."""
    try:
        return dist_version("floorhand")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"
