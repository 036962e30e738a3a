"""The US equity market calendar as pure functions: holidays by rule, ET midnights, sessions.

Why computed and not fetched: the daemon, the simulator and the staleness check must agree on
which days have bars without a network call or a yearly data update. NYSE holidays follow fixed
rules (Good Friday from the Easter computus); one-off closures (national days of mourning,
storms) are listed in `SPECIAL_CLOSURES`, since no rule predicts them.

Time conventions, shared with the simulator so both sides count the same bars:

- A day's bars are anchored at 00:00 America/New_York (05:00Z in winter, 04:00Z in summer).
- The extended session is 04:00-20:00 ET on trading days (early closes are not modelled).
- Intraday buckets are counted in elapsed minutes from ET midnight, so on the two DST Sundays a
  24-hour (crypto) day has 23 or 25 hours and its last bucket is cut at the next midnight.
- Crypto (`X:` tickers) trades every day, around the clock.
"""

from __future__ import annotations

import datetime as dt
import functools
from zoneinfo import ZoneInfo

from .timeframes import Timeframe

__all__ = [
    "ET",
    "SESSION_CLOSE_MINUTE",
    "SESSION_OPEN_MINUTE",
    "SPECIAL_CLOSURES",
    "bucket_start_day",
    "day_length_minutes",
    "easter",
    "et_date",
    "et_datetime",
    "et_midnight_ms",
    "is_crypto",
    "is_trading_day",
    "latest_bar_start_ms",
    "nyse_holidays",
    "previous_trading_day",
]

ET = ZoneInfo("America/New_York")
# The extended session, in minutes after ET midnight: pre-market opens 04:00, post closes 20:00.
SESSION_OPEN_MINUTE = 4 * 60
SESSION_CLOSE_MINUTE = 20 * 60
# Unscheduled full-day NYSE closures since 2000; rules cannot predict these.
SPECIAL_CLOSURES = frozenset(
    {
        dt.date(2001, 9, 11), dt.date(2001, 9, 12), dt.date(2001, 9, 13), dt.date(2001, 9, 14),
        dt.date(2004, 6, 11),  # President Reagan's funeral
        dt.date(2007, 1, 2),  # President Ford's funeral
        dt.date(2012, 10, 29), dt.date(2012, 10, 30),  # Hurricane Sandy
        dt.date(2018, 12, 5),  # President G. H. W. Bush's funeral
        dt.date(2025, 1, 9),  # President Carter's funeral
    }
)
# Juneteenth became an NYSE holiday in 2022.
JUNETEENTH_FIRST_YEAR = 2022
# Week buckets are counted from this Sunday, month buckets from January of year 0.
_EPOCH_SUNDAY = dt.date(1970, 1, 4)
_UNIX_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()
_DAY_MS = 86_400_000
_MINUTE_MS = 60_000
# Bounded memo sizes: holiday sets per year and ET midnights per day (a few decades' worth).
_YEARS_CACHED = 256
_DAYS_CACHED = 16_384


def easter(year: int) -> dt.date:
    """Western Easter Sunday of `year` (the anonymous Gregorian computus)."""
    a, b, c = year % 19, year // 100, year % 100
    d, e = divmod(b, 4)
    f = (b + 8) // 25
    g = (b - f + 1) // 3
    h = (19 * a + b - d - g + 15) % 30
    i, k = divmod(c, 4)
    ll = (32 + 2 * e + 2 * i - h - k) % 7
    m = (a + 11 * h + 22 * ll) // 451
    month, day = divmod(h + ll - 7 * m + 114, 31)
    return dt.date(year, month, day + 1)


