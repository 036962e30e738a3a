"""Staleness classes at fixed instants: weekends, holidays, thin trading, crypto, thresholds."""

from __future__ import annotations

import datetime as dt

import pytest

from daemon.config import StalenessConfig
from daemon.market_calendar import ET, et_midnight_ms
from daemon.staleness import classify, overdue_since_ms, series_age
from daemon.timeframes import parse_timeframe

DEFAULT = StalenessConfig()
D1, H1, M5, W1 = (parse_timeframe(t) for t in ("1d", "1h", "5m", "1w"))
HOUR = 3600


def et(y: int, m: int, d: int, hh: int = 0, mm: int = 0) -> int:
    """Unix ms of a wall-clock time in New York."""
    return int(dt.datetime(y, m, d, hh, mm, tzinfo=ET).timestamp() * 1000)


def day(y: int, m: int, d: int) -> int:
    """The daily bar of that date (anchored at ET midnight)."""
    return et_midnight_ms(dt.date(y, m, d))


@pytest.mark.parametrize(("hours", "expected"), [
    (0.0, "fresh"), (0.99, "fresh"), (1.0, "aging"), (5.99, "aging"), (6.0, "stale"),
    (23.99, "stale"), (24.0, "very_stale"), (1000.0, "very_stale"), (None, "missing"),
])
def test_classes_at_their_boundaries(hours: float | None, expected: str) -> None:
    assert classify(None if hours is None else hours * HOUR, DEFAULT) == expected


def test_thresholds_are_configurable() -> None:
    tight = StalenessConfig(fresh_hours=0.25, aging_hours=2, stale_hours=4)
    assert [classify(h * HOUR, tight) for h in (0.2, 0.5, 3, 5)] == [
        "fresh", "aging", "stale", "very_stale"]
    # the same series, judged by two configs
    last, now = day(2024, 3, 6), et(2024, 3, 7, 7)  # Thursday's bar due since 04:00: 3 h
    assert series_age("AAPL", D1, last, now, DEFAULT).cls == "aging"
    assert series_age("AAPL", D1, last, now, tight).cls == "stale"


def test_daily_bars_over_a_weekend() -> None:
    friday = day(2024, 2, 9)
    # Saturday and Sunday: no bar after Friday's can exist, whatever the hour
    for now in (et(2024, 2, 10, 12), et(2024, 2, 11, 23, 59), et(2024, 2, 12, 3, 59)):
        age = series_age("AAPL", D1, friday, now, DEFAULT)
        assert (age.cls, age.age_seconds, age.overdue_since_ms) == ("fresh", 0.0, None)
        assert age.expected_bar_ms == friday
    # Monday's bar could exist from the 04:00 pre-market open: that is when the age starts
    monday = series_age("AAPL", D1, friday, et(2024, 2, 12, 4, 30), DEFAULT)
    assert monday.overdue_since_ms == et(2024, 2, 12, 4)
    assert (monday.cls, monday.age_seconds) == ("fresh", 0.5 * HOUR)
    assert series_age("AAPL", D1, friday, et(2024, 2, 12, 10), DEFAULT).cls == "stale"
    # not fetched since Friday, seen on Tuesday evening: very stale
    late = series_age("AAPL", D1, friday, et(2024, 2, 13, 18), DEFAULT)
    assert (late.cls, late.age_seconds) == ("very_stale", 38 * HOUR)


def test_daily_bars_over_holidays() -> None:
    # Good Friday 2024-03-29: Thursday's bar stays current until Monday 04:00
    thursday = day(2024, 3, 28)
    for now in (et(2024, 3, 29, 15), et(2024, 3, 30, 12), et(2024, 4, 1, 3)):
        assert series_age("SPY", D1, thursday, now, DEFAULT).cls == "fresh"
    monday = series_age("SPY", D1, thursday, et(2024, 4, 1, 9), DEFAULT)
    assert (monday.cls, monday.age_seconds) == ("aging", 5 * HOUR)
    # Independence Day on a Thursday, then a normal Friday
    wednesday = day(2024, 7, 3)
    assert series_age("SPY", D1, wednesday, et(2024, 7, 4, 20), DEFAULT).cls == "fresh"
    friday = series_age("SPY", D1, wednesday, et(2024, 7, 5, 12), DEFAULT)
    assert (friday.cls, friday.age_seconds) == ("stale", 8 * HOUR)
    # a one-off closure no rule predicts (2025-01-09, President Carter's funeral)
    assert series_age("SPY", D1, day(2025, 1, 8), et(2025, 1, 9, 16), DEFAULT).cls == "fresh"


