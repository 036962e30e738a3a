"""The bar as it travels from the API to the writer, and the checks it must pass on the way.

Decoding is typed (msgspec): a page of 50,000 bars costs ~23 ms, not ~58 ms with `json`. Each
bar is judged on its own: a bar that cannot be decoded (a string where a price belongs, a
missing field) or that is impossible (`h < l`, a negative volume...) is *quarantined* — kept
aside with its raw JSON and the reason — and the page's other bars go on to the writer. One bad
bar must not block its series; the quarantined spot stays out of the series' coverage, so every
top-up asks the API for it again (daemon.planning) until an answer validates.

A body that is not JSON at all, or not the aggregates shape, is a BadResponse (retried): that
is the transport or the server failing, not a bar.

These functions are pure and CPU-bound; the client runs them in a worker thread so the event
loop stays responsive while a 50,000-bar page is decoded.
"""

from __future__ import annotations

import functools
import math
import struct
from collections import Counter

import attrs
import msgspec

from .errors import BadResponse

__all__ = ["PG_EPOCH_US", "AggsResponse", "Bar", "CopyRows", "DecodedPage", "Quarantined",
           "check_bars", "decode_page", "encode_copy_rows"]


class Bar(msgspec.Struct, frozen=True, array_like=False):
    """One aggregate as the API sends it: `t` is Unix ms at bar start (UTC)."""

    t: int
    o: float
    h: float
    l: float  # noqa: E741 - the API's field name
    c: float
    v: float
    vw: float | None = None
    n: int | None = None
    otc: bool = False


class AggsResponse(msgspec.Struct):
    """The body of /v2/aggs/ticker/...; `results` is omitted when empty (null: retry)."""

    status: str
    results: list[Bar] | None | msgspec.UnsetType = msgspec.UNSET
    next_url: str | None = None
    resultsCount: int | None = None  # noqa: N815 - the API's field name
    ticker: str | None = None
    request_id: str | None = None
    message: str | None = None
    error: str | None = None


class _LooseResponse(msgspec.Struct):
    """The same body with each bar left raw: the slow path, taken when a bar does not decode."""

    status: str
    results: list[msgspec.Raw] | None | msgspec.UnsetType = msgspec.UNSET
    next_url: str | None = None
    message: str | None = None
    error: str | None = None


_TYPED = msgspec.json.Decoder(AggsResponse)
_LOOSE = msgspec.json.Decoder(_LooseResponse)
_BAR = msgspec.json.Decoder(Bar)
_ANY = msgspec.json.Decoder()
_ENCODE = msgspec.json.Encoder()
# Characters of a bad bar's raw JSON kept in quarantine (a bar is ~100 bytes; this is a cap).
RAW_CHARS = 2_000


@attrs.frozen
class Quarantined:
    """A bar that was not written, and why.

    Attributes:
        t: Its `t` when it had a usable one inside the requested range; None otherwise (then
            only the whole page's span can be held back, since the bar's place is unknown).
        raw: The bar's JSON as received (truncated to RAW_CHARS).
        reason: What is wrong with it, for a person.
    """

    t: int | None
    raw: str
    reason: str


@attrs.frozen
class CopyRows:
    """A page's valid bars as `bars` takes them: PostgreSQL binary COPY rows of `(symbol,
    timeframe, ts, open, high, low, close, volume, vwap, trades)`, without the file header.

    Rows of `bars` itself, so the writer copies a page of new bars straight into the table
    (no stage, no INSERT ... SELECT: measured ~20 % less server time per bar), and into its
    stage only when the page may overlap stored bars (the upsert).

    Why bytes and not Bar objects: a 10,000-bar page is ~1 MB this way and ~3 MB as Python
    objects, and it waits in the writer's queue; and the encoding (a Python call per bar) is
    done here, in the decoding worker thread, not on the writer's critical path.
    """

    count: int
    first_t: int  # the first and last bar's t (ascending pages: the span's ends)
    last_t: int
    payload: bytes | bytearray = attrs.field(repr=lambda payload: f"<{len(payload)} bytes>")
    series: tuple[str, str]  # the (symbol, timeframe) the rows carry

    @property
    def empty(self) -> bool:
        return self.count == 0


