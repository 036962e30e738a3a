"""daemon.market_calendar with fixed dates: holidays, DST, weekends, the newest possible bar."""

from __future__ import annotations

import datetime as dt

import pytest

from daemon.market_calendar import (
    day_length_minutes,
    easter,
    et_date,
    et_datetime,
    et_midnight_ms,
    is_trading_day,
    latest_bar_start_ms,
    nyse_holidays,
    previous_trading_day,
)
from daemon.timeframes import parse_timeframe

D = dt.date


def utc_ms(*args: int) -> int:
    return int(dt.datetime(*args, tzinfo=dt.UTC).timestamp() * 1000)


def et_ms(day: dt.date, hour: int, minute: int = 0) -> int:
    return et_midnight_ms(day) + (hour * 60 + minute) * 60_000


def test_2024_holidays_exactly() -> None:
    assert nyse_holidays(2024) == {
        D(2024, 1, 1), D(2024, 1, 15), D(2024, 2, 19), D(2024, 3, 29), D(2024, 5, 27),
        D(2024, 6, 19), D(2024, 7, 4), D(2024, 9, 2), D(2024, 11, 28), D(2024, 12, 25),
    }


def test_2025_holidays_exactly() -> None:
    assert nyse_holidays(2025) == {
        D(2025, 1, 1), D(2025, 1, 20), D(2025, 2, 17), D(2025, 4, 18), D(2025, 5, 26),
        D(2025, 6, 19), D(2025, 7, 4), D(2025, 9, 1), D(2025, 11, 27), D(2025, 12, 25),
    }
    # President Carter's day of mourning: closed, but not a holiday by rule
    assert not is_trading_day(D(2025, 1, 9))


def test_observance_rules() -> None:
    h2021, h2022 = nyse_holidays(2021), nyse_holidays(2022)
    assert D(2021, 12, 24) in h2021  # Christmas on Saturday: Friday off
    assert D(2021, 12, 31) not in h2021  # New Year 2022 on Saturday: not observed
    assert not any(d.month == 1 and d.day == 1 for d in h2022)
    assert D(2022, 6, 20) in h2022  # Juneteenth on Sunday: Monday off
    assert D(2022, 12, 26) in h2022
    assert not any(d.month == 6 and d.day in (18, 19, 20) for d in h2021)  # before 2022
    assert D(2027, 6, 18) in nyse_holidays(2027)  # Juneteenth on Saturday: Friday off
    assert D(2023, 1, 2) in nyse_holidays(2023)  # New Year on Sunday: Monday off


@pytest.mark.parametrize(("year", "sunday"), [(2000, D(2000, 4, 23)), (2019, D(2019, 4, 21)),
                                              (2024, D(2024, 3, 31)), (2025, D(2025, 4, 20)),
                                              (2038, D(2038, 4, 25))])
def test_easter_and_good_friday(year: int, sunday: dt.date) -> None:
    assert easter(year) == sunday
    good_friday = sunday - dt.timedelta(days=2)
    assert good_friday in nyse_holidays(year)
    assert not is_trading_day(good_friday)
    assert is_trading_day(good_friday, crypto=True)


def test_weekend() -> None:
    assert [is_trading_day(D(2024, 1, d)) for d in range(5, 9)] == [True, False, False, True]
    assert previous_trading_day(D(2024, 1, 7)) == D(2024, 1, 5)
    assert previous_trading_day(D(2024, 4, 1)) == D(2024, 4, 1)
    assert previous_trading_day(D(2024, 3, 31)) == D(2024, 3, 28)  # over Good Friday


def test_et_midnight_across_dst() -> None:
    assert et_midnight_ms(D(2024, 3, 9)) == utc_ms(2024, 3, 9, 5)
    assert et_midnight_ms(D(2024, 3, 10)) == utc_ms(2024, 3, 10, 5)  # DST starts 02:00 that day
    assert et_midnight_ms(D(2024, 3, 11)) == utc_ms(2024, 3, 11, 4)
    assert et_midnight_ms(D(2024, 11, 3)) == utc_ms(2024, 11, 3, 4)  # DST ends 02:00 that day
    assert et_midnight_ms(D(2024, 11, 4)) == utc_ms(2024, 11, 4, 5)
    assert day_length_minutes(D(2024, 3, 10)) == 23 * 60
    assert day_length_minutes(D(2024, 11, 3)) == 25 * 60
    assert day_length_minutes(D(2024, 11, 4)) == 24 * 60


def test_ms_to_et_date_round_trip() -> None:
    for day in (D(2024, 3, 10), D(2024, 3, 11), D(2024, 11, 3), D(2024, 12, 31), D(1999, 1, 1)):
        midnight = et_midnight_ms(day)
        assert et_date(midnight) == day
        assert et_date(midnight - 1) == day - dt.timedelta(days=1)
        assert et_date(et_midnight_ms(day + dt.timedelta(days=1)) - 1) == day
        assert et_datetime(midnight).replace(tzinfo=None) == dt.datetime(day.year, day.month,
                                                                           day.day)
    assert et_date(utc_ms(2024, 7, 1, 3, 59)) == D(2024, 6, 30)  # 23:59 EDT
    assert et_date(utc_ms(2024, 7, 1, 4, 0)) == D(2024, 7, 1)


@pytest.mark.parametrize(("label", "now", "crypto", "expected"), [
    # Saturday: the newest daily bar is Friday's
    ("1d", et_ms(D(2024, 1, 6), 12), False, et_midnight_ms(D(2024, 1, 5))),
    # Monday before the 04:00 pre-market: still Friday's
    ("1d", et_ms(D(2024, 1, 8), 3, 59), False, et_midnight_ms(D(2024, 1, 5))),
    ("1d", et_ms(D(2024, 1, 8), 4, 0), False, et_midnight_ms(D(2024, 1, 8))),
    # Good Friday 2024 and the weekend after: Thursday's
    ("1d", et_ms(D(2024, 3, 31), 12), False, et_midnight_ms(D(2024, 3, 28))),
    ("1d", et_ms(D(2024, 1, 6), 12), True, et_midnight_ms(D(2024, 1, 6))),
    # intraday: the bucket holding the last session minute
    ("5m", et_ms(D(2024, 1, 8), 10, 7), False, et_ms(D(2024, 1, 8), 10, 5)),
    ("5m", et_ms(D(2024, 1, 6), 12), False, et_ms(D(2024, 1, 5), 19, 55)),
    ("1h", et_ms(D(2024, 1, 8), 21, 30), False, et_ms(D(2024, 1, 8), 19)),
    ("4h", et_ms(D(2024, 1, 8), 2), False, et_ms(D(2024, 1, 5), 16)),
    ("15m", et_ms(D(2024, 1, 6), 3, 20), True, et_ms(D(2024, 1, 6), 3, 15)),
    # weeks start Sunday, months on the 1st, both from the last trading day
    ("1w", et_ms(D(2024, 1, 10), 12), False, et_midnight_ms(D(2024, 1, 7))),
    ("1w", et_ms(D(2024, 1, 7), 12), False, et_midnight_ms(D(2023, 12, 31))),
    ("1mo", et_ms(D(2024, 6, 1), 12), False, et_midnight_ms(D(2024, 5, 1))),
    ("1mo", et_ms(D(2024, 6, 3), 12), False, et_midnight_ms(D(2024, 6, 1))),
])
def test_latest_bar_start(label: str, now: int, crypto: bool, expected: int) -> None:
    assert latest_bar_start_ms(parse_timeframe(label), now, crypto=crypto) == expected
