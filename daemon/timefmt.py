"""Time, as the daemon shows it: one way to format instants and ages for people and JSON.

Three clocks meet here. The database and the API speak Unix milliseconds or `timestamptz`; the
scheduler keeps `trio.current_time()` (monotonic, and virtual under MockClock) for everything it
waits on; people read UTC wall time. Every conversion is a function in this module so the status
endpoint, the CLI, the monitoring rows and the STATUS= line print the same thing the same way.
"""

from __future__ import annotations

import datetime as dt
import time

__all__ = ["human_age", "iso", "iso_dt", "iso_ms", "utc", "wall_clock"]


def wall_clock() -> float:
    """Unix seconds now (the one place the daemon reads the wall clock for display)."""
    return time.time()


def utc(unix_seconds: float) -> dt.datetime:
    """An aware UTC datetime for Unix seconds (what psycopg sends as timestamptz)."""
    return dt.datetime.fromtimestamp(unix_seconds, dt.UTC)


def iso(unix_seconds: float | None) -> str | None:
    """`2026-11-23T01:38:14.351Z` for Unix seconds; None stays None."""
    if unix_seconds is None:
        return None
    return iso_dt(utc(unix_seconds))


def iso_ms(ms: int | None) -> str | None:
    """`iso` for Unix milliseconds, exact (no float rounding of the milliseconds)."""
    if ms is None:
        return None
    return iso_dt(dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(milliseconds=ms))


def iso_dt(value: dt.datetime | None) -> str | None:
    """`iso` for an aware datetime (a timestamptz read from PostgreSQL)."""
    if value is None:
        return None
    text = value.astimezone(dt.UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def human_age(seconds: float | None) -> str:
    """`42s`, `5m`, `3h 12m`, `2d 4h`; `-` for None."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86_400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86_400}d {s % 86_400 // 3600}h"
