"""How many requests a plan will cost, and how long they take: the arithmetic of `backfilld plan`.

Pure functions of the config, a series' coverage and the market calendar: no API call, no
database (daemon.plan_cli reads the coverage; the progress line of `run` reuses the estimate
for its ETA).

Why not `planning.expected_aggregates` alone: it is an upper bound (every session minute, as
if every minute traded), and a minute without a trade has no aggregate. The API's `limit`
counts base aggregates: a minute or hour bar costs the session minutes of its bucket, a day
bar one trading day; a bucket in which nothing traded has no bar and costs nothing. So each
bucket is weighted by the chance that it has a bar, from a per-minute trade probability
(`Density`): in regular hours (09:30-16:00 ET) nearly every minute of a listed stock trades,
in the extended session (04:00-09:30, 16:00-20:00) far fewer do, and a crypto pair trades
around the clock at one rate. A bucket of `m` minutes has a bar with probability
`1 - (1 - p_regular)^r * (1 - p_extended)^e` (r, e: its regular and extended minutes).

Requests are then counted the way the scheduler walks a range (daemon.scheduler): one first
page of `limit` units; if more is left, the rest split into equal sub-ranges
(`planning.split_range`, as many as `parallel_ranges()` allows), each walked to its end, its
last page usually partial. A page holds whole bars, so its capacity is `limit` rounded down to
whole bars of the timeframe.

Error handling: none needed; pure arithmetic.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
from collections.abc import Iterable

import attrs

from .config import Config
from .market_calendar import (
    SESSION_CLOSE_MINUTE,
    SESSION_OPEN_MINUTE,
    bucket_start_day,
    day_length_minutes,
    et_date,
    et_midnight_ms,
    is_crypto,
    is_trading_day,
)
from .planning import FetchRange, split_range
from .ratelimit import UNLIMITED_CEILING_PER_MINUTE
from .timeframes import Timeframe

__all__ = [
    "ASSUMED_LATENCY_SECONDS",
    "CRYPTO_DENSITY",
    "Density",
    "EQUITY_DENSITY",
    "Estimate",
    "SeriesEstimate",
    "SeriesModel",
    "UPPER_BOUND",
    "default_density",
    "estimate",
    "estimate_series",
    "page_ranges",
    "parallel_parts",
]

# Regular trading hours in minutes after ET midnight (the rest of 04:00-20:00 is extended).
REGULAR_OPEN_MINUTE = 9 * 60 + 30
REGULAR_CLOSE_MINUTE = 16 * 60
# Seconds per request assumed for an unlimited plan's time and for the scheduler's split rule:
# what the scheduler itself assumes before it has measured one (Scheduler._parallel_ranges).
ASSUMED_LATENCY_SECONDS = 1.0
_MINUTE_MS = 60_000


@attrs.frozen
class Density:
    """The chance that a minute has at least one trade, in regular and in extended hours
    (crypto: both the same, every minute of the day)."""

    regular: float
    extended: float


# A listed stock trades in nearly every regular minute; in the extended session anything from
# a third of the minutes (a thin name) to nearly all (a mega cap): the middle is assumed.
EQUITY_DENSITY = Density(regular=0.985, extended=0.6)
CRYPTO_DENSITY = Density(regular=0.9, extended=0.9)
# Every session minute trades: `planning.expected_aggregates`' upper bound.
UPPER_BOUND = Density(regular=1.0, extended=1.0)


def default_density(symbol: str) -> Density:
    return CRYPTO_DENSITY if is_crypto(symbol) else EQUITY_DENSITY


# One bucket of a day: (offset from ET midnight in ms, cost in `limit` units, chance of a bar).
_Bucket = tuple[int, int, float]


@attrs.frozen
class _Layout:
    buckets: tuple[_Bucket, ...]
    bars: float  # expected bars of a whole day
    cost: float  # expected `limit` units of a whole day

    def inside(self, midnight: int, lo: int, hi: int) -> bool:
        """True when every bucket of the day starting at `midnight` lies in `[lo, hi)`."""
        return bool(self.buckets) and lo <= midnight + self.buckets[0][0] \
            and midnight + self.buckets[-1][0] < hi


@functools.lru_cache(maxsize=256)
def _layout(size: int, day_minutes: int, crypto: bool, density: Density) -> _Layout:
    """The intraday buckets of a trading day for bars of `size` minutes."""
    if crypto:
        open_, close, reg_open, reg_close = 0, day_minutes, 0, day_minutes
    else:
        open_, close = SESSION_OPEN_MINUTE, SESSION_CLOSE_MINUTE
        reg_open, reg_close = REGULAR_OPEN_MINUTE, REGULAR_CLOSE_MINUTE
    buckets = []
    for start in range(0, day_minutes, size):
        lo, hi = max(start, open_), min(start + size, day_minutes, close)
        if hi <= lo:
            continue
        regular = max(0, min(hi, reg_close) - max(lo, reg_open))
        extended = hi - lo - regular
        p_bar = 1 - (1 - density.regular) ** regular * (1 - density.extended) ** extended
        buckets.append((start * _MINUTE_MS, hi - lo, p_bar))
    return _Layout(tuple(buckets), sum(p for _, _, p in buckets),
                   sum(c * p for _, c, p in buckets))


class SeriesModel:
    """Expected bars and `limit` units of one series over any span, from the calendar.

    Args:
        symbol: The ticker (`X:` ones trade every minute of every day).
        timeframe: The bar size.
        density: Trade probabilities per minute (UPPER_BOUND: every session minute).
    """

    def __init__(self, symbol: str, timeframe: Timeframe, density: Density) -> None:
        self.symbol = symbol
        self.timeframe = timeframe
        self.density = density
        self.crypto = is_crypto(symbol)
        if timeframe.intraday:
            self._size = timeframe.multiplier * (60 if timeframe.unit == "h" else 1)
            session = 1440 if self.crypto else SESSION_CLOSE_MINUTE - SESSION_OPEN_MINUTE
            self.bar_cost = min(self._size, session)
        else:
            self._size = 0
            self.bar_cost = 1

    def page_capacity(self, limit: int) -> int:
        """`limit` units a full page really holds: whole bars only."""
        return max(self.bar_cost, limit // self.bar_cost * self.bar_cost)

    def _day(self, day: dt.date) -> _Layout | None:
        if not is_trading_day(day, crypto=self.crypto):
            return None
        minutes = day_length_minutes(day) if self.crypto else 1440
        return _layout(self._size, minutes, self.crypto, self.density)

    def buckets(self, lo: int, hi: int) -> Iterable[tuple[int, float, float]]:
        """(t, expected cost, chance of a bar) of every bucket with `lo <= t < hi`, in order."""
        if hi <= lo:
            return
        if not self.timeframe.intraday:
            yield from self._day_buckets(lo, hi)
            return
        day, last = et_date(lo), et_date(hi - 1)
        while day <= last:
            layout = self._day(day)
            if layout is not None:
                midnight = et_midnight_ms(day)
                for offset, cost, p in layout.buckets:
                    t = midnight + offset
                    if lo <= t < hi:
                        yield t, cost * p, p
            day += dt.timedelta(days=1)

    def _day_buckets(self, lo: int, hi: int) -> Iterable[tuple[int, float, float]]:
        """Day, week and month bars: one per bucket holding a trading day; it costs the
        trading days it aggregates."""
        tf = self.timeframe
        start = bucket_start_day(tf, et_date(lo))
        last = et_date(hi - 1)
        while start <= last:
            nxt = _next_bucket(tf, start)
            t = et_midnight_ms(start)
            if lo <= t < hi:
                days = sum(1 for i in range((nxt - start).days)
                           if is_trading_day(start + dt.timedelta(days=i), crypto=self.crypto))
                if days:
                    yield t, float(days), 1.0
            start = nxt

    def totals(self, lo: int, hi: int) -> tuple[float, float]:
        """(expected bars, expected `limit` units) with `lo <= t < hi`."""
        if hi <= lo:
            return 0.0, 0.0
        if not self.timeframe.intraday:
            items = list(self._day_buckets(lo, hi))
            return sum(p for _, _, p in items), sum(c for _, c, _ in items)
        bars = cost = 0.0
        day, last = et_date(lo), et_date(hi - 1)
        while day <= last:
            layout = self._day(day)
            if layout is not None:
                midnight = et_midnight_ms(day)
                if layout.inside(midnight, lo, hi):
                    bars += layout.bars
                    cost += layout.cost
                else:
                    for offset, c, p in layout.buckets:
                        if lo <= midnight + offset < hi:
                            bars += p
                            cost += c * p
            day += dt.timedelta(days=1)
        return bars, cost

    def advance(self, lo: int, hi: int, units: float) -> int:
        """Where a page starting at `lo` ends: the start of the first bucket that no longer
        fits in `units` (expected), or `hi` when everything up to it fits. A page holds at
        least one bucket, so the result is past the first bucket at or after `lo`."""
        used = 0.0
        taken = False
        if self.timeframe.intraday:
            day, last = et_date(lo), et_date(hi - 1) if hi > lo else et_date(lo)
            while day <= last:
                layout = self._day(day)
                if layout is not None:
                    midnight = et_midnight_ms(day)
                    if layout.inside(midnight, lo, hi) and used + layout.cost <= units:
                        used += layout.cost
                        taken = True
                    else:
                        for offset, c, p in layout.buckets:
                            t = midnight + offset
                            if t < lo:
                                continue
                            if t >= hi:
                                return hi
                            if taken and used + c * p > units:
                                return t
                            used += c * p
                            taken = True
                day += dt.timedelta(days=1)
            return hi
        for t, units_of_bar, _ in self._day_buckets(lo, hi):
            if taken and used + units_of_bar > units:
                return t
            used += units_of_bar
            taken = True
        return hi


def _next_bucket(timeframe: Timeframe, start: dt.date) -> dt.date:
    mult = timeframe.multiplier
    if timeframe.unit == "d":
        return start + dt.timedelta(days=mult)
    if timeframe.unit == "w":
        return start + dt.timedelta(weeks=mult)
    months = start.year * 12 + start.month - 1 + mult
    return dt.date(months // 12, months % 12 + 1, 1)


def page_ranges(symbol: str, timeframe: Timeframe, lo: int, hi: int, limit: int
                ) -> list[tuple[int, int]]:
    """`[lo, hi)` cut into sub-ranges `[a, b)` of at most `limit` units at the upper bound
    (every session minute trading): each is answered in one page, whatever traded."""
    model = SeriesModel(symbol, timeframe, UPPER_BOUND)
    out = []
    while lo < hi:
        end = model.advance(lo, hi, limit)
        out.append((lo, end))
        lo = end
    return out


# --- the scheduler's walk, counted -------------------------------------------------------


def parallel_parts(config: Config, *, walkers: int, latency: float) -> int:
    """What `Scheduler._parallel_ranges` would answer with `walkers` ranges being walked and a
    measured latency of `latency` seconds."""
    if config.backfill.parallel_ranges:
        return config.backfill.parallel_ranges
    cap = config.polygon.max_in_flight
    rpm = config.polygon.requests_per_minute or UNLIMITED_CEILING_PER_MINUTE
    needed = min(cap, math.ceil(rpm / 60 * latency * 1.25))
    return max(1, needed - walkers + 1)


def _pages(units: float, capacity: int) -> int:
    return max(1, math.ceil(units / capacity - 1e-9))


def range_requests(model: SeriesModel, fetch: FetchRange, limit: int, parts: int
                   ) -> tuple[int, float]:
    """(requests, expected bars) to walk `fetch` as the scheduler does (see the module
    docstring): the first page, then the rest split into up to `parts` sub-ranges."""
    lo, hi = fetch.from_ms, fetch.to_ms + 1
    bars, units = model.totals(lo, hi)
    capacity = model.page_capacity(limit)
    if units <= capacity:
        return 1, bars
    first_end = model.advance(lo, hi, capacity)
    rest = FetchRange(first_end, fetch.to_ms, fetch.closed)
    pieces = split_range(rest, first_end - lo, parts)
    if len(pieces) <= 1:
        return _pages(units, capacity), bars
    return 1 + sum(_pages(model.totals(p.from_ms, p.to_ms + 1)[1], capacity)
                   for p in pieces), bars


@attrs.frozen
class SeriesEstimate:
    """What one series still needs.

    Attributes:
        ranges: The fetch ranges `planning.plan_series` gives.
        requests: Requests they should take (calibrated).
        bars: Bars they should bring (expected).
        upper_requests: Requests at the upper bound (every session minute trading).
        refused: Why no request goes this cycle (a refusal less than a day old), or None.
    """

    symbol: str
    timeframe: str
    ranges: tuple[FetchRange, ...]
    requests: int
    bars: float
    upper_requests: int
    refused: str | None = None

    @property
    def job(self) -> bool:
        """True when the cycle runs a job for this series (the scheduler plans one)."""
        return bool(self.ranges) or self.refused is not None


@attrs.frozen
class Estimate:
    """A whole plan: per series, the total, and the time it takes.

    Attributes:
        seconds: The longest of: requests at `requests_per_minute`; requests through the
            in-flight cap at `latency` each; the longest chain of sequential pages at `latency`.
        latency: Seconds per request assumed.
        parts: Sub-ranges a deep range is split into (the scheduler's rule, at `latency`).
    """

    series: tuple[SeriesEstimate, ...]
    requests: int
    upper_requests: int
    bars: float
    seconds: float
    latency: float
    parts: int
    requests_per_minute: float
    max_in_flight: int

    @property
    def jobs(self) -> int:
        return sum(1 for s in self.series if s.job)


def estimate_series(config: Config, symbol: str, timeframe: Timeframe,
                    ranges: Iterable[FetchRange], *, parts: int,
                    density: Density | None = None, refused: str | None = None
                    ) -> tuple[SeriesEstimate, int]:
    """The series' estimate, and its longest sequential chain of requests."""
    ranges = tuple(ranges)
    if refused is not None:
        return SeriesEstimate(symbol, timeframe.label, (), 0, 0.0, 0, refused), 0
    limit = config.polygon.page_limit
    model = SeriesModel(symbol, timeframe, density or default_density(symbol))
    upper = SeriesModel(symbol, timeframe, UPPER_BOUND)
    requests = upper_requests = chain = 0
    bars = 0.0
    for fetch in ranges:
        n, b = range_requests(model, fetch, limit, parts)
        requests += n
        bars += b
        upper_requests += range_requests(upper, fetch, limit, parts)[0]
        # the first page, then the longest sub-range: about n / parts more when split
        chain = max(chain, 1 + math.ceil((n - 1) / max(1, parts)) if n > 1 else 1)
    return SeriesEstimate(symbol, timeframe.label, ranges, requests, bars, upper_requests), chain


def estimate(config: Config, plans: Iterable[tuple[str, Timeframe, list[FetchRange],
                                                   str | None]],
             *, latency: float = ASSUMED_LATENCY_SECONDS,
             densities: dict[str, Density] | None = None) -> Estimate:
    """The estimate of a cycle: `plans` are (symbol, timeframe, its ranges, refusal or None)
    for every configured series."""
    plans = list(plans)
    bf, pol = config.backfill, config.polygon
    symbols = {s for s, _, ranges, _ in plans if ranges}
    timeframes = {tf for _, tf, ranges, _ in plans if ranges}
    # At the split decision every running symbol's jobs have one walker each.
    walkers = min(bf.max_concurrent_symbols, max(1, len(symbols))) * max(1, len(timeframes))
    parts = parallel_parts(config, walkers=walkers, latency=latency)
    series = []
    chain = 0
    for symbol, tf, ranges, refused in plans:
        one, longest = estimate_series(config, symbol, tf, ranges, parts=parts,
                                       density=(densities or {}).get(symbol),
                                       refused=refused)
        series.append(one)
        chain = max(chain, longest)
    # plus the cycle's one market-wide splits check (daemon.splits), adjusted data only
    requests = sum(s.requests for s in series) + (1 if config.polygon.adjusted else 0)
    rate_bound = requests * 60 / pol.requests_per_minute if pol.requests_per_minute > 0 else 0.0
    cap_bound = requests * latency / pol.max_in_flight
    seconds = max(rate_bound, cap_bound, chain * latency) if requests else 0.0
    return Estimate(tuple(series), requests,
                    sum(s.upper_requests for s in series) + (requests - sum(s.requests
                                                                         for s in series)),
                    sum(s.bars for s in series), seconds, latency, parts,
                    pol.requests_per_minute, pol.max_in_flight)
