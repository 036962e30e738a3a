"""Scheduler planning and timing, on trio's MockClock (exact, instant).

The API client is replaced by a scripted one whose pages take a fixed (virtual) time, and the
writer by a consumer that acknowledges messages: what is under test here is only when jobs
start, how many run at once, and what a cycle records. The real client and writer are covered
by their own tests and by the end-to-end tests.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import AsyncIterator

import pytest
import trio

from daemon.bars import Bar
from daemon.config import parse_config
from daemon.db import SeriesState
from daemon.errors import ApiKeyRefused, ApiServerError, NotEntitled
from daemon.jobs import JobOutcome, SeriesKey
from daemon.market_calendar import et_midnight_ms
from daemon.planning import FetchRange, expected_aggregates, plan_series, split_range
from daemon.polygon import ClientStatistics, Page
from daemon.scheduler import Scheduler
from daemon.spans import EMPTY, spans
from daemon.timeframes import Timeframe, parse_timeframe
from daemon.writer import JobFinished, Message, PageWrite, open_writer_channel

from .writing import acknowledge, row_times

TODAY = dt.date(2024, 3, 15)
D1 = parse_timeframe("1d")
M5 = parse_timeframe("5m")


def config(extra: str = "", **backfill: object) -> object:
    # One range per job unless a test is about splitting: the timing tests count calls.
    backfill.setdefault("parallel_ranges", 1)
    lines = [f"{k} = {v!r}".replace("'", '"') for k, v in backfill.items()]
    return parse_config("[backfill]\n" + "\n".join(lines) + "\n" + extra, env={})


class ScriptedClient:
    """Each job yields `pages` pages, each after `seconds` of virtual time."""

    def __init__(self, seconds: float = 10.0, pages: int = 1) -> None:
        self.seconds = seconds
        self.pages_per_job = pages
        self.calls: list[tuple[float, str, str]] = []
        self.fail: dict[str, Exception] = {}

    def statistics(self) -> ClientStatistics:
        return ClientStatistics(total_requests=len(self.calls), rate_limited_count=0, retries=0,
                                failures=0, bytes_received=0, pages=0, bars=0)

    async def pages(self, symbol: str, timeframe: Timeframe, from_ms: int, to_ms: int
                    ) -> AsyncIterator[Page]:
        for i in range(self.pages_per_job):
            self.calls.append((trio.current_time(), symbol, timeframe.label))
            if symbol in self.fail:
                raise self.fail[symbol]
            await trio.sleep(self.seconds)
            bar = Bar(t=from_ms + i, o=1, h=1, l=1, c=1, v=1)
            yield Page([bar], attempts=1, api_seconds=0.0, bytes=0,
                       last=i == self.pages_per_job - 1)


async def no_coverage(symbol: str) -> dict[tuple[str, str], SeriesState]:
    return {}


def make(cfg: object, client: ScriptedClient) -> tuple[Scheduler, trio.MemoryReceiveChannel]:
    send, receive = open_writer_channel(4)
    sched = Scheduler(cfg, client, send, series_state=no_coverage,  # type: ignore[arg-type]
                      today=lambda: TODAY)
    return sched, receive


def first_calls(client: ScriptedClient) -> dict[str, float]:
    starts: dict[str, float] = {}
    for t, symbol, _ in client.calls:
        starts.setdefault(symbol, t)
    return starts


# --- planning: requested - covered -------------------------------------------------------

START, END = et_midnight_ms(dt.date(2024, 1, 2)), et_midnight_ms(dt.date(2024, 3, 2))
DAY = 86_400_000


def test_plan_without_coverage_asks_for_the_whole_history_as_the_open_tail() -> None:
    cfg = config(symbols=["A"], start="2024-01-02", end="2024-03-01")
    assert plan_series(cfg, "A", D1, EMPTY, TODAY) == [  # type: ignore[arg-type]
        FetchRange(START, END - 1, closed=False)]


def test_plan_resumes_the_tail_with_the_overlap() -> None:
    cfg = config(symbols=["A"], start="2024-01-02", overlap_bars=3)
    top = START + 10 * DAY
    [tail] = plan_series(cfg, "A", M5, spans([(START, top)]), TODAY)  # type: ignore[arg-type]
    assert tail.from_ms == top - 3 * 300_000 and not tail.closed
    assert tail.to_ms == et_midnight_ms(TODAY + dt.timedelta(days=1)) - 1
    cfg0 = config(symbols=["A"], start="2024-01-02", overlap_bars=0)
    [tail0] = plan_series(cfg0, "A", M5, spans([(START, top)]), TODAY)  # type: ignore[arg-type]
    assert tail0.from_ms == top


def test_plan_fetches_a_history_moved_backwards_and_every_hole() -> None:
    cfg = config("[polygon]\npage_limit = 5000\n", symbols=["A"], start="2023-01-03",
                 end="2024-03-01", overlap_bars=0)
    first = et_midnight_ms(dt.date(2023, 1, 3))
    covered = spans([(START, START + 20 * DAY), (START + 40 * DAY, END)])
    plan = plan_series(cfg, "A", M5, covered, TODAY)  # type: ignore[arg-type]
    # the year before the old start, and the 20-day hole: both closed, nothing else
    assert plan == [FetchRange(first, START - 1, closed=True),
                    FetchRange(START + 20 * DAY, START + 40 * DAY - 1, closed=True)]


def test_plan_merges_holes_closer_than_half_a_page() -> None:
    cfg = config("[polygon]\npage_limit = 5000\n", symbols=["A"], start="2024-01-02",
                 end="2024-03-01", overlap_bars=0)
    # holes 1 day apart (<= 960 session minutes of 5m aggregates < 2500): one range
    near = spans([(START, START + 10 * DAY), (START + 11 * DAY, START + 12 * DAY),
                  (START + 13 * DAY, END)])
    assert plan_series(cfg, "A", M5, near, TODAY) == [  # type: ignore[arg-type]
        FetchRange(START + 10 * DAY, START + 13 * DAY - 1, closed=True)]
    # 14 days apart (10 trading days, 9,600 aggregates): two ranges
    far = spans([(START, START + 10 * DAY), (START + 11 * DAY, START + 25 * DAY),
                 (START + 26 * DAY, END)])
    assert len(plan_series(cfg, "A", M5, far, TODAY)) == 2  # type: ignore[arg-type]


def test_plan_nothing_when_everything_is_covered() -> None:
    cfg = config(symbols=["A"], start="2024-01-02", end="2024-03-01", overlap_bars=0)
    assert plan_series(cfg, "A", D1, spans([(START - DAY, END + DAY)]), TODAY) == []  # type: ignore[arg-type]


def test_history_days_counts_back_from_today() -> None:
    cfg = config(symbols=["A"], history_days=10)
    [fetch] = plan_series(cfg, "A", D1, EMPTY, TODAY)  # type: ignore[arg-type]
    assert fetch.from_ms == et_midnight_ms(dt.date(2024, 3, 5))


def test_expected_aggregates_follow_the_calendar() -> None:
    week = (et_midnight_ms(dt.date(2024, 1, 8)), et_midnight_ms(dt.date(2024, 1, 15)))
    # Mon-Fri sessions of 960 minutes (04:00-20:00 ET), nothing at the weekend; MLK day is
    # the 15th, outside the span
    assert expected_aggregates("AAPL", M5, *week) == 5 * 960
    assert expected_aggregates("AAPL", D1, *week) == 5
    assert expected_aggregates("X:BTCUSD", M5, *week) == 7 * 1440
    assert expected_aggregates("X:BTCUSD", D1, *week) == 7


def test_split_range_in_whole_pages() -> None:
    rest = FetchRange(0, 999_999, closed=False)
    # 100 pages of 10,000 ms: 16 parts of 6+ pages
    parts = split_range(rest, 10_000, 16)
    assert len(parts) == 16 and parts[0].from_ms == 0 and parts[-1].to_ms == 999_999
    assert all(a.to_ms + 1 == b.from_ms for a, b in zip(parts, parts[1:], strict=False))
    assert [p.closed for p in parts] == [True] * 15 + [False]
    # 3 pages: one part of 2 pages at least, so no split
    assert split_range(FetchRange(0, 29_999, closed=True), 10_000, 16) == [
        FetchRange(0, 29_999, closed=True)]
    assert split_range(rest, 10_000, 1) == [rest]


# --- timing -----------------------------------------------------------------------------------


async def test_stagger_spaces_starts_without_idling(autojump_clock: trio.abc.Clock) -> None:
    cfg = config(symbols=["A", "B", "C", "D", "E"], timeframes=["1d"], start="2024-01-02",
                 max_concurrent_symbols=3, stagger_seconds=2.0)
    client = ScriptedClient(seconds=10.0)
    sched, receive = make(cfg, client)
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(acknowledge, receive)
        cycle = await sched.run(once=True)
    starts = {s: t - t0 for s, t in first_calls(client).items()}
    # first wave spaced by the stagger; later symbols start the moment a slot frees
    assert starts == {"A": 0.0, "B": 2.0, "C": 4.0, "D": 10.0, "E": 12.0}
    assert cycle is not None and cycle.ok and len(cycle.jobs) == 5


async def test_symbols_bounded_and_timeframes_concurrent(autojump_clock: trio.abc.Clock) -> None:
    cfg = config(symbols=["A", "B", "C", "D", "E", "F", "G"], start="2024-01-02",
                 max_concurrent_symbols=3, stagger_seconds=0.0)
    client = ScriptedClient(seconds=5.0, pages=2)
    sched, receive = make(cfg, client)
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            cycle = sched.statistics().cycle
            running = {s for s, state in (cycle.symbols.items() if cycle else [])
                       if state == "running"}
            peak = max(peak, len(running))
            await trio.sleep(0.5)

    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(acknowledge, receive)
        nursery.start_soon(watch)
        cycle = await sched.run(once=True)
        nursery.cancel_scope.cancel()
    assert peak == 3
    # the 5 timeframes of A all asked for their first page at t0
    assert sorted(tf for t, s, tf in client.calls if s == "A" and t == t0) == sorted(
        ["1d", "4h", "1h", "15m", "5m"])
    assert cycle is not None and len(cycle.jobs) == 35 and cycle.ok
    # 7 symbols, 3 at a time, 10 s each: 3 waves
    assert trio.current_time() - t0 == pytest.approx(30.0)


async def test_top_ups_every_refresh_minutes(autojump_clock: trio.abc.Clock) -> None:
    cfg = config(symbols=["A"], timeframes=["1d"], start="2024-01-02", refresh_minutes=60)
    client = ScriptedClient(seconds=1.0)
    sched, receive = make(cfg, client)
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(acknowledge, receive)
        nursery.start_soon(sched.run)
        await trio.sleep(3 * 3600 + 10)
        sched.request_stop()
    assert [t - t0 for t, _, _ in client.calls] == [0.0, 3600.0, 7200.0, 10800.0]


async def test_auth_error_fails_the_rest_without_requests(autojump_clock: trio.abc.Clock) -> None:
    cfg = config(symbols=["A", "B", "C"], timeframes=["1d"], start="2024-01-02",
                 max_concurrent_symbols=1, stagger_seconds=0.0)
    client = ScriptedClient(seconds=1.0)
    client.fail["A"] = ApiKeyRefused("401 NOT_AUTHORIZED: unknown API key", status=401)
    sched, receive = make(cfg, client)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(acknowledge, receive)
        cycle = await sched.run(once=True)
    assert cycle is not None and not cycle.ok
    assert [s for _, s, _ in client.calls] == ["A"]
    assert len(cycle.failed) == 3
    assert all("NOT_AUTHORIZED" in (j.error or "") for j in cycle.failed)


async def test_an_api_failure_fails_one_job_only(autojump_clock: trio.abc.Clock) -> None:
    cfg = config(symbols=["A", "B"], timeframes=["1d"], start="2024-01-02")
    client = ScriptedClient(seconds=1.0)
    client.fail["A"] = ApiServerError("gave up after 5 attempts; last: HTTP 503")
    sched, receive = make(cfg, client)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(acknowledge, receive)
        cycle = await sched.run(once=True)
    assert cycle is not None
    assert [(j.symbol, j.error) for j in cycle.failed] == [
        ("A", "ApiServerError: gave up after 5 attempts; last: HTTP 503")]
    assert cycle.symbols == {"A": "failed", "B": "done"}


async def test_reload_adds_and_removes_mid_cycle(autojump_clock: trio.abc.Clock) -> None:
    cfg = config(symbols=["A", "B"], timeframes=["1d"], start="2024-01-02",
                 max_concurrent_symbols=2, stagger_seconds=0.0)
    client = ScriptedClient(seconds=10.0, pages=3)
    sched, receive = make(cfg, client)
    t0 = trio.current_time()

    async def reload_later() -> None:
        await trio.sleep(15)
        sched.update_config(config(symbols=["A", "C"], timeframes=["1d"], start="2024-01-02",
                                   max_concurrent_symbols=2, stagger_seconds=0.0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(acknowledge, receive)
        nursery.start_soon(reload_later)
        cycle = await sched.run(once=True)
    assert cycle is not None
    by_symbol = {j.symbol: j for j in cycle.jobs}
    # B was removed at t=15 during its 2nd page: it stops after that page, not failed
    assert by_symbol["B"].cancelled and by_symbol["B"].bars_written == 2
    assert by_symbol["A"].ok and by_symbol["A"].bars_written == 3
    # C joined the running cycle as soon as B's slot freed (t=20)
    assert first_calls(client)["C"] - t0 == 20.0
    assert by_symbol["C"].ok and cycle.ok


async def test_reload_adds_timeframe_to_running_symbol(autojump_clock: trio.abc.Clock) -> None:
    cfg = config(symbols=["A"], timeframes=["1d"], start="2024-01-02")
    client = ScriptedClient(seconds=10.0, pages=3)
    sched, receive = make(cfg, client)
    t0 = trio.current_time()

    async def reload_later() -> None:
        await trio.sleep(5)
        sched.update_config(config(symbols=["A"], timeframes=["1d", "5m"], start="2024-01-02"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(acknowledge, receive)
        nursery.start_soon(reload_later)
        cycle = await sched.run(once=True)
    # A plans again when its 1d job ends (t=30): the new 5m only, 1d is not fetched twice
    assert [(t - t0, tf) for t, _, tf in client.calls] == [
        (0, "1d"), (10, "1d"), (20, "1d"), (30, "5m"), (40, "5m"), (50, "5m")]
    assert cycle is not None and cycle.ok and len(cycle.jobs) == 2


async def test_reload_of_refresh_minutes_moves_the_next_cycle(
    autojump_clock: trio.abc.Clock,
) -> None:
    cfg = config(symbols=["A"], timeframes=["1d"], start="2024-01-02", refresh_minutes=60)
    client = ScriptedClient(seconds=1.0)
    sched, receive = make(cfg, client)
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(acknowledge, receive)
        nursery.start_soon(sched.run)
        await trio.sleep(100)
        assert sched.statistics().next_cycle_at == t0 + 3600
        sched.update_config(config(symbols=["A"], timeframes=["1d"], start="2024-01-02",
                                   refresh_minutes=10))
        await trio.sleep(1300)
        sched.request_stop()
    assert [t - t0 for t, _, _ in client.calls] == [0.0, 600.0, 1200.0]


async def test_stop_starts_no_symbol_that_waits_for_a_slot(autojump_clock: trio.abc.Clock) -> None:
    cfg = config(symbols=["A", "B"], timeframes=["1d"], start="2024-01-02",
                 max_concurrent_symbols=1)
    client = ScriptedClient(seconds=10.0, pages=2)
    sched, receive = make(cfg, client)

    async def stop_later() -> None:
        await trio.sleep(5)
        sched.request_stop()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(acknowledge, receive)
        nursery.start_soon(stop_later)
        cycle = await sched.run(once=True)
    # A finishes the page it was on and stops; B never starts
    assert [s for _, s, _ in client.calls] == ["A"]
    assert cycle is not None and [j.symbol for j in cycle.jobs] == ["A"]
    assert cycle.jobs[0].cancelled and cycle.jobs[0].bars_written == 1


# --- parallel sub-ranges ----------------------------------------------------------------------


class SeriesClient:
    """One bar every 5 minutes from `first`; pages of `page_bars` bars, `seconds` each."""

    def __init__(self, first: int, count: int, page_bars: int, seconds: float) -> None:
        self.ts = [first + i * 300_000 for i in range(count)]
        self.page_bars, self.seconds = page_bars, seconds
        self.requests = 0
        self.in_flight = self.peak = 0

    def statistics(self) -> ClientStatistics:
        return ClientStatistics(self.requests, 0, 0, 0, 0, 0, 0)

    async def pages(self, symbol: str, timeframe: Timeframe, from_ms: int, to_ms: int
                    ) -> AsyncIterator[Page]:
        inside = [t for t in self.ts if from_ms <= t <= to_ms]
        for i in range(0, max(len(inside), 1), self.page_bars):
            self.requests += 1
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            await trio.sleep(self.seconds)
            self.in_flight -= 1
            chunk = inside[i:i + self.page_bars]
            yield Page([Bar(t=t, o=1, h=1, l=1, c=1, v=1) for t in chunk], attempts=1,
                       api_seconds=self.seconds, bytes=0,
                       last=i + self.page_bars >= len(inside))


async def test_a_deep_series_is_fetched_in_parallel_sub_ranges(
        autojump_clock: trio.abc.Clock) -> None:
    cfg = config("[polygon]\nrequests_per_minute = 0\n", symbols=["SPY"], timeframes=["5m"],
                 start="2024-01-02", end="2024-03-01",
                 parallel_ranges=0)  # auto: the in-flight cap (16) on an unlimited plan
    start = et_midnight_ms(dt.date(2024, 1, 2))
    client = SeriesClient(start, 36 * 400, page_bars=400, seconds=0.4)  # 36 pages
    send, receive = open_writer_channel(4)
    deferrals: list[tuple[SeriesKey, bool]] = []
    sched = Scheduler(cfg, client, send, series_state=no_coverage,  # type: ignore[arg-type]
                      today=lambda: TODAY,
                      defer_features=lambda series, on: deferrals.append((series, on)))
    written: list[int] = []
    covered: list[tuple[int, int]] = []

    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_accept_pages, receive, written, covered)
        cycle = await sched.run(once=True)
    wall = trio.current_time() - t0
    assert cycle is not None and cycle.ok
    # 36 pages one after another take 14.4 s; the first page, then 16 sub-ranges at once
    assert wall <= 0.4 * 14.4 and client.peak == 16
    assert sorted(written) == client.ts  # every bar once: no gap, no duplicate
    # one contiguous span; closed sub-ranges after the last bar are covered too (their
    # answer is final), the open tail only through its newest bar
    [(lo, hi)] = spans(covered)
    assert lo == start and client.ts[-1] < hi <= et_midnight_ms(dt.date(2024, 3, 2))
    assert client.requests <= 36 + 16  # at most one partial page per sub-range
    # its features wait from the split to the job's end (its ranges commit out of order)
    assert deferrals == [(SeriesKey("SPY", "5m"), True), (SeriesKey("SPY", "5m"), False)]


async def _accept_pages(receive: trio.MemoryReceiveChannel[Message], written: list[int],
                        covered: list[tuple[int, int]]) -> None:
    """A writer that commits nothing: records each page's bar times and span, and settles
    the receipts as the real writer would."""
    async with receive:
        async for message in receive:
            if isinstance(message, PageWrite):
                written.extend(row_times(message.rows))
                covered.append(message.span)
                message.receipt.bars_written += message.rows.count
            elif isinstance(message, JobFinished):
                message.receipt.outcome = JobOutcome.decide(
                    fetch_error=message.fetch.error, write_error=None,
                    cancelled=message.fetch.cancelled)
                message.receipt.finished.set()


async def test_deep_series_splitting_at_once_share_the_in_flight_cap(
        autojump_clock: trio.abc.Clock) -> None:
    cfg = config("[polygon]\nrequests_per_minute = 0\n", symbols=["SPY", "QQQ"],
                 timeframes=["5m"], start="2024-01-02", end="2024-03-01", parallel_ranges=0,
                 stagger_seconds=0)  # both first pages end in the same tick: both split then
    client = SeriesClient(et_midnight_ms(dt.date(2024, 1, 2)), 36 * 400, page_bars=400,
                          seconds=0.4)
    send, receive = open_writer_channel(4)
    sched = Scheduler(cfg, client, send, series_state=no_coverage,  # type: ignore[arg-type]
                      today=lambda: TODAY)
    written: list[int] = []

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_accept_pages, receive, written, [])
        cycle = await sched.run(once=True)
    assert cycle is not None and cycle.ok
    # every walker may hold a page: all of them together, not each series, stay within 16
    assert client.peak == 16
    assert sorted(written) == sorted(client.ts * 2)


# --- partial failures: a refused series, a failed series' own backoff ------------------------


async def test_a_refused_series_costs_one_request_and_the_cycle_goes_on(
        autojump_clock: trio.abc.Clock) -> None:
    cfg = config(symbols=["I:SPX", "AAPL"], timeframes=["1d", "5m"], start="2024-01-02",
                 max_concurrent_symbols=1, stagger_seconds=0.0)
    client = ScriptedClient(seconds=1.0, pages=3)
    client.fail["I:SPX"] = NotEntitled("HTTP 403: You are not entitled to this data.",
                                       status=403)
    # I:SPX 5m has a hole and a tail to fetch: two ranges, yet one request
    holey = spans([(START, START + 20 * DAY), (START + 40 * DAY, START + 50 * DAY)])

    async def state(symbol: str) -> dict[tuple[str, str], SeriesState]:
        return {("I:SPX", "5m"): SeriesState(holey)} if symbol == "I:SPX" else {}

    send, receive = open_writer_channel(4)
    sched = Scheduler(cfg, client, send, series_state=state,  # type: ignore[arg-type]
                      today=lambda: TODAY)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(acknowledge, receive)
        cycle = await sched.run(once=True)
    assert cycle is not None
    asked = [(s, tf) for _, s, tf in client.calls]
    assert asked.count(("I:SPX", "1d")) == 1 and asked.count(("I:SPX", "5m")) == 1
    assert asked.count(("AAPL", "1d")) == 3 and asked.count(("AAPL", "5m")) == 3
    assert sorted((j.symbol, j.timeframe) for j in cycle.not_entitled) == [("I:SPX", "1d"),
                                                                           ("I:SPX", "5m")]
    assert not cycle.failed and not cycle.ok  # not a failure, but not everything either
    assert cycle.execution_status(interrupted=False) == "partial"
    assert "not entitled" in (cycle.not_entitled[0].error or "")


async def test_a_remembered_refusal_sends_no_request() -> None:
    cfg = config(symbols=["I:SPX"], timeframes=["1d"], start="2024-01-02")
    client = ScriptedClient(seconds=1.0)

    async def state(symbol: str) -> dict[tuple[str, str], SeriesState]:
        return {("I:SPX", "1d"): SeriesState(EMPTY, time.time() - 3600, "not entitled")}

    send, receive = open_writer_channel(4)
    sched = Scheduler(cfg, client, send, series_state=state,  # type: ignore[arg-type]
                      today=lambda: TODAY)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(acknowledge, receive)
        cycle = await sched.run(once=True)
    assert client.calls == [] and cycle is not None
    assert [j.outcome for j in cycle.jobs] == [JobOutcome.NOT_ENTITLED]


async def test_a_failed_series_is_retried_on_its_own_backoff(
        autojump_clock: trio.abc.Clock) -> None:
    cfg = config(symbols=["A", "B"], timeframes=["1d"], start="2024-01-02", refresh_minutes=60,
                 stagger_seconds=0.0)
    client = ScriptedClient(seconds=1.0)
    client.fail["A"] = ApiServerError("gave up after 5 attempts; last: HTTP 503")
    sched, receive = make(cfg, client)
    t0 = trio.current_time()

    async def heal() -> None:
        await trio.sleep(200)  # A recovers before its third retry
        del client.fail["A"]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(acknowledge, receive)
        nursery.start_soon(sched.run)
        nursery.start_soon(heal)
        await trio.sleep(3 * 3600 + 10)
        sched.request_stop()
    calls_a = [t - t0 for t, s, _ in client.calls if s == "A"]
    calls_b = [t - t0 for t, s, _ in client.calls if s == "B"]
    # A: the first cycle, retries 1, 2 and 4 minutes after each failure (the cycle's own
    # second included), then the regular schedule; B only on the schedule
    assert calls_a == [0.0, 61.0, 181.0, 421.0, 3600.0, 7200.0, 10800.0]
    assert calls_b == [0.0, 3600.0, 7200.0, 10800.0]