@attrs.frozen
class DecodedPage:
    """One body, decoded: the usable bars, the quarantined ones, and the envelope."""

    status: str
    next_url: str | None
    bars: list[Bar]
    quarantined: tuple[Quarantined, ...]
    results_null: bool
    message: str | None  # the body's `message` or `error`, when it has one
    rows: CopyRows | None = None


def decode_page(body: bytes, from_ms: int, to_ms: int, *, symbol: str,
                timeframe: str) -> DecodedPage:
    """Decode an aggregates body of one series and judge each bar against `[from_ms, to_ms]`.

    Error handling: BadResponse when the body is not JSON or not the aggregates shape.
    """
    quarantined: list[Quarantined] = []
    try:
        typed = _TYPED.decode(body)
    except msgspec.ValidationError:
        typed = None  # a field of some bar (or of the envelope) is of the wrong type
    except msgspec.DecodeError as exc:
        raise BadResponse(f"not an aggregates body: {exc}") from None
    if typed is not None:
        status, next_url, message = typed.status, typed.next_url, typed.message or typed.error
        results: list[Bar] | None = (typed.results if not isinstance(typed.results,
                                                                     msgspec.UnsetType) else [])
    else:
        try:
            loose = _LOOSE.decode(body)
        except msgspec.DecodeError as exc:
            raise BadResponse(f"not an aggregates body: {exc}") from None
        status, next_url, message = loose.status, loose.next_url, loose.message or loose.error
        results = None if loose.results is None else []
        raws = loose.results if isinstance(loose.results, list) else []
        for raw in raws:
            try:
                results.append(_BAR.decode(raw))  # type: ignore[union-attr]
            except msgspec.DecodeError as exc:
                quarantined.append(Quarantined(_usable_t(raw, from_ms, to_ms), _raw_text(raw),
                                               f"undecodable bar: {exc}"))
    if results is None:
        return DecodedPage(status, next_url, [], (), True, message)
    good, bad = check_bars(results, from_ms, to_ms)
    rows, unfit = encode_copy_rows(good, symbol, timeframe)
    if unfit:  # a value PostgreSQL cannot hold (a trade count past int8): that bar only
        good = [b for b in good if b not in unfit]
        bad += [Quarantined(b.t, _raw_text(_ENCODE.encode(b)), "a value out of range for "
                            "the database (trade count past 64 bits)") for b in unfit]
    return DecodedPage(status, next_url, good, (*quarantined, *bad), False, message, rows)


# A binary timestamptz is microseconds since 2000-01-01 UTC; a bar's t is Unix milliseconds.
PG_EPOCH_US = 946_684_800_000_000
_NULL = -1


@functools.lru_cache(maxsize=64)
def _row_structs(symbol: bytes, timeframe: bytes) -> dict[tuple[bool, bool], struct.Struct]:
    """One struct per null pattern of (vwap, trades) for one series: a row is one pack() call.
    The series' two text fields lead each row, their lengths and bytes fixed in the format."""
    head = (f">hi{len(symbol)}si{len(timeframe)}s"  # field count, symbol, timeframe
            "iqididididid")  # then (length, value) for ts, o, h, l, c, v
    return {(True, True): struct.Struct(head + "idiq"),
            (True, False): struct.Struct(head + "idi"),
            (False, True): struct.Struct(head + "iiq"),
            (False, False): struct.Struct(head + "ii")}


