"""verify's judgement as pure functions: what is missing, extra, differing, a late revision or
not to be judged (quarantined); the revision session; the sample."""

from __future__ import annotations

import datetime as dt

import pytest

from daemon.__main__ import main
from daemon.bars import Bar, Quarantined
from daemon.jobs import SeriesKey
from daemon.market_calendar import et_midnight_ms
from daemon.timeframes import parse_timeframe
from daemon.verify import (
    Change,
    Finding,
    Row,
    SeriesReport,
    Unit,
    classify,
    default_seed,
    revision_session,
    revision_window,
    sample_units,
)

HOUR = 3_600_000


def bar(t: int, c: float = 10.0, vw: float | None = 10.0, n: int | None = 7) -> Bar:
    return Bar(t=t, o=10.0, h=11.0, l=9.0, c=c, v=100.0, vw=vw, n=n)


def row(b: Bar) -> Row:
    return (b.t, b.o, b.h, b.l, b.c, b.v, b.vw, b.n)


def changes(findings: list[Finding]) -> list[tuple[str, int, bool]]:
    return [(f.change.value, f.t, f.revision) for f in findings]


def test_identical_pages_have_no_findings() -> None:
    api = [bar(0), bar(HOUR, vw=None), bar(2 * HOUR, n=None)]
    assert classify(api, [row(b) for b in api], ()) == []


def test_missing_extra_and_differing_bars_are_told_apart() -> None:
    api = [bar(0), bar(HOUR), bar(2 * HOUR, c=10.5)]
    stored = [row(bar(0)), row(bar(2 * HOUR)), row(bar(3 * HOUR))]
    found = classify(api, stored, ())
    assert changes(found) == [("missing", HOUR, False), ("differs", 2 * HOUR, False),
                              ("extra", 3 * HOUR, False)]
    assert "close 10.0 -> 10.5" in found[1].describe()
    assert found[1].api == row(api[2]) and found[1].stored == stored[1]


def test_a_missing_vwap_or_trade_count_is_a_difference() -> None:
    assert changes(classify([bar(0, vw=None)], [row(bar(0))], ())) == [("differs", 0, False)]
    assert changes(classify([bar(0)], [row(bar(0, n=None))], ())) == [("differs", 0, False)]


def test_a_bar_the_api_still_serves_wrong_is_quarantined_not_missing_nor_extra() -> None:
    bad = Quarantined(HOUR, '{"t": 3600000}', "high 9 < low 10")
    # no stored row there: not "missing"
    found = classify([bar(0)], [row(bar(0))], (bad,))
    assert changes(found) == [("quarantined", HOUR, False)]
    assert found[0].reason == "high 9 < low 10"
    # a stored row there: not "extra" (the stored one may well be right)
    found = classify([bar(0)], [row(bar(0)), row(bar(HOUR))], (bad,))
    assert changes(found) == [("quarantined", HOUR, False)]


def test_a_quarantined_bar_of_unknown_place_makes_extra_rows_unjudgeable() -> None:
    nowhere = Quarantined(None, "{}", "undecodable bar")
    found = classify([bar(0)], [row(bar(0)), row(bar(HOUR))], (nowhere,))
    assert changes(found) == [("quarantined", HOUR, False)]
    # ... but a bar the API has and the database lacks is still missing
    found = classify([bar(0), bar(HOUR)], [row(bar(0))], (nowhere,))
    assert changes(found) == [("missing", HOUR, False)]


def test_differences_in_the_revision_session_are_revisions() -> None:
    window = (HOUR, 3 * HOUR)
    api = [bar(0, c=10.5), bar(HOUR, c=10.5), bar(2 * HOUR)]
    stored = [row(bar(0)), row(bar(HOUR)), row(bar(3 * HOUR))]
    found = classify(api, stored, (), revision=window)
    assert changes(found) == [("differs", 0, False), ("differs", HOUR, True),
                              ("missing", 2 * HOUR, True), ("extra", 3 * HOUR, False)]


def test_the_report_counts_corruption_apart_from_revisions_and_quarantined() -> None:
    report = SeriesReport(SeriesKey("AAPL", "1h"))
    report.note([Finding(Change.DIFFERS, 0, None, None),
                 Finding(Change.EXTRA, 1, None, None),
                 Finding(Change.DIFFERS, 2, None, None, revision=True),
                 Finding(Change.QUARANTINED, 3, None, None)])
    assert (report.corrupt, report.revisions, report.count(Change.QUARANTINED)) == (2, 1, 1)
    assert report.extras == [1] and len(report.examples) == 4


def et(day: dt.date, hour: float) -> int:
    return et_midnight_ms(day) + int(hour * HOUR)


def test_the_revision_session_is_the_last_one_begun_at_the_fetch() -> None:
    friday, saturday, monday = dt.date(2024, 3, 1), dt.date(2024, 3, 2), dt.date(2024, 3, 4)
    assert revision_session("AAPL", et(monday, 10)) == monday  # during the session
    assert revision_session("AAPL", et(monday, 3)) == friday  # before Monday's opened
    assert revision_session("AAPL", et(saturday, 12)) == friday  # a weekend
    assert revision_session("AAPL", et(monday, 23)) == monday  # after the close
    good_friday, thursday = dt.date(2024, 3, 29), dt.date(2024, 3, 28)
    assert revision_session("AAPL", et(good_friday, 12)) == thursday  # a holiday
    assert revision_session("X:BTCUSD", et(saturday, 0.5)) == saturday  # crypto: its ET day


def test_the_revision_window_holds_the_bars_of_that_session() -> None:
    monday = dt.date(2024, 3, 4)
    fetched = et(monday, 10)
    assert revision_window("AAPL", parse_timeframe("5m"), fetched) == (
        et_midnight_ms(monday), et_midnight_ms(dt.date(2024, 3, 5)))
    assert revision_window("AAPL", parse_timeframe("1d"), fetched) == (
        et_midnight_ms(monday), et_midnight_ms(monday) + 1)
    sunday = dt.date(2024, 3, 3)  # the week bar holding Monday starts on Sunday
    assert revision_window("AAPL", parse_timeframe("1w"), fetched) == (
        et_midnight_ms(sunday), et_midnight_ms(sunday) + 1)
    assert revision_window("AAPL", parse_timeframe("1h"), None) is None  # never fetched


def test_the_sample_is_seeded_sized_and_in_order() -> None:
    key = SeriesKey("AAPL", "1h")
    units = [Unit(key, i, i + 1) for i in range(100)]
    first = sample_units(units, 0.05, seed=7)
    assert len(first) == 5 and first == sample_units(units, 0.05, seed=7)
    assert first == sorted(first, key=lambda u: u.lo)
    assert first != sample_units(units, 0.05, seed=8)
    assert len(sample_units(units, 0.001, seed=1)) == 1  # at least one
    assert sample_units(units, 1.0, seed=1) == units
    assert default_seed(dt.date(2025, 1, 14)) == 20250114


def test_the_command_line_refuses_a_share_outside_0_to_1(
        capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("0", "1.5", "five"):
        with pytest.raises(SystemExit) as exit_info:
            main(["verify", "--sample", bad])
        assert exit_info.value.code == 2
    assert "expected a share in (0, 1]" in capsys.readouterr().err
