"""The plan's arithmetic: expected units, pages, the scheduler's split, the time; checked by
hand and against the simulator's own paging (pure functions, no process)."""

from __future__ import annotations

import datetime as dt

import pytest

from daemon import db, scheduler
from daemon.config import parse_config
from daemon.forecast import (
    CRYPTO_DENSITY,
    EQUITY_DENSITY,
    UPPER_BOUND,
    SeriesModel,
    default_density,
    estimate,
    page_ranges,
    parallel_parts,
    range_requests,
)
from daemon.market_calendar import et_midnight_ms
from daemon.plan_cli import REFUSAL_RETRY_SECONDS, as_json, as_text, plan_cycle
from daemon.planning import FetchRange, expected_aggregates, split_range
from daemon.simulator.data import page_with_count
from daemon.spans import Spans
from daemon.timeframes import parse_timeframe

JAN, FEB = dt.date(2024, 1, 2), dt.date(2024, 2, 1)
LO, HI = et_midnight_ms(JAN), et_midnight_ms(FEB)


@pytest.mark.parametrize("symbol", ["AAPL", "X:BTCUSD"])
@pytest.mark.parametrize("label", ["1d", "1w", "4h", "1h", "15m", "5m", "1m"])
def test_the_upper_bound_is_planning_s_expected_aggregates(symbol: str, label: str) -> None:
    tf = parse_timeframe(label)
    model = SeriesModel(symbol, tf, UPPER_BOUND)
    for lo, hi in [(LO, HI), (LO + 7 * 3_600_000, HI - 5 * 3_600_000)]:
        if not tf.intraday and tf.unit != "d":
            continue  # expected_aggregates counts days: week bars' cost is their days
        assert model.totals(lo, hi)[1] == pytest.approx(expected_aggregates(symbol, tf, lo, hi))


def test_buckets_without_trades_are_weighted_by_their_chance() -> None:
    tf = parse_timeframe("5m")
    thin = SeriesModel("AAPL", tf, EQUITY_DENSITY).totals(LO, HI)
    full = SeriesModel("AAPL", tf, UPPER_BOUND).totals(LO, HI)
    days = 21  # trading days in [Jan 2, Feb 1)
    assert full == (days * 192, days * 960)  # 16 h of 5-minute buckets
    regular = 78 * (1 - (1 - 0.985) ** 5) * days  # 09:30-16:00
    extended = 114 * (1 - 0.4 ** 5) * days
    assert thin[0] == pytest.approx(regular + extended)
    assert default_density("X:BTCUSD") is CRYPTO_DENSITY


def test_a_page_holds_whole_bars() -> None:
    assert SeriesModel("AAPL", parse_timeframe("1h"), UPPER_BOUND).page_capacity(5000) == 4980
    assert SeriesModel("AAPL", parse_timeframe("4h"), UPPER_BOUND).page_capacity(5000) == 4800
    assert SeriesModel("AAPL", parse_timeframe("1d"), UPPER_BOUND).page_capacity(5000) == 5000
    assert SeriesModel("AAPL", parse_timeframe("1h"), UPPER_BOUND).page_capacity(10) == 60


def test_a_deep_range_is_counted_as_the_scheduler_splits_it() -> None:
    # a crypto day of 1h bars is 1440 units: with limit 1440, one day per page
    model = SeriesModel("X:BTCUSD", parse_timeframe("1h"), UPPER_BOUND)
    fetch = FetchRange(LO, LO + 30 * 86_400_000 - 1, closed=True)
    assert range_requests(model, fetch, 1440, parts=1) == (30, 720)
    # the first page takes day 1; 29 days left, split in 4 of 7.25 days: 8 pages each
    assert split_range(FetchRange(LO + 86_400_000, fetch.to_ms, True), 86_400_000, 4)[0].to_ms \
        == LO + 86_400_000 + 29 * 86_400_000 // 4 - 1
    assert range_requests(model, fetch, 1440, parts=4)[0] == 1 + 4 * 8
    # a range that fits one page is one request, even when it holds nothing
    weekend = FetchRange(et_midnight_ms(dt.date(2024, 1, 6)), et_midnight_ms(dt.date(2024, 1, 8))
                         - 1, closed=True)
    assert range_requests(SeriesModel("AAPL", parse_timeframe("5m"), EQUITY_DENSITY),
                          weekend, 50_000, parts=16) == (1, 0.0)


def test_parallel_parts_follow_the_scheduler_s_rule() -> None:
    unlimited = parse_config("[polygon]\nrequests_per_minute = 0\nmax_in_flight = 12\n", env={})
    assert parallel_parts(unlimited, walkers=1, latency=1.0) == 12  # 100/s x 1 s, capped
    assert parallel_parts(unlimited, walkers=1, latency=0.005) == 1  # a fast API: no split
    assert parallel_parts(unlimited, walkers=40, latency=1.0) == 1  # the cap is for all
    fixed = parse_config("[backfill]\nparallel_ranges = 3\n", env={})
    assert parallel_parts(fixed, walkers=40, latency=1.0) == 3
    limited = parse_config("[polygon]\nrequests_per_minute = 150\n", env={})
    assert parallel_parts(limited, walkers=15, latency=1.0) == 1  # ceil(2.5 * 1.25) < 15
    fast = parse_config("[polygon]\nrequests_per_minute = 600\n", env={})
    assert parallel_parts(fast, walkers=3, latency=2.0) == 14  # min(16, ceil(25)) - 3 + 1
    assert scheduler.REFUSAL_RETRY_SECONDS == REFUSAL_RETRY_SECONDS


