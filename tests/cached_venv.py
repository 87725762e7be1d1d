"""Pinned Python tools the slow tests run from virtualenvs of their own (their pins would clash
with ours), installed with pip from the package index on first use and cached across runs
under ``~/.cache/floorhand/``: one virtualenv per package, version and Python version."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/floorhand`` (default ``~/.cache/floorhand``)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "floorhand"


def venv_dir(package: str, version: str) -> Path:
    """Where ``ensure_venv`` keeps ``package==version`` for the running Python version."""
    py = f"py{sys.version_info.major}.{sys.version_info.minor}"
    return cache_dir() / f"{package}-{version}-{py}"


def install(command: Sequence[str], timeout_s: float, cwd: Path | None = None) -> None:
    """Run an installer command; RuntimeError with the tail of its output when it fails."""
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed ({done.returncode}):\n"
            f"{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )


def ensure_venv(
    package: str, version: str, timeout_s: float, pip_args: Sequence[str] = ()
) -> tuple[Path, float]:
    """The virtualenv holding ``package==version``, made with this Python and installed with
    pip on first use (``pip_args`` go to ``pip install``). Returns it and the seconds this call
    spent installing (0.0 when cached). Raises RuntimeError with pip's output when the install
    fails."""
    venv = venv_dir(package, version)
    python = venv / "bin" / "python"
    stamp = venv / ".floorhand-installed"
    if stamp.exists() and python.exists():
        return venv, 0.0
    venv.parent.mkdir(parents=True, exist_ok=True)
    with (venv.parent / f"{venv.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be installing it right now
        if stamp.exists() and python.exists():
            return venv, 0.0
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
        install([*pip, "install", "--quiet", *pip_args, f"{package}=={version}"], timeout_s)
        stamp.write_text(f"{package}=={version}\n")
        return venv, time.monotonic() - started
