"""Deterministic bars: each one a pure function of (seed, ticker, timeframe, bucket start).

Why pure: the simulator, the tests and the benchmark must agree on every bar without sharing
state, across processes (so hashing uses blake2b, never Python's randomized `hash`), and the
simulator must serve any page in any order without remembering what it served.

How prices move:

- A per-ticker daily log-price is Brownian motion over days, built by midpoint displacement on
  2**17 days from 1900-01-01: the value on any day costs ~17 hashes (fewer with the per-call
  memo), without walking from an origin. It is pinned to the ticker's base price on
  `REFERENCE_DAY`. Day d opens near the close of day d-1 (a small overnight gap) and closes at
  exp(L(d)); weekends and holidays still move the walk, so Monday gaps from Friday.
- Intraday bars walk from the day's open to its close (a Brownian bridge over the session's
  buckets), seeded per (ticker, timeframe, day): every intraday timeframe agrees with the daily
  bar on the day's open and close, though not on highs and lows.
- Week, month and multi-day bars aggregate the 1d bars of their calendar days.

Fidelity to the API (as Polygon documents it): `t` is the bucket start in Unix ms UTC; intraday
buckets align to ET midnight and never cross it (see daemon.market_calendar for the DST rule);
equities and indices have bars only on trading days, 04:00-20:00 ET, where a bucket with no
trades has no bar (likelier before the open and after the close, and for illiquid tickers); `X:`
crypto trades every minute of every day. `vw` and `n` are each missing from a deterministic ~2 %
of bars.

Splits (daemon.simulator.splits): the series above is the fully adjusted price. Given splits,
`splits=` and `adjusted=` scale the bars before each split's execution date: raw bars
(`adjusted=False`) by every split, adjusted bars only by the hidden (unannounced) ones. Daily
bars are scaled before week/month/multi-day bars aggregate them. No splits: bars as generated.

Speed: one day is generated at a time, lazily, into a list; a page takes whole days at once
and walks bar by bar only through the day where it ends. Layouts and each ticker's daily
anchors are memoized across calls, bounded. ~630,000 bars/s generated and JSON-encoded on one
core (5m bars, one ticker, two years); the per-bar loop in `_intraday_day` is most of it, and
what it draws, in what order, is the data itself: keep its output bit for bit when tuning it.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import math
import random
from collections.abc import Iterable, Iterator

import attrs

from ..market_calendar import (
    SESSION_CLOSE_MINUTE,
    SESSION_OPEN_MINUTE,
    bucket_start_day,
    day_length_minutes,
    et_date,
    et_midnight_ms,
    is_crypto,
    is_trading_day,
)
from ..timeframes import Timeframe
from .splits import NO_ADJUSTMENT, Adjustment, Split, adjustment, scale_bar

__all__ = ["RawBar", "bars_between", "ground_truth", "page", "page_with_count"]

# One bar as the API's JSON has it: v vw o c h l t n (vw and n sometimes absent).
RawBar = dict[str, float | int]

# Midpoint displacement covers 2**ANCHOR_LEVELS days from ANCHOR_ORIGIN (1900 to 2258);
# days outside are clamped to the ends (flat prices, still valid bars).
ANCHOR_LEVELS = 17
ANCHOR_ORIGIN = dt.date(1900, 1, 1)
# Prices sit at the ticker's base price on this day and wander away from it both ways.
REFERENCE_DAY = dt.date(2024, 1, 2)
# A ticker's anchor memo is forgotten past this many entries (~40 years of days, ~3 MB): the
# memos are kept across calls for 64 tickers, so they must stay bounded.
MAX_ANCHOR_MEMO = 30_000
# Regular trading hours, minutes after ET midnight: most volume and trades happen here.
REGULAR_OPEN_MINUTE = 9 * 60 + 30
REGULAR_CLOSE_MINUTE = 16 * 60
# Extended-hours minutes carry this share of a regular minute's volume and variance.
EXTENDED_VOLUME_WEIGHT = 0.08
EXTENDED_VARIANCE_WEIGHT = 0.3
# Share of bars without `vw`, and without `n` (the API omits them sometimes).
OMIT_VW_RATE = 0.02
OMIT_N_RATE = 0.02
# The overnight gap's standard deviation, as a fraction of the daily volatility.
GAP_FRACTION = 0.25
# High/low extend past open/close by up to this many step deviations.
WICK_FACTOR = 0.8

_MINUTE_MS = 60_000
_ANCHOR_DAYS = 1 << ANCHOR_LEVELS
_ORIGIN_ORDINAL = ANCHOR_ORIGIN.toordinal()
_UNIFORM_SD = math.sqrt(12.0)  # (U - 0.5) * sqrt(12) has unit variance
_DAILY = Timeframe(1, "d")


@attrs.frozen
class _Profile:
    """What makes one ticker look like itself: price level, volatility, volume, liquidity."""

    key: bytes
    crypto: bool
    log_base: float
    daily_vol: float
    volume_per_minute: float
    trade_size: float
    p_regular: float  # chance a regular-hours minute has a trade (always hours for crypto)
    p_extended: float


def _unit(digest: bytes, index: int) -> float:
    """A uniform in [0, 1) from two bytes of a digest."""
    return int.from_bytes(digest[2 * index: 2 * index + 2], "little") / 65536.0


@functools.lru_cache(maxsize=1024)
def _profile(seed: int, ticker: str) -> _Profile:
    key = hashlib.blake2b(f"{seed}|{ticker}".encode(), digest_size=16).digest()
    u = [_unit(key, i) for i in range(8)]
    crypto = is_crypto(ticker)
    if crypto:
        liquidity = 0.8 + 0.195 * u[4]
        return _Profile(key, True, math.log(10 ** (-0.5 + 5 * u[0])), 0.03 + 0.02 * u[1],
                        10 ** (-0.5 + 3 * u[2]), 0.02 + 0.3 * u[3], liquidity, liquidity)
    index = ticker.startswith("I:")
    return _Profile(
        key, False,
        math.log(10 ** (1 + 2.5 * u[0])),
        (0.008 + 0.006 * u[1]) if index else (0.012 + 0.02 * u[1]),
        10 ** (2 + 3 * u[2]),
        50 + 250 * u[3],
        0.97 + 0.0299 * u[4],
        0.3 + 0.65 * u[4],
    )


def _normal(digest: bytes) -> float:
    """An approximately standard normal from 8 digest bytes (Irwin-Hall of four uniforms)."""
    total = sum(int.from_bytes(digest[i: i + 2], "little") for i in (0, 2, 4, 6))
    return (total - 2 * 65535.5) / (65536.0 * math.sqrt(4 / 12))


class _Anchors:
    """Daily log-closes of one ticker, memoized across calls (see `_anchors`).

    Pure: the memos only save work, so forgetting them (past MAX_ANCHOR_MEMO) is harmless.
    """

    def __init__(self, profile: _Profile) -> None:
        self.profile = profile
        self.memo: dict[int, float] = {}
        self.days: dict[int, tuple[float, float]] = {}  # ordinal -> open_close
        self.offset = 0.0
        self.offset = self._w(self._index(REFERENCE_DAY))

    @staticmethod
    def _index(day: dt.date) -> int:
        return min(max(day.toordinal() - _ORIGIN_ORDINAL, 0), _ANCHOR_DAYS)

    def _noise(self, tag: bytes, i: int) -> float:
        digest = hashlib.blake2b(self.profile.key + tag + i.to_bytes(4, "little"),
                                 digest_size=8).digest()
        return _normal(digest)

    def _w(self, i: int) -> float:
        """Brownian motion at day index i (W(0)=0), by midpoint displacement."""
        value = self.memo.get(i)
        if value is None:
            if i == 0:
                value = 0.0
            elif i == _ANCHOR_DAYS:
                value = self._noise(b"w", i) * math.sqrt(_ANCHOR_DAYS)
            else:
                low = i & -i  # i is the midpoint of [i - low, i + low]
                value = (self._w(i - low) + self._w(i + low)) / 2 + self._noise(
                    b"w", i) * math.sqrt(low / 2)
            self.memo[i] = value
        return value

    def log_close(self, day: dt.date) -> float:
        p = self.profile
        return p.log_base + p.daily_vol * (self._w(self._index(day)) - self.offset)

    def open_close(self, day: dt.date) -> tuple[float, float]:
        """The day's first and last price (unrounded)."""
        ordinal = day.toordinal()
        found = self.days.get(ordinal)
        if found is None:
            if len(self.memo) > MAX_ANCHOR_MEMO:
                self.memo.clear()
                self.days.clear()
            p = self.profile
            gap = GAP_FRACTION * p.daily_vol * self._noise(b"g", self._index(day))
            found = self.days[ordinal] = (
                math.exp(self.log_close(day - dt.timedelta(days=1)) + gap),
                math.exp(self.log_close(day)))
        return found