def encode_copy_rows(bars: list[Bar], symbol: str, timeframe: str
                     ) -> tuple[CopyRows, list[Bar]]:
    """The binary COPY rows of `bars` of one series, and the bars that cannot be encoded (left
    out).

    The buffer is sized exactly first, then filled with `pack_into`: one allocation per page,
    not a growing buffer reallocated as it fills (which fragments the heap of a long run).
    """
    sym, tf = symbol.encode(), timeframe.encode()
    structs = _row_structs(sym, tf)
    sizes = {key: st.size for key, st in structs.items()}
    packs = {key: st.pack_into for key, st in structs.items()}
    ns, nt = len(sym), len(tf)
    epoch = PG_EPOCH_US
    total = 0
    for bar in bars:
        total += sizes[bar.vw is not None, bar.n is not None]
    out = bytearray(total)
    offset = 0
    unfit: list[Bar] = []
    for bar in bars:
        vw, n = bar.vw, bar.n
        key = (vw is not None, n is not None)
        ts = bar.t * 1000 - epoch
        try:
            if vw is not None and n is not None:
                packs[key](out, offset, 10, ns, sym, nt, tf, 8, ts, 8, bar.o, 8, bar.h, 8, bar.l,
                           8, bar.c, 8, bar.v, 8, vw, 8, n)
            elif vw is not None:
                packs[key](out, offset, 10, ns, sym, nt, tf, 8, ts, 8, bar.o, 8, bar.h, 8, bar.l,
                           8, bar.c, 8, bar.v, 8, vw, _NULL)
            elif n is not None:
                packs[key](out, offset, 10, ns, sym, nt, tf, 8, ts, 8, bar.o, 8, bar.h, 8, bar.l,
                           8, bar.c, 8, bar.v, _NULL, 8, n)
            else:
                packs[key](out, offset, 10, ns, sym, nt, tf, 8, ts, 8, bar.o, 8, bar.h, 8, bar.l,
                           8, bar.c, 8, bar.v, _NULL, _NULL)
        except struct.error:
            unfit.append(bar)
            continue
        offset += sizes[key]
    if unfit:
        del out[offset:]
        kept = [b for b in bars if b not in unfit]
    else:
        kept = bars
    first = kept[0].t if kept else 0
    last = kept[-1].t if kept else 0
    return CopyRows(len(kept), first, last, out, (symbol, timeframe)), unfit


def check_bars(bars: list[Bar], from_ms: int, to_ms: int) -> tuple[list[Bar], list[Quarantined]]:
    """Split a page's bars into the valid ones (in order) and the quarantined ones.

    A bar is impossible when a price or the volume is NaN/inf, `h < l`, `o` or `c` lies outside
    `[l, h]`, the volume or trade count is negative, `vw` is not finite, its `t` falls outside
    the requested `[from_ms, to_ms]`, or its `t` repeats within the page (then every copy is
    quarantined: which one is right cannot be told).
    """
    counts = Counter(bar.t for bar in bars)
    good: list[Bar] = []
    bad: list[Quarantined] = []
    isfinite = math.isfinite
    for bar in bars:
        o, h, low, c, v = bar.o, bar.h, bar.l, bar.c, bar.v
        reason = None
        if not (isfinite(o) and isfinite(h) and isfinite(low) and isfinite(c) and isfinite(v)):
            reason = "a price or the volume is NaN or infinite"
        elif h < low:
            reason = f"high {h} < low {low}"
        elif not (low <= o <= h and low <= c <= h):
            reason = f"open {o} or close {c} outside [low {low}, high {h}]"
        elif v < 0:
            reason = f"negative volume {v}"
        elif bar.vw is not None and not isfinite(bar.vw):
            reason = "vwap is NaN or infinite"
        elif bar.n is not None and bar.n < 0:
            reason = f"negative trade count {bar.n}"
        elif not from_ms <= bar.t <= to_ms:
            reason = f"timestamp outside the requested range [{from_ms}, {to_ms}]"
        elif counts[bar.t] > 1:
            reason = "timestamp repeated within one response"
        if reason is None:
            good.append(bar)
        else:
            t = bar.t if from_ms <= bar.t <= to_ms else None
            bad.append(Quarantined(t, _raw_text(_ENCODE.encode(bar)), reason))
    return good, bad


def _usable_t(raw: bytes | msgspec.Raw, from_ms: int, to_ms: int) -> int | None:
    try:
        value = _ANY.decode(raw)
    except msgspec.DecodeError:
        return None
    t = value.get("t") if isinstance(value, dict) else None
    if isinstance(t, int) and not isinstance(t, bool) and from_ms <= t <= to_ms:
        return t
    return None


def _raw_text(raw: bytes | msgspec.Raw) -> str:
    return bytes(raw).decode("utf-8", "replace")[:RAW_CHARS]
