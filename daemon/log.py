"""Logging with loguru: one stderr sink whose shape depends on who reads it.

- Under journald (systemd sets JOURNAL_STREAM to stderr's device:inode): no timestamp (the
  journal adds its own) and a `<N>` syslog-priority prefix, so `journalctl -p warning` works.
- On a terminal: colour and a short timestamp for a person.
- `format = "json"`: one JSON object per line for log shippers.

Every line goes through `redact()`, a second fence behind the code's own care that an API key
or database password never reaches a log. `diagnose=False`: tracebacks never print variable
values (which could hold a key).
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

import msgspec
from loguru import logger

from .errors import redact

__all__ = ["SYSLOG_PRIORITY", "running_under_journald", "setup_logging"]

# loguru level -> syslog priority (sd-daemon(3) prefixes).
SYSLOG_PRIORITY = {
    "TRACE": 7,
    "DEBUG": 7,
    "INFO": 6,
    "SUCCESS": 5,
    "WARNING": 4,
    "ERROR": 3,
    "CRITICAL": 2,
}
_CONTEXT_KEYS = ("symbol", "timeframe")


def running_under_journald(stream: TextIO) -> bool:
    """True when `stream` is the journal stream systemd connected (JOURNAL_STREAM=dev:ino)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def _context(record: Any) -> str:
    extra = record["extra"]
    parts = [str(extra[k]) for k in _CONTEXT_KEYS if k in extra]
    return f"[{' '.join(parts)}] " if parts else ""


def _redact_patch(record: Any) -> None:
    record["message"] = redact(record["message"])
    record["extra"]["ctx"] = _context(record)


def _json_format(record: Any) -> str:
    line = {
        "ts": record["time"].isoformat(),
        "level": record["level"].name,
        "message": record["message"],
        **{k: v for k, v in record["extra"].items() if k != "ctx"},
    }
    if record["exception"] is not None:
        line["exception"] = redact(str(record["exception"].value))
    record["extra"]["_json"] = msgspec.json.encode(line).decode()
    return "{extra[_json]}\n"


def setup_logging(level: str = "INFO", fmt: str = "text", *, stream: TextIO | None = None) -> None:
    """Replace every sink with the one stderr sink described in the module docstring."""
    stream = stream or sys.stderr
    logger.remove()
    logger.configure(patcher=_redact_patch)
    common: dict[str, Any] = {"level": level.upper(), "backtrace": False, "diagnose": False}
    if fmt == "json":
        logger.add(stream, format=_json_format, colorize=False, **common)
    elif running_under_journald(stream):

        def journal_format(record: Any) -> str:
            record["extra"]["prio"] = SYSLOG_PRIORITY.get(record["level"].name, 6)
            return "<{extra[prio]}>{extra[ctx]}{message}\n{exception}"

        logger.add(stream, format=journal_format, colorize=False, **common)
    else:
        tty = hasattr(stream, "isatty") and stream.isatty()
        text = (
            "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
            "<cyan>{extra[ctx]}</cyan>{message}\n{exception}"
        )
        logger.add(stream, format=text, colorize=tty, **common)
