"""Where a command's log goes, and in what form: set up once, by the ``obsflow`` app's
options (``-v``, ``--log-level``, ``--log-format``, ``--log-file``).

- On a terminal: rich's handler on stderr (colour, aligned).
- Under systemd (``$JOURNAL_STREAM`` names stderr): plain lines, each with the
  ``<N>`` syslog priority prefix journald reads as the line's level, so
  ``journalctl -p warning -u obsflow`` filters by level (no journald library needed).
- ``--log-format json``: one JSON object a line (time, level, logger, message, and
  the record's context such as ``run_id``/``archive_id``), for a log collector.
- ``--log-file PATH``: the same lines appended to a file as well (plain or JSON).

The JSON formatter is a few lines of the standard library's ``logging.Formatter``;
python-json-logger would do the same with a dependency more.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

from rich.console import Console
from rich.logging import RichHandler


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


_PLAIN: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_SYSLOG: Final = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}
# the attributes every LogRecord has: what is not among them is the caller's context
_STANDARD: Final = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``time`` (UTC, ISO), ``level``, ``logger``, ``message``,
    the context given as ``extra=`` (``run_id``, ``archive_id``, ...) and, after an
    exception, ``exception`` (its traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                data[key] = value if isinstance(value, str | int | float | bool) else str(value)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


class _JournalFormatter(logging.Formatter):
    """A plain line with the syslog priority prefix journald turns into its level."""

    def format(self, record: logging.LogRecord) -> str:
        priority = _SYSLOG.get(record.levelno, 3 if record.levelno > logging.ERROR else 6)
        return f"<{priority}>{super().format(record)}"


def under_journald() -> bool:
    """True when stderr is the journal's stream (systemd sets ``$JOURNAL_STREAM`` to its
    device and inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    if not device or not inode:
        return False
    try:
        stat = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return f"{stat.st_dev}:{stat.st_ino}" == stream


def configure(level: int, fmt: LogFormat, file: Path | None, console: Console) -> None:
    """Set up the root logger once for this process (see the module's docstring)."""
    handlers: list[logging.Handler] = []
    if fmt is LogFormat.JSON:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(JsonFormatter())
        handlers.append(stream)
    elif under_journald():
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
        handlers.append(stream)
    else:
        handlers.append(RichHandler(console=console, show_path=False))
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(file, encoding="utf-8")
        to_file.setFormatter(
            JsonFormatter() if fmt is LogFormat.JSON else logging.Formatter(_PLAIN)
        )
        handlers.append(to_file)
    logging.basicConfig(
        level=level, format="%(name)s: %(message)s", datefmt="[%X]", handlers=handlers
    )
