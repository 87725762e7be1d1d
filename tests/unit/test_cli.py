"""The ``floorhand`` command line through a real subprocess: --version, usage errors (exit 2,
no traceback) for every bad flag, help text without reStructuredText markup."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.sites import write_small_site

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def floorhand(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=60,
    )


def test_version_is_the_package_version() -> None:
    done = floorhand("--version")
    assert (done.returncode, done.stdout) == (0, f"floorhand {version('floorhand')}\n"), done


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return write_small_site(tmp_path, mqtt_port=1883)


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--log-level", "FOO", "check-config"], {}, [*LEVELS, "--log-level", "FOO"]),
        (["check-config"], {"FLOORHAND_LOG_LEVEL": "loud"}, [*LEVELS, "FLOORHAND_LOG_LEVEL"]),
        (["--log-format", "xml", "check-config"], {}, ["text", "json", "--log-format"]),
        (["check-config"], {"FLOORHAND_LOG_FORMAT": "xml"}, ["text", "json"]),
        (["run", "--api-bind", "nonsense"], {}, ["api.bind", "HOST:PORT"]),
        (["run", "--mqtt-url", "ftp://broker"], {}, ["mqtt.url", "mqtt://"]),
        (["run", "--no-such-flag"], {}, ["unrecognized arguments: --no-such-flag"]),
        (["frobnicate"], {}, ["invalid choice: 'frobnicate'", "run", "check-config"]),
    ],
)
def test_a_bad_flag_is_a_usage_error(
    site: Path, args: list[str], env: dict[str, str], expected: list[str]
) -> None:
    done = floorhand(*args, str(site), env=env)
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr, done.stderr
    for text in expected:
        assert text in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["token", "bad name", "--role", "floor"], "letters, digits"),
        (["token", "ops", "--role", "boss"], "'floor', 'supervisor', 'engineer'"),
        (["token", "ops"], "--role"),
        (["run"], "site"),
    ],
)
def test_bad_command_arguments_are_usage_errors(args: list[str], expected: str) -> None:
    done = floorhand(*args)
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr, done.stderr
    assert expected in done.stderr, done.stderr
    assert done.stdout == ""  # nothing printed as if it had worked (no token)


@pytest.mark.parametrize("command", [[], ["run"], ["check-config"], ["token"]])
def test_help_has_no_rst_markup(command: list[str]) -> None:
    done = floorhand(*command, "--help")
    assert done.returncode == 0, done
    assert "usage: floorhand" in done.stdout
    assert "``" not in done.stdout, done.stdout


def test_global_flags_also_work_after_the_command(site: Path) -> None:
    """``floorhand check-config SITE --log-level DEBUG`` is what people type; it used to be a
    usage error (global flags were accepted before the command only)."""
    done = floorhand("check-config", str(site), "--log-level", "debug", "--log-format", "json")
    assert done.returncode == 0, done
    bad = floorhand("check-config", str(site), "--log-level", "loud")
    assert bad.returncode == 2, bad
    assert "--log-level" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr, bad.stderr


def test_a_closed_stdout_pipe_is_no_traceback(site: Path) -> None:
    """``floorhand check-config SITE | head -1``: the reader went away before the summary was
    written; the command ends quietly (exit 1 as Python's own recipe), no BrokenPipeError
    traceback. The pipe's read end is closed before the process starts, so the first write
    fails for certain."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "controller", "check-config", str(site)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1, done