def _simulated_requests(seed: int, symbol: str, label: str, fetch: FetchRange, limit: int,
                        parts: int) -> int:
    """What the scheduler sends for `fetch`, paged by the simulator's own code."""
    tf = parse_timeframe(label)
    bars, next_ms, _ = page_with_count(seed, symbol, tf, fetch.from_ms, fetch.to_ms, limit)
    if next_ms is None:
        return 1
    page_from = int(bars[-1]["t"]) + 1
    requests = 1
    for part in split_range(FetchRange(page_from, fetch.to_ms, fetch.closed),
                            page_from - fetch.from_ms, parts):
        start: int | None = part.from_ms
        while start is not None:
            requests += 1
            _, start, _ = page_with_count(seed, symbol, tf, start, part.to_ms, limit)
    return requests


@pytest.mark.parametrize("parts", [1, 16])
def test_the_estimate_is_within_15_percent_of_the_simulator_s_paging(parts: int) -> None:
    fetch = FetchRange(LO, et_midnight_ms(dt.date(2024, 4, 1)) - 1, closed=False)
    planned = sent = 0
    for symbol in ("MSFT", "SPY", "X:BTCUSD"):  # liquid, thin, crypto at seed 11
        for label in ("1d", "1h", "15m", "5m"):
            model = SeriesModel(symbol, parse_timeframe(label), default_density(symbol))
            planned += range_requests(model, fetch, 5000, parts)[0]
            sent += _simulated_requests(11, symbol, label, fetch, 5000, parts)
    assert abs(planned - sent) / sent <= 0.15, (planned, sent)


def test_page_ranges_cut_covered_spans_into_one_request_each() -> None:
    tf = parse_timeframe("5m")
    cuts = page_ranges("AAPL", tf, LO, HI, 5000)
    assert cuts[0][0] == LO and cuts[-1][1] == HI
    assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:], strict=False))
    assert all(expected_aggregates("AAPL", tf, a, b) <= 5000 for a, b in cuts)
    assert len(cuts) == -(-21 * 960 // 5000)  # as few as the limit allows
    assert page_ranges("AAPL", parse_timeframe("4h"), LO, HI, 100)[0] == (
        LO, LO + 8 * 3_600_000)  # one bar more than the limit: still one bar a page


def test_the_time_is_the_rate_bound_or_the_in_flight_bound() -> None:
    fetch = [FetchRange(LO, HI - 1, closed=False)]
    tf = parse_timeframe("1h")
    limited = parse_config("[polygon]\nrequests_per_minute = 30\npage_limit = 1000\n", env={})
    plan = estimate(limited, [("AAPL", tf, fetch, None)])
    assert plan.requests == plan.series[0].requests + 1 > 2  # + the cycle's splits check
    assert plan.seconds == pytest.approx(plan.requests * 2.0)  # 30 a minute
    unlimited = parse_config("[polygon]\nrequests_per_minute = 0\nmax_in_flight = 4\n"
                             "page_limit = 1000\n", env={})
    plan = estimate(unlimited, [("AAPL", tf, fetch, None)] * 8, latency=0.5)
    assert plan.seconds == pytest.approx(max(plan.requests * 0.5 / 4,
                                             0.5 * (1 + -(-(plan.series[0].requests - 1)
                                                          // 4))))
    nothing = estimate(unlimited, [])  # only the cycle's splits check
    assert nothing.requests == 1 and nothing.series == ()


def test_plan_cycle_plans_what_the_scheduler_would() -> None:
    cfg = parse_config('[backfill]\nsymbols = ["AAPL", "MSFT", "NVDA", "TSLA"]\n'
                       'timeframes = ["1d"]\nstart = "2024-01-02"\nend = "2024-01-31"\n',
                       env={})
    lo, hi = et_midnight_ms(dt.date(2024, 1, 2)), et_midnight_ms(dt.date(2024, 2, 1))
    now = 1_800_000_000.0
    state = {
        # covered through its newest bar (Jan 31): the open tail's overlap only
        ("AAPL", "1d"): db.SeriesState(Spans([(lo, et_midnight_ms(dt.date(2024, 1, 31)) + 1)])),
        # covered to the very end: nothing to ask
        ("TSLA", "1d"): db.SeriesState(Spans([(lo, hi)])),
        # refused an hour ago: a job, no request
        ("MSFT", "1d"): db.SeriesState(refused_at=now - 3600, refused_reason="not entitled"),
        # refused two days ago: asked again
        ("NVDA", "1d"): db.SeriesState(refused_at=now - 2 * 86_400),
    }
    plan = plan_cycle(cfg, state, today=dt.date(2024, 3, 1), now=now)
    by = {s.symbol: s for s in plan.series}
    assert by["AAPL"].requests == 1 and by["AAPL"].ranges[0].from_ms > lo
    assert by["MSFT"].requests == 0 and by["MSFT"].refused == "not entitled" and by["MSFT"].job
    assert by["NVDA"].requests == 1 and by["NVDA"].ranges[0].from_ms == lo
    assert not by["TSLA"].job
    assert plan.jobs == 3 and plan.requests == 2 + 1  # + the cycle's splits check
    out = as_json(plan)
    assert out["requests"] == 3 and isinstance(out["seconds"], float)
    assert [s["symbol"] for s in out["series"]] == ["AAPL", "MSFT", "NVDA", "TSLA"]  # type: ignore
    assert "total: 3 requests" in as_text(plan, "c.toml")
