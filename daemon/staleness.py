"""How stale is a series? Pure functions of (last bar, last complete fetch, now): no clock, no I/O.

Age is counted from the first instant a bar we do not hold *could* have existed, not from the
last bar's timestamp. Why: a daily series ending Friday is current all weekend and on a holiday;
it falls behind only once Monday's session opens (04:00 ET). The market calendar
(`latest_bar_start_ms`) decides what could exist.

A series can also hold every bar there is and still end early: a thin stock has no 5-minute bar
after its last trade of the day. So when the last successful fetch covered up to instant C, no
bar that could exist by C is missing: the reference is the later of the last bar and the newest
bar the market could have produced by C.

Classes (thresholds from `[staleness]`, defaults shown):

    fresh       age < fresh_hours (1)
    aging       fresh_hours <= age < aging_hours (6)
    stale       aging_hours <= age < stale_hours (24)
    very_stale  age >= stale_hours
    missing     no bar ever written
"""

from __future__ import annotations

import attrs

from .config import StalenessConfig
from .market_calendar import is_crypto, latest_bar_start_ms
from .timeframes import Timeframe

__all__ = ["CLASSES", "SeriesAge", "classify", "overdue_since_ms", "series_age"]

CLASSES = ("fresh", "aging", "stale", "very_stale", "missing")


@attrs.frozen
class SeriesAge:
    """One series measured at `now_ms`.

    Attributes:
        expected_bar_ms: Start of the newest bar the market could have produced by now.
        overdue_since_ms: When the first bar we do not hold could have appeared; None when no
            such bar can exist yet (the series is current) or no bar was ever written.
        age_seconds: `now - overdue_since` (0 when current); None when missing.
        cls: One of CLASSES.
    """

    expected_bar_ms: int
    overdue_since_ms: int | None
    age_seconds: float | None
    cls: str


def overdue_since_ms(timeframe: Timeframe, reference_ms: int, now_ms: int, *, crypto: bool
                     ) -> int | None:
    """The first instant in `(reference_ms, now_ms]` at which a bar starting after
    `reference_ms` could exist, or None if none could exist by `now_ms`.

    `latest_bar_start_ms` never decreases with time, so a binary search over the instants finds
    it exactly (about 40 steps for decades; one step for a current series).
    """
    if latest_bar_start_ms(timeframe, now_ms, crypto=crypto) <= reference_ms:
        return None
    lo, hi = reference_ms, now_ms  # invariant: nothing newer by lo, something newer by hi
    if latest_bar_start_ms(timeframe, lo, crypto=crypto) > reference_ms:
        return lo  # only when reference_ms is not itself a bar start (a clock or data oddity)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if latest_bar_start_ms(timeframe, mid, crypto=crypto) > reference_ms:
            hi = mid
        else:
            lo = mid
    return hi


def classify(age_seconds: float | None, thresholds: StalenessConfig) -> str:
    """The class of an age (None: missing)."""
    if age_seconds is None:
        return "missing"
    hours = age_seconds / 3600
    if hours < thresholds.fresh_hours:
        return "fresh"
    if hours < thresholds.aging_hours:
        return "aging"
    if hours < thresholds.stale_hours:
        return "stale"
    return "very_stale"


def series_age(
    symbol: str,
    timeframe: Timeframe,
    last_bar_ms: int | None,
    now_ms: int,
    thresholds: StalenessConfig,
    *,
    checked_through_ms: int | None = None,
) -> SeriesAge:
    """Measure one series.

    Args:
        symbol: The ticker; `X:` pairs trade around the clock, the rest on NYSE days.
        timeframe: The series' bar size.
        last_bar_ms: Start of the newest bar held, None if none was ever written.
        now_ms: The instant to measure at (Unix ms).
        thresholds: The `[staleness]` config.
        checked_through_ms: Up to when the last successful fetch saw every bar, if known.
    """
    crypto = is_crypto(symbol)
    expected = latest_bar_start_ms(timeframe, now_ms, crypto=crypto)
    if last_bar_ms is None:
        return SeriesAge(expected, None, None, "missing")
    reference = last_bar_ms
    if checked_through_ms is not None:
        checked = min(checked_through_ms, now_ms)
        reference = max(reference, latest_bar_start_ms(timeframe, checked, crypto=crypto))
    since = overdue_since_ms(timeframe, reference, now_ms, crypto=crypto)
    age = 0.0 if since is None else (now_ms - since) / 1000
    return SeriesAge(expected, since, age, classify(age, thresholds))
