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

import math
from collections import Counter

import attrs
import msgspec

from .errors import BadResponse

__all__ = ["AggsResponse", "Bar", "DecodedPage", "Quarantined", "check_bars", "decode_page"]


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
class DecodedPage:
    """One body, decoded: the usable bars, the quarantined ones, and the envelope."""

    status: str
    next_url: str | None
    bars: list[Bar]
    quarantined: tuple[Quarantined, ...]
    results_null: bool
    message: str | None  # the body's `message` or `error`, when it has one


def decode_page(body: bytes, from_ms: int, to_ms: int) -> DecodedPage:
    """Decode an aggregates body and judge each bar against `[from_ms, to_ms]`.

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
    return DecodedPage(status, next_url, good, (*quarantined, *bad), False, message)


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
