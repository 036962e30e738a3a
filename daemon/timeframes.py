"""Timeframes: the `N + m|h|d|w|mo` grammar of the config, mapped to the API's multiplier/timespan.

A timeframe is stored in the database by its canonical label (`"5m"`, `"1h"`, `"1d"`), so the
label is the identity; the API only ever sees `multiplier` and `timespan`.
"""

from __future__ import annotations

import re

import attrs

__all__ = ["Timeframe", "parse_timeframe"]

_GRAMMAR = re.compile(r"^([1-9][0-9]{0,3})(mo|m|h|d|w)$")

_TIMESPAN = {"m": "minute", "h": "hour", "d": "day", "w": "week", "mo": "month"}
_UNIT_MS = {
    "m": 60_000,
    "h": 3_600_000,
    "d": 86_400_000,
    "w": 7 * 86_400_000,
    "mo": 31 * 86_400_000,  # an upper bound: used only for overlap windows
}


@attrs.frozen(order=True)
class Timeframe:
    """One bar size, e.g. `Timeframe(5, "m")` for five-minute bars."""

    multiplier: int
    unit: str

    @property
    def label(self) -> str:
        return f"{self.multiplier}{self.unit}"

    @property
    def timespan(self) -> str:
        """The API's timespan word: minute, hour, day, week, month."""
        return _TIMESPAN[self.unit]

    @property
    def approx_ms(self) -> int:
        """Length of one bar in ms (months counted as 31 days); for windows, not alignment."""
        return self.multiplier * _UNIT_MS[self.unit]

    @property
    def intraday(self) -> bool:
        """True when `limit` counts minute aggregates (minute and hour timespans)."""
        return self.unit in ("m", "h")

    def __str__(self) -> str:
        return self.label


def parse_timeframe(text: str) -> Timeframe:
    """Parse `"15m"`, `"4h"`, `"1d"`, `"1w"`, `"1mo"`; raise ValueError saying the grammar."""
    match = _GRAMMAR.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f"{text!r} is not a timeframe: expected a number 1-9999 followed by "
            "m (minute), h (hour), d (day), w (week) or mo (month), e.g. \"5m\" or \"1d\""
        )
    return Timeframe(int(match.group(1)), match.group(2))
