"""Logging with loguru: one stderr sink whose shape depends on who reads it.

- Under journald (systemd sets JOURNAL_STREAM to stderr's device:inode): no timestamp (the
  journal adds its own) and a `<N>` syslog-priority prefix, so `journalctl -p warning` works;
  every line of a traceback carries the prefix too (journald stores each line as an entry).
- On a terminal: colour and a short timestamp for a person.
- `format = "json"`: one JSON object per line for log shippers (behind the `<N>` prefix under
  journald).

Lines about a job carry `[SYMBOL TIMEFRAME]` (text) or `"symbol"`/`"timeframe"` keys (json):
bind them with `logger.bind(symbol=..., timeframe=...)`.

Every line, traceback included, goes through `redact()`, a second fence behind the code's own
care that an API key or database password never reaches a log. `diagnose=False`: tracebacks
never print variable values (which could hold a key).
"""

from __future__ import annotations

import os
import sys
import traceback
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


def _traceback(record: Any) -> str:
    """The record's traceback as plain, redacted text ("" when it has none)."""
    exc = record["exception"]
    if exc is None or exc.type is None:
        return ""
    return redact("".join(traceback.format_exception(exc.type, exc.value, exc.traceback)))


def _redact_patch(record: Any) -> None:
    record["message"] = redact(record["message"])
    record["extra"]["ctx"] = _context(record)
    record["extra"]["_exc"] = _traceback(record)


def _json_format(record: Any) -> str:
    line = {
        "ts": record["time"].isoformat(),
        "level": record["level"].name,
        "message": record["message"],
        **{k: v for k, v in record["extra"].items() if k != "ctx" and not k.startswith("_")},
    }
    if record["exception"] is not None:
        line["exception"] = redact(str(record["exception"].value))
        line["traceback"] = record["extra"]["_exc"]
    record["extra"]["_json"] = msgspec.json.encode(line, enc_hook=str).decode()
    return "{extra[_json]}\n"


# Format functions, not strings: loguru appends its own (unredacted) "{exception}" to a string.
def _text_format(record: Any) -> str:
    del record
    return ("<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
            "<cyan>{extra[ctx]}</cyan>{message}\n{extra[_exc]}")


def _journal_json_format(record: Any) -> str:
    """A JSON line behind its `<N>` (journald strips the prefix and keeps the priority)."""
    record["extra"]["_prio"] = SYSLOG_PRIORITY.get(record["level"].name, 6)
    return "<{extra[_prio]}>" + _json_format(record)


def _journal_format(record: Any) -> str:
    prio = SYSLOG_PRIORITY.get(record["level"].name, 6)
    record["extra"]["_prio"] = prio
    tb = record["extra"]["_exc"]
    if tb:
        record["extra"]["_exc"] = "".join(f"<{prio}>{line}\n" for line in tb.splitlines())
    return "<{extra[_prio]}>{extra[ctx]}{message}\n{extra[_exc]}"


def setup_logging(level: str = "INFO", fmt: str = "text", *, stream: TextIO | None = None) -> None:
    """Replace every sink with the one stderr sink described in the module docstring."""
    stream = stream or sys.stderr
    logger.remove()
    logger.configure(patcher=_redact_patch)
    common: dict[str, Any] = {"level": level.upper(), "backtrace": False, "diagnose": False}
    journald = running_under_journald(stream)
    if fmt == "json":
        json_format = _journal_json_format if journald else _json_format
        logger.add(stream, format=json_format, colorize=False, **common)
    elif journald:
        logger.add(stream, format=_journal_format, colorize=False, **common)
    else:
        tty = hasattr(stream, "isatty") and stream.isatty()
        logger.add(stream, format=_text_format, colorize=tty, **common)