def test_intraday_bars_across_the_close_and_the_weekend() -> None:
    last_of_friday = et(2024, 2, 9, 19, 55)  # the last 5-minute bar of the extended session
    assert series_age("AAPL", M5, last_of_friday, et(2024, 2, 10, 12), DEFAULT).cls == "fresh"
    early = series_age("AAPL", M5, last_of_friday, et(2024, 2, 12, 4, 30), DEFAULT)
    assert (early.overdue_since_ms, early.age_seconds) == (et(2024, 2, 12, 4), 0.5 * HOUR)
    # during the session, the next 5-minute bar is due as soon as its minute starts
    during = series_age("AAPL", M5, et(2024, 2, 12, 10, 0), et(2024, 2, 12, 11, 30), DEFAULT)
    assert (during.overdue_since_ms, during.cls) == (et(2024, 2, 12, 10, 5), "aging")
    assert during.expected_bar_ms == et(2024, 2, 12, 11, 30)


def test_a_thin_stock_is_not_stale_when_the_last_fetch_saw_everything() -> None:
    # no trade after 15:30 on Friday, so no bar after it; a fetch at 20:30 proved it
    last, checked = et(2024, 2, 9, 15, 30), et(2024, 2, 9, 20, 30)
    saturday = et(2024, 2, 10, 12)
    assert series_age("THIN", M5, last, saturday, DEFAULT, checked_through_ms=checked).cls == (
        "fresh")
    # without that proof the 15:35 bar has been due since Friday 15:35
    unproven = series_age("THIN", M5, last, saturday, DEFAULT)
    assert (unproven.cls, unproven.age_seconds) == ("stale", (20 * 60 + 25) * 60)
    # the proof only covers what could exist by then: Monday's session opens at 04:00
    monday = series_age("THIN", M5, last, et(2024, 2, 12, 6), DEFAULT, checked_through_ms=checked)
    assert (monday.cls, monday.age_seconds) == ("aging", 2 * HOUR)
    # a fetch ending in the future (a range's `to`) proves nothing beyond now
    assert series_age("THIN", M5, last, saturday, DEFAULT,
                      checked_through_ms=saturday + 10**9).cls == "fresh"


def test_crypto_has_no_weekend() -> None:
    friday = day(2024, 2, 9)
    sunday_noon = et(2024, 2, 11, 12)
    age = series_age("X:BTCUSD", D1, friday, sunday_noon, DEFAULT)
    assert age.overdue_since_ms == day(2024, 2, 10)  # Saturday's bar, from ET midnight
    assert (age.cls, age.age_seconds) == ("very_stale", 36 * HOUR)
    assert series_age("AAPL", D1, friday, sunday_noon, DEFAULT).cls == "fresh"
    hourly = series_age("X:BTCUSD", H1, et(2024, 2, 11, 9), sunday_noon, DEFAULT)
    assert (hourly.overdue_since_ms, hourly.cls) == (et(2024, 2, 11, 10), "aging")


def test_never_written_is_missing_and_weekly_bars_follow_their_bucket() -> None:
    missing = series_age("AAPL", D1, None, et(2024, 2, 12, 12), DEFAULT,
                         checked_through_ms=et(2024, 2, 12, 11))
    assert (missing.cls, missing.age_seconds, missing.overdue_since_ms) == ("missing", None, None)
    # weeks start on Sunday: this week's bar is current until next week's first session
    this_week = et_midnight_ms(dt.date(2024, 2, 11))
    assert series_age("AAPL", W1, this_week, et(2024, 2, 16, 18), DEFAULT).cls == "fresh"
    assert series_age("AAPL", W1, this_week, et(2024, 2, 19, 12), DEFAULT).cls == "fresh"
    next_week = series_age("AAPL", W1, this_week, et(2024, 2, 20, 12), DEFAULT)
    # Monday 2024-02-19 is Presidents' Day: next week's first session is Tuesday 04:00
    assert (next_week.overdue_since_ms, next_week.cls) == (et(2024, 2, 20, 4), "stale")


def test_overdue_since_is_exact_to_the_millisecond() -> None:
    ref = et(2024, 2, 12, 10, 0)
    assert overdue_since_ms(M5, ref, et(2024, 2, 12, 10, 4), crypto=False) is None
    assert overdue_since_ms(M5, ref, et(2024, 2, 12, 10, 5), crypto=False) == et(2024, 2, 12,
                                                                                  10, 5)
    # a reference years back still takes a handful of steps and lands on the next bar
    old = day(2019, 6, 3)
    assert overdue_since_ms(D1, old, et(2024, 2, 12, 12), crypto=False) == et(2019, 6, 4, 4)
