"""Log lines of ``floorhand run``: ours and uvicorn's through one handler on stderr, in one of
two formats (docs/deployment.md#logs).

``text`` (the default): ``LEVEL logger: message``, prefixed with the local time unless stderr
goes to the systemd journal (``JOURNAL_STREAM`` set), which stamps every line itself.
``json``: one object per line, ``{"ts", "level", "logger", "msg"}`` plus ``"exc"`` (the
traceback) when there is one; ``ts`` is UTC, ISO 8601 with milliseconds.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Final

LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS: Final = ("text", "json")

TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"
TEXT_FORMAT_STAMPED = "%(asctime)s " + TEXT_FORMAT


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, str] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False)


def under_journald() -> bool:
    """stderr is the systemd journal's stream (systemd sets ``JOURNAL_STREAM`` to it)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def formatter(fmt: str) -> logging.Formatter:
    """The formatter of ``fmt`` (one of `FORMATS`)."""
    if fmt == "json":
        return JsonFormatter()
    return logging.Formatter(TEXT_FORMAT if under_journald() else TEXT_FORMAT_STAMPED)


def configure(level: str, fmt: str) -> None:
    """Root logger at ``level``, one stderr handler in format ``fmt``. uvicorn's loggers are
    left to propagate here (``floorhand run`` gives uvicorn no logging config of its own)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