def _nth_weekday(year: int, month: int, weekday: int, n: int) -> dt.date:
    """The n-th `weekday` (Mon=0) of a month; n=-1 is the last one."""
    if n > 0:
        first = dt.date(year, month, 1)
        return first + dt.timedelta(days=(weekday - first.weekday()) % 7 + 7 * (n - 1))
    last = dt.date(year + month // 12, month % 12 + 1, 1) - dt.timedelta(days=1)
    return last - dt.timedelta(days=(last.weekday() - weekday) % 7)


def _observed(day: dt.date) -> dt.date:
    """Saturday holidays are observed the Friday before, Sunday ones the Monday after."""
    if day.weekday() == 5:
        return day - dt.timedelta(days=1)
    if day.weekday() == 6:
        return day + dt.timedelta(days=1)
    return day


@functools.lru_cache(maxsize=_YEARS_CACHED)
def _holidays(year: int) -> frozenset[dt.date]:
    days = {
        _nth_weekday(year, 1, 0, 3),  # Martin Luther King Jr. Day
        _nth_weekday(year, 2, 0, 3),  # Washington's Birthday
        easter(year) - dt.timedelta(days=2),  # Good Friday
        _nth_weekday(year, 5, 0, -1),  # Memorial Day
        _observed(dt.date(year, 7, 4)),
        _nth_weekday(year, 9, 0, 1),  # Labor Day
        _nth_weekday(year, 11, 3, 4),  # Thanksgiving
        _observed(dt.date(year, 12, 25)),
    }
    new_year = dt.date(year, 1, 1)
    if new_year.weekday() != 5:  # on a Saturday it is not observed (Dec 31 stays open)
        days.add(_observed(new_year))
    if year >= JUNETEENTH_FIRST_YEAR:
        days.add(_observed(dt.date(year, 6, 19)))
    return frozenset(days)


def nyse_holidays(year: int) -> set[dt.date]:
    """The NYSE's full-day holidays of `year`, as observed, computed by rule.

    One-off closures are not holidays; `is_trading_day` also excludes `SPECIAL_CLOSURES`.
    """
    return set(_holidays(year))


def is_crypto(ticker: str) -> bool:
    """Crypto pairs (`X:BTCUSD`) trade every day, 24 hours; everything else follows the NYSE."""
    return ticker.startswith("X:")


def is_trading_day(day: dt.date, *, crypto: bool = False) -> bool:
    """True when the market has a session on `day` (always, for crypto)."""
    if crypto:
        return True
    return day.weekday() < 5 and day not in _holidays(day.year) and day not in SPECIAL_CLOSURES


def previous_trading_day(day: dt.date, *, crypto: bool = False) -> dt.date:
    """The latest trading day on or before `day`."""
    while not is_trading_day(day, crypto=crypto):
        day -= dt.timedelta(days=1)
    return day


@functools.lru_cache(maxsize=_DAYS_CACHED)
def et_midnight_ms(day: dt.date) -> int:
    """Unix ms of 00:00 America/New_York on `day`: where that day's daily bar is anchored."""
    offset = ET.utcoffset(dt.datetime(day.year, day.month, day.day))
    assert offset is not None
    return (day.toordinal() - _UNIX_EPOCH_ORDINAL) * _DAY_MS - offset // dt.timedelta(
        milliseconds=1
    )


def et_datetime(ms: int) -> dt.datetime:
    """The aware ET datetime of a Unix ms timestamp."""
    seconds, millis = divmod(ms, 1000)
    return dt.datetime.fromtimestamp(seconds, ET) + dt.timedelta(milliseconds=millis)


def et_date(ms: int) -> dt.date:
    """The ET calendar date a Unix ms timestamp falls on (the day whose bars it belongs to)."""
    guess = dt.date.fromordinal(_UNIX_EPOCH_ORDINAL + ms // _DAY_MS)
    # ET is 4-5 hours behind UTC: the ET date is the UTC date or the one before.
    if ms < et_midnight_ms(guess):
        return guess - dt.timedelta(days=1)
    return guess


def day_length_minutes(day: dt.date) -> int:
    """Minutes from ET midnight to the next: 1440, or 1380/1500 on the DST Sundays."""
    return (et_midnight_ms(day + dt.timedelta(days=1)) - et_midnight_ms(day)) // _MINUTE_MS


def bucket_start_day(timeframe: Timeframe, day: dt.date) -> dt.date:
    """First calendar day of the day/week/month bucket holding `day`.

    Multi-day buckets count whole days from 1970-01-01, weeks start on Sunday and count from
    1970-01-04, months count from January of year 0, so a bucket never depends on a query.
    """
    mult = timeframe.multiplier
    if timeframe.unit == "d":
        index = day.toordinal() - _UNIX_EPOCH_ORDINAL
        return day - dt.timedelta(days=index % mult)
    if timeframe.unit == "w":
        weeks = (day.toordinal() - _EPOCH_SUNDAY.toordinal()) // 7
        return _EPOCH_SUNDAY + dt.timedelta(weeks=weeks - weeks % mult)
    if timeframe.unit == "mo":
        months = day.year * 12 + day.month - 1
        months -= months % mult
        return dt.date(months // 12, months % 12 + 1, 1)
    raise ValueError(f"{timeframe} is intraday: buckets are minutes after ET midnight")


def latest_bar_start_ms(timeframe: Timeframe, now_ms: int, *, crypto: bool = False) -> int:
    """Start (`t`) of the most recent bar the market could have produced by `now_ms`.

    Why: a series is stale only if a bar that could exist is missing. Over a weekend or holiday
    the newest possible daily bar is the last session's, so a daily series ending Friday is
    current on Sunday. A bar "could exist" once a session minute inside it has begun: equities
    trade 04:00-20:00 ET on trading days, crypto always.
    """
    day = et_date(now_ms)
    minute = (now_ms - et_midnight_ms(day)) // _MINUTE_MS
    if not crypto:
        if not is_trading_day(day) or minute < SESSION_OPEN_MINUTE:
            day = previous_trading_day(day - dt.timedelta(days=1))
            minute = SESSION_CLOSE_MINUTE - 1
        minute = min(minute, SESSION_CLOSE_MINUTE - 1)
    if timeframe.intraday:
        size = timeframe.multiplier * (60 if timeframe.unit == "h" else 1)
        return et_midnight_ms(day) + (minute - minute % size) * _MINUTE_MS
    return et_midnight_ms(bucket_start_day(timeframe, day))