@functools.lru_cache(maxsize=64)
def _anchors(profile: _Profile) -> _Anchors:
    """One `_Anchors` per ticker, kept: consecutive pages share their days' anchors."""
    return _Anchors(profile)


def _day_rng(profile: _Profile, label: str, day: dt.date) -> random.Random:
    digest = hashlib.blake2b(profile.key + label.encode() + day.toordinal().to_bytes(4, "little"),
                             digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def _quantum(price: float) -> float:
    """Prices are quoted in cents, in 1/10000 below one dollar."""
    return 100.0 if price >= 1.0 else 10_000.0


# One intraday bucket of a day's layout: offset from ET midnight (ms), base minutes it covers,
# chance it has a bar, its expected volume (the ticker's volume per regular minute times the
# bucket's share in regular-minute units), its step deviation and the fraction of the day's
# variance elapsed at its end (for the bridge).
_Slot = tuple[int, int, float, float, float, float]
# A day's layout: its slots, and their step deviations alone (the walk's inner loop).
_Layout = tuple[tuple[_Slot, ...], tuple[float, ...]]


@functools.lru_cache(maxsize=256)
def _layout(profile: _Profile, size: int, day_minutes: int) -> _Layout:
    """The buckets one day holds for a bucket size of `size` minutes."""
    if profile.crypto:
        open_, close, reg_open, reg_close = 0, day_minutes, 0, day_minutes
    else:
        open_, close = SESSION_OPEN_MINUTE, SESSION_CLOSE_MINUTE
        reg_open, reg_close = REGULAR_OPEN_MINUTE, REGULAR_CLOSE_MINUTE
    raw = []
    for start in range(0, day_minutes, size):
        lo, hi = max(start, open_), min(start + size, day_minutes, close)
        if hi <= lo:
            continue
        regular = max(0, min(hi, reg_close) - max(lo, reg_open))
        extended = hi - lo - regular
        p_none = (1 - profile.p_regular) ** regular * (1 - profile.p_extended) ** extended
        variance = regular + EXTENDED_VARIANCE_WEIGHT * extended
        raw.append((start, hi - lo, 1 - p_none, regular + EXTENDED_VOLUME_WEIGHT * extended,
                    variance))
    total = sum(r[4] for r in raw) or 1.0
    slots, elapsed = [], 0.0
    for start, minutes, p_bar, volume, variance in raw:
        elapsed += variance / total
        slots.append((start * _MINUTE_MS, minutes, p_bar, profile.volume_per_minute * volume,
                      profile.daily_vol * math.sqrt(variance / total) * _UNIFORM_SD, elapsed))
    return tuple(slots), tuple(slot[4] for slot in slots)


def _intraday_day(profile: _Profile, anchors: _Anchors, timeframe: Timeframe, day: dt.date
                  ) -> tuple[list[int], list[RawBar]]:
    """The bars of one day, ascending, and each one's cost (base minutes it covers).

    The hot loop of the simulator (a profile puts ~70 % of serving here): locals only, one
    dict per bar built with its final keys, no per-bar calls but the RNG and `exp`. The draw
    order of the day's RNG is part of the data: change it and every seed's bars change.
    """
    crypto = profile.crypto
    if not is_trading_day(day, crypto=crypto):
        return [], []
    size = timeframe.multiplier * (60 if timeframe.unit == "h" else 1)
    layout, steps = _layout(profile, size, day_length_minutes(day) if crypto else 1440)
    rand = _day_rng(profile, timeframe.label, day).random
    first, last = anchors.open_close(day)
    q = _quantum(first)
    vq = 10_000.0 if crypto else 1.0
    trade_size = profile.trade_size
    midnight = et_midnight_ms(day)

    walk: list[float] = []
    cum = 0.0
    append_walk = walk.append
    for step in steps:
        cum += (rand() - 0.5) * step
        append_walk(cum)
    drift = math.log(last / first) - cum  # spread over the day by elapsed variance (bridge)

    costs: list[int] = []
    bars: list[RawBar] = []
    add_cost, add_bar = costs.append, bars.append
    exp = math.exp
    keep_n = 1.0 - OMIT_N_RATE
    prev = int(first * q + 0.5) / q
    for (offset, minutes, p_bar, volume, step, elapsed), w in zip(layout, walk, strict=True):
        price = int(first * exp(w + drift * elapsed) * q + 0.5) / q
        r = rand()
        if r < p_bar:
            o, c = prev, price
            hi, lo = (o, c) if o > c else (c, o)
            wick = price * step * WICK_FACTOR
            h = int((hi + wick * rand()) * q + 0.5) / q
            low = int((lo - wick * rand()) * q + 0.5) / q
            if low <= 0.0:
                low = lo
            v = int(volume * (0.3 + 1.4 * rand()) * vq + 1.0) / vq
            vw = int((low + (h - low) * (0.2 + 0.6 * rand())) * 10_000 + 0.5) / 10_000
            flag = r / p_bar  # uniform in [0, 1), whichever buckets trade: see _omit
            if flag < OMIT_VW_RATE:
                add_bar({"v": v, "o": o, "c": c, "h": h, "l": low, "t": midnight + offset,
                         "n": int(v / trade_size) + 1})
            elif flag >= keep_n:
                add_bar({"v": v, "vw": vw, "o": o, "c": c, "h": h, "l": low,
                         "t": midnight + offset})
            else:
                add_bar({"v": v, "vw": vw, "o": o, "c": c, "h": h, "l": low,
                         "t": midnight + offset, "n": int(v / trade_size) + 1})
            add_cost(minutes)
        prev = price
    return costs, bars


def _daily_bar(profile: _Profile, anchors: _Anchors, day: dt.date) -> RawBar | None:
    """The 1d bar of `day`, or None when the market was closed."""
    if not is_trading_day(day, crypto=profile.crypto):
        return None
    first, last = anchors.open_close(day)
    q = _quantum(first)
    rng = _day_rng(profile, _DAILY.label, day)
    rand = rng.random
    o, c = int(first * q + 0.5) / q, int(last * q + 0.5) / q
    hi, lo = (o, c) if o > c else (c, o)
    wick = first * profile.daily_vol * WICK_FACTOR
    h = int((hi + wick * rand()) * q + 0.5) / q
    low = int((lo - wick * rand()) * q + 0.5) / q
    if low <= 0.0:
        low = lo
    minutes = 1440 if profile.crypto else REGULAR_CLOSE_MINUTE - REGULAR_OPEN_MINUTE
    vq = 10_000.0 if profile.crypto else 1.0
    v = int(profile.volume_per_minute * minutes * (0.5 + rand()) * vq + 1.0) / vq
    vw = int((low + (h - low) * (0.2 + 0.6 * rand())) * 10_000 + 0.5) / 10_000
    bar: RawBar = {"v": v, "vw": vw, "o": o, "c": c, "h": h, "l": low, "t": et_midnight_ms(day),
                   "n": int(v / profile.trade_size) + 1}
    _omit(bar, rand())
    return bar


def _omit(bar: RawBar, flag: float) -> None:
    """Drop `vw` or `n` for a uniform `flag` in the bottom/top few percent."""
    if flag < OMIT_VW_RATE:
        del bar["vw"]
    elif flag >= 1.0 - OMIT_N_RATE:
        del bar["n"]


def _aggregate(profile: _Profile, label: str, start: dt.date, days: list[RawBar]) -> RawBar:
    """A multi-day/week/month bar from its 1d bars."""
    v = sum(b["v"] for b in days)
    notional = sum(b.get("vw", (b["h"] + b["l"] + b["c"]) / 3) * b["v"] for b in days)
    h, low = max(b["h"] for b in days), min(b["l"] for b in days)
    vq = 10_000.0 if profile.crypto else 1.0
    vw = min(max(int(notional / v * 10_000 + 0.5) / 10_000, low), h) if v else days[-1]["c"]
    bar: RawBar = {"v": int(v * vq + 0.5) / vq, "vw": vw, "o": days[0]["o"], "c": days[-1]["c"],
                "h": h, "l": low, "t": et_midnight_ms(start),
                "n": sum(int(b.get("n", b["v"] / profile.trade_size)) for b in days)}
    _omit(bar, _day_rng(profile, label, start).random())
    return bar


def _next_bucket(timeframe: Timeframe, start: dt.date) -> dt.date:
    mult = timeframe.multiplier
    if timeframe.unit == "d":
        return start + dt.timedelta(days=mult)
    if timeframe.unit == "w":
        return start + dt.timedelta(weeks=mult)
    months = start.year * 12 + start.month - 1 + mult
    return dt.date(months // 12, months % 12 + 1, 1)


def _bucket_starts(timeframe: Timeframe, first_day: dt.date, last_day: dt.date, *,
                   descending: bool) -> Iterator[dt.date]:
    """First days of the day/week/month buckets overlapping [first_day, last_day], lazily."""
    first, last = bucket_start_day(timeframe, first_day), bucket_start_day(timeframe, last_day)
    if descending:
        while last >= first:
            yield last
            last = bucket_start_day(timeframe, last - dt.timedelta(days=1))
    else:
        while first <= last:
            yield first
            first = _next_bucket(timeframe, first)


def _chunks(seed: int, ticker: str, timeframe: Timeframe, from_ms: int, to_ms: int,
            *, descending: bool = False, adjust: Adjustment = NO_ADJUSTMENT
            ) -> Iterator[tuple[list[int], list[RawBar]]]:
    """(costs, bars) in order for every bar with from_ms <= t <= to_ms, a day at a time.

    A cost counts the base aggregates of its bar (see `page`). Intraday chunks are whole ET
    days, cut only at the ends of the range; split factors change only at ET midnights, so a
    day's bars share one factor.
    """
    if to_ms < from_ms:
        return
    profile = _profile(seed, ticker)
    anchors = _anchors(profile)
    first_day, last_day = et_date(from_ms), et_date(to_ms)
    if timeframe.intraday:
        ordinals = range(first_day.toordinal(), last_day.toordinal() + 1)
        for ordinal in reversed(ordinals) if descending else ordinals:
            day = dt.date.fromordinal(ordinal)
            costs, bars = _intraday_day(profile, anchors, timeframe, day)
            if not bars:
                continue
            if bars[0]["t"] < from_ms or bars[-1]["t"] > to_ms:  # a day at an end of the range
                kept = [i for i, b in enumerate(bars) if from_ms <= b["t"] <= to_ms]
                costs, bars = [costs[i] for i in kept], [bars[i] for i in kept]
            if adjust and (factor := adjust.factor(et_midnight_ms(day))) != 1.0:
                bars = [scale_bar(b, factor) for b in bars]
            if descending:
                costs.reverse()
                bars.reverse()
            if bars:
                yield costs, bars
        return
    for start in _bucket_starts(timeframe, first_day, last_day, descending=descending):
        t = et_midnight_ms(start)
        if not from_ms <= t <= to_ms:
            continue
        if timeframe == _DAILY:
            daily = _daily_bar(profile, anchors, start)
            if daily is not None:
                yield [1], [_scaled(daily, adjust) if adjust else daily]
            continue
        end = _next_bucket(timeframe, start)
        days = [_scaled(b, adjust) if adjust else b for i in range((end - start).days)
                if (b := _daily_bar(profile, anchors, start + dt.timedelta(days=i)))]
        if days:
            yield [len(days)], [_aggregate(profile, timeframe.label, start, days)]


def _scaled(bar: RawBar, adjust: Adjustment) -> RawBar:
    factor = adjust.factor(int(bar["t"]))
    return bar if factor == 1.0 else scale_bar(bar, factor)


def _series(seed: int, ticker: str, timeframe: Timeframe, from_ms: int, to_ms: int,
            *, descending: bool = False, adjust: Adjustment = NO_ADJUSTMENT
            ) -> Iterator[RawBar]:
    """Every bar with from_ms <= t <= to_ms, in order (`_chunks` without the costs)."""
    for _, bars in _chunks(seed, ticker, timeframe, from_ms, to_ms, descending=descending,
                           adjust=adjust):
        yield from bars


def bars_between(seed: int, ticker: str, timeframe: Timeframe, from_ms: int, to_ms: int, *,
                 splits: Iterable[Split] = (), adjusted: bool = True) -> Iterator[RawBar]:
    """Every bar with `from_ms <= t <= to_ms`, ascending, generated lazily one day at a time.

    Each bar is a dict with `v vw o c h l t n` (`vw`/`n` sometimes absent), exactly what the
    simulator puts in `results` for a request with this `adjusted` while `splits` (the
    simulator's splits of any tickers, visible and hidden) are registered.
    """
    yield from _series(seed, ticker, timeframe, from_ms, to_ms,
                       adjust=adjustment(splits, ticker, adjusted=adjusted))


def ground_truth(seed: int, ticker: str, timeframe: Timeframe, from_ms: int, to_ms: int, *,
                 splits: Iterable[Split] = (), adjusted: bool = True) -> list[RawBar]:
    """`bars_between` as a list: what a complete, exact backfill must hold."""
    return list(bars_between(seed, ticker, timeframe, from_ms, to_ms, splits=splits,
                             adjusted=adjusted))


def page_with_count(seed: int, ticker: str, timeframe: Timeframe, from_ms: int, to_ms: int,
                    limit: int, *, descending: bool = False, splits: Iterable[Split] = (),
                    adjusted: bool = True, adjust: Adjustment | None = None
                    ) -> tuple[list[RawBar], int | None, int]:
    """`page`, plus the number of base aggregates it covers (the API's `queryCount`).

    `adjust`: the factors already computed from `splits` and `adjusted` (which it overrides).
    """
    bars: list[RawBar] = []
    used = 0
    if adjust is None:
        adjust = adjustment(splits, ticker, adjusted=adjusted)
    for costs, chunk in _chunks(seed, ticker, timeframe, from_ms, to_ms, descending=descending,
                                adjust=adjust):
        total = sum(costs)
        if used + total <= limit:  # the whole day fits (the common case: no per-bar work)
            bars += chunk
            used += total
            continue
        for cost, bar in zip(costs, chunk, strict=True):
            if bars and used + cost > limit:
                return bars, int(bar["t"]), used
            bars.append(bar)
            used += cost
    return bars, None, used


def page(seed: int, ticker: str, timeframe: Timeframe, from_ms: int, to_ms: int, limit: int,
         *, descending: bool = False, splits: Iterable[Split] = (), adjusted: bool = True
         ) -> tuple[list[RawBar], int | None]:
    """One page of at most `limit` base aggregates, and where the next page starts.

    `limit` counts base aggregates as the API does: session minutes for minute and hour bars (a
    5m bar costs 5, a 4h bar up to 240), trading days for day, week and month bars. A page
    always holds at least one bar, so paging cannot stall. The second value is the `t` of the
    first bar left out (the next `from`, or the next inclusive `to` when `descending`), or None
    when this is the last page; every non-last page is non-empty.
    """
    bars, next_ms, _ = page_with_count(seed, ticker, timeframe, from_ms, to_ms, limit,
                                       descending=descending, splits=splits, adjusted=adjusted)
    return bars, next_ms
