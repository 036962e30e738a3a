"""Defective bars: a vendor sending impossible data, deterministically, so tests know which.

Per ticker, a rate in [0, 1] spoils that share of the ticker's bars in every answer. Whether
the bar at `t` is spoiled, and how, is a pure function of (seed, ticker, timeframe, t) and the
rate (`defect_kind`): a test computes the exact set with `defective_ts` and can assert what a
daemon stored, quarantined or refused. Raising the rate only adds bars (a bar spoiled at rate r
is spoiled, the same way, at any rate above r); rate 0 "corrects the vendor": later answers are
clean. Defects are applied after split scaling, to adjusted and raw answers alike.

What an answer holds for a spoiled bar at `t` (in its place in the page; every other bar is
served untouched):

    high_below_low   `h` and `l` swapped (or `h` set 0.0001 below `l` when they are equal)
    open_outside     `o` above `h`: `h + max(h - l, 0.01)`, rounded to 4 decimals
    close_outside    `c` below `l`: `l / 2` rounded (or above `h` for a price of 0.0001)
    negative_volume  `v` negated (`-1.0` for a zero volume)
    string_price     `o` as a JSON string that is no number: `"12.5x"` for 12.5
    missing_t        no `t` field
    missing_c        no `c` field
    t_outside_range  `t` moved past the far end of the requested range: `to + 1` for an
                     ascending request, `from - 1` for a descending one (outside every range a
                     paging client asks for); the good bar at `t` is missing from the answer
    duplicate_t      the bar sent twice in a row, identical: the answer has one bar more
    negative_trades  `n` negated (`-1` where `n` was absent)

`queryCount` and paging are those of the clean page: spoiling changes no `next_url`.

Error handling: none needed: pure functions of their arguments.
"""

from __future__ import annotations

import functools
import hashlib
from collections import Counter

from ..timeframes import Timeframe
from .data import RawBar, bars_between

__all__ = ["DEFECT_KINDS", "ServedBar", "defect_kind", "defective_ts", "spoil"]

DEFECT_KINDS = ("high_below_low", "open_outside", "close_outside", "negative_volume",
                "string_price", "missing_t", "missing_c", "t_outside_range", "duplicate_t",
                "negative_trades")
# A bar as served once it may be spoiled: a price can be a string.
ServedBar = dict[str, float | int | str]
_SCALE = float(1 << 32)


@functools.lru_cache(maxsize=1024)
def _key(seed: int, ticker: str, label: str) -> bytes:
    return hashlib.blake2b(f"{seed}|defect|{ticker}|{label}".encode(), digest_size=16).digest()


def defect_kind(seed: int, ticker: str, timeframe: Timeframe, t: int, rate: float) -> str | None:
    """How the bar of `ticker` at `timeframe` starting at `t` is spoiled at `rate`, or None."""
    if rate <= 0:
        return None
    digest = hashlib.blake2b(t.to_bytes(8, "little", signed=True), digest_size=8,
                             key=_key(seed, ticker, timeframe.label)).digest()
    if int.from_bytes(digest[:4], "little") / _SCALE >= rate:
        return None
    return DEFECT_KINDS[int.from_bytes(digest[4:], "little") % len(DEFECT_KINDS)]


def defective_ts(seed: int, ticker: str, timeframe: Timeframe, from_ms: int, to_ms: int,
                 rate: float) -> dict[int, str]:
    """{t: defect kind} for the bars with `from_ms <= t <= to_ms` spoiled at `rate`.

    `t` is the bar's own (good) start, also for `missing_t` and `t_outside_range`.
    """
    if rate <= 0:
        return {}
    out: dict[int, str] = {}
    for bar in bars_between(seed, ticker, timeframe, from_ms, to_ms):
        t = int(bar["t"])
        kind = defect_kind(seed, ticker, timeframe, t, rate)
        if kind is not None:
            out[t] = kind
    return out


def spoil(bars: list[RawBar], seed: int, ticker: str, timeframe: Timeframe, rate: float, *,
          from_ms: int, to_ms: int, descending: bool) -> tuple[list[ServedBar], Counter[str]]:
    """`bars` (one answer's, for the request `[from_ms, to_ms]`) with their defects applied.

    Returns the bars to serve (`bars` itself when none is spoiled: no copy) and how many of
    each kind were spoiled. `bars` is not modified.
    """
    counts: Counter[str] = Counter()
    if rate <= 0:
        return bars, counts  # type: ignore[return-value]  # a RawBar is a ServedBar
    out: list[ServedBar] = []
    for bar in bars:
        kind = defect_kind(seed, ticker, timeframe, int(bar["t"]), rate)
        if kind is None:
            out.append(bar)  # type: ignore[arg-type]  # a RawBar is a ServedBar
            continue
        counts[kind] += 1
        if kind == "duplicate_t":
            out += [bar, dict(bar)]  # type: ignore[list-item]
            continue
        out.append(_spoiled(bar, kind, from_ms=from_ms, to_ms=to_ms, descending=descending))
    return out, counts


def _spoiled(bar: RawBar, kind: str, *, from_ms: int, to_ms: int, descending: bool
             ) -> ServedBar:
    b: ServedBar = dict(bar)
    h, low = float(bar["h"]), float(bar["l"])
    if kind == "high_below_low":
        b["h"], b["l"] = (low, h) if h > low else (round(low - 0.0001, 4), low)
    elif kind == "open_outside":
        b["o"] = round(h + max(h - low, 0.01), 4)
    elif kind == "close_outside":
        b["c"] = round(low / 2, 4) if low > 0.0001 else round(h + 0.01, 4)
    elif kind == "negative_volume":
        b["v"] = -float(bar["v"]) if bar["v"] else -1.0
    elif kind == "string_price":
        b["o"] = f"{bar['o']}x"
    elif kind == "missing_t":
        del b["t"]
    elif kind == "missing_c":
        del b["c"]
    elif kind == "t_outside_range":
        b["t"] = from_ms - 1 if descending else to_ms + 1
    elif kind == "negative_trades":
        b["n"] = -int(bar["n"]) if "n" in bar else -1
    return b
