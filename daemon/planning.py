"""What to fetch: requested minus covered, as ranges sized in pages from the market calendar.

A series' requested span is `[first day, last day]` of `[backfill]`, in ET-midnight-anchored
Unix ms. `plan_series` turns `requested - covered` into `FetchRange`s:

- every hole is fetched (a first backfill, a resume after kill -9 mid-range, a history start
  moved backwards, a span whose bars were quarantined);
- the open tail (the part after the newest covered instant) is fetched from `overlap_bars` bars
  before it, because the vendor revises recent bars;
- holes separated by less than half a page of covered data are fetched as one range: asking
  for a few bars twice is cheaper than a request more.

A range is *closed* when it ends before the requested end: the API's answer for it is final, so
its last page covers through its end. The open tail's last page covers only through its newest
bar (a bar after it may still appear), so the next cycle asks again: one request per series.

`expected_aggregates` counts the API's `limit` units in a span (session minutes for minute and
hour bars, trading days for day bars and up) from the market calendar; it is an upper bound
(a minute with no trade has no aggregate). It sizes pages for `backfilld plan` and the
merging above. `split_range` divides the rest of a deep range into sub-ranges fetched
concurrently, sized from what its first page really covered.
"""

from __future__ import annotations

import datetime as dt
import math

import attrs

from .config import Config
from .market_calendar import (
    SESSION_CLOSE_MINUTE,
    SESSION_OPEN_MINUTE,
    day_length_minutes,
    et_date,
    et_midnight_ms,
    is_crypto,
    is_trading_day,
)
from .spans import Spans
from .timeframes import Timeframe

__all__ = [
    "FetchRange",
    "expected_aggregates",
    "expected_pages",
    "plan_series",
    "requested_span",
    "split_range",
]

_MINUTE_MS = 60_000
# Sub-ranges hold at least this many pages: a sub-range's last page is usually partial, so
# shorter ones would spend requests on partial pages.
MIN_PAGES_PER_SUBRANGE = 2


@attrs.frozen
class FetchRange:
    """`[from_ms, to_ms]` inclusive, as the API takes it; `closed`: see the module docstring."""

    from_ms: int
    to_ms: int
    closed: bool


def requested_span(config: Config, today: dt.date) -> tuple[int, int]:
    """`[lo, hi)` of the configured history, in Unix ms."""
    bf = config.backfill
    lo = et_midnight_ms(bf.first_day(today))
    hi = et_midnight_ms(bf.last_day(today) + dt.timedelta(days=1))
    return lo, hi


def plan_series(config: Config, symbol: str, timeframe: Timeframe, covered: Spans,
                today: dt.date) -> list[FetchRange]:
    """The ranges that bring one series up to date (empty: nothing to ask for)."""
    lo, hi = requested_span(config, today)
    if lo >= hi:
        return []
    wanted = Spans([(lo, hi)])
    have = covered & wanted
    missing = wanted - have
    if have and have[-1][1] < hi:
        top = have[-1][1]
        overlap = config.backfill.overlap_bars * timeframe.approx_ms
        missing = missing | Spans([(max(lo, top - overlap), top)])
    if not missing:
        return []
    limit = config.polygon.page_limit
    merged: list[list[int]] = []
    for a, b in missing:
        if merged and expected_aggregates(symbol, timeframe, merged[-1][1], a) < limit / 2:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    return [FetchRange(a, b - 1, closed=b < hi) for a, b in merged]


def expected_aggregates(symbol: str, timeframe: Timeframe, lo: int, hi: int) -> int:
    """Upper bound of the API's `limit` units in `[lo, hi)` (see the module docstring)."""
    if hi <= lo:
        return 0
    crypto = is_crypto(symbol)
    day, last = et_date(lo), et_date(hi - 1)
    total = 0
    while day <= last:
        if is_trading_day(day, crypto=crypto):
            midnight = et_midnight_ms(day)
            if timeframe.intraday:
                if crypto:
                    start, end = midnight, midnight + day_length_minutes(day) * _MINUTE_MS
                else:
                    start = midnight + SESSION_OPEN_MINUTE * _MINUTE_MS
                    end = midnight + SESSION_CLOSE_MINUTE * _MINUTE_MS
                overlap = min(end, hi) - max(start, lo)
                if overlap > 0:
                    total += -(-overlap // _MINUTE_MS)
            elif lo <= midnight < hi:
                total += 1
        day += dt.timedelta(days=1)
    return total


def expected_pages(symbol: str, timeframe: Timeframe, fetch: FetchRange, limit: int) -> int:
    """Requests a range should take: its aggregates over `limit`, at least one."""
    aggregates = expected_aggregates(symbol, timeframe, fetch.from_ms, fetch.to_ms + 1)
    return max(1, math.ceil(aggregates / limit))


def split_range(fetch: FetchRange, page_span_ms: int, parts: int) -> list[FetchRange]:
    """Split `fetch` into up to `parts` sub-ranges of at least MIN_PAGES_PER_SUBRANGE pages,
    a page being `page_span_ms` long (what a full page of this series just covered).

    Sub-ranges are equal in time and contiguous; all are closed but the last, which keeps
    `fetch.closed`. One range comes back when splitting would not pay.
    """
    length = fetch.to_ms + 1 - fetch.from_ms
    if page_span_ms <= 0 or parts <= 1 or length <= 0:
        return [fetch]
    pages = length / page_span_ms
    n = min(parts, int(pages // MIN_PAGES_PER_SUBRANGE))
    if n <= 1:
        return [fetch]
    edges = [fetch.from_ms + length * i // n for i in range(n + 1)]
    return [FetchRange(edges[i], edges[i + 1] - 1, closed=i < n - 1 or fetch.closed)
            for i in range(n)]

