"""What the simulator can be told: `SimulatorOptions` and the `backfilld simulate` arguments.

Everything a test or the demo scripts up front lives here (the rate, latency, faults,
entitlements, outages, defects, splits, the page cache); what changes at run time goes through
the control endpoints (daemon.simulator.control). `simulator_process` (daemon.simulator.process)
passes the same options on a command line.

Error handling: a bad value raises ValueError from `SimulatorOptions` and
argparse.ArgumentTypeError (exit 2 with a message) from the command line.
"""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Iterable, Mapping

import attrs

from .faults import ALL_FAULT_KINDS, FAULT_KINDS
from .splits import Split

__all__ = ["DEFAULT_PORT", "SimulatorOptions", "add_simulate_arguments", "options_from_args",
           "parse_split"]

DEFAULT_PORT = 8765
# The rate-limit window. A fractional rate (2.5/min) becomes 2 requests per 48 s, same rate.
WINDOW_SECONDS = 60.0
# Rendered pages kept for repeats and retries: enough for the demo's whole history of one
# symbol at 5m, small beside the daemon and PostgreSQL sharing the machine.
CACHE_BYTES = 64 * 1024 * 1024
TIMESPANS = ("minute", "hour", "day", "week", "month")


def parse_split(text: str) -> Split:
    """`TICKER:YYYY-MM-DD:FROM:TO[:hidden]`, read from the right (tickers may hold ':').

    Error handling: ValueError naming the expected shape.
    """
    parts = text.split(":")
    hidden = parts[-1] == "hidden"
    if hidden:
        parts = parts[:-1]
    try:
        *ticker, date, split_from, split_to = parts
        return Split(":".join(ticker), date, float(split_from), float(split_to), hidden=hidden)
    except ValueError:
        raise ValueError(f"expected TICKER:YYYY-MM-DD:FROM:TO[:hidden], e.g. "
                         f"NVDA:2024-06-10:1:10: {text!r}") from None


def _splits(value: Iterable[Split | str]) -> tuple[Split, ...]:
    return tuple(s if isinstance(s, Split) else parse_split(s) for s in value)


def _latency(value: tuple[float, float] | list[float]) -> tuple[float, float]:
    low, high = value
    return float(low), float(high)


def _outages(value: Iterable[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    out = tuple((float(start), float(duration)) for start, duration in value)
    for start, duration in out:
        if start < 0 or duration <= 0:
            raise ValueError(f"an outage needs start >= 0 and duration > 0: {start}:{duration}")
    return out


def _rates(value: Mapping[str, float]) -> dict[str, float]:
    out = {str(k): float(v) for k, v in dict(value).items()}
    for ticker, rate in out.items():
        if not 0 <= rate <= 1:
            raise ValueError(f"defect rate of {ticker} must be from 0 to 1: {rate}")
    return out


def _fault_kinds(value: Iterable[str]) -> tuple[str, ...]:
    out = tuple(value)
    unknown = set(out) - set(ALL_FAULT_KINDS)
    if not out or unknown:
        raise ValueError(f"fault_kinds must be a non-empty subset of {ALL_FAULT_KINDS}: {out}")
    return out


def _timespans(value: Iterable[str]) -> frozenset[str]:
    out = frozenset(value)
    if out - set(TIMESPANS):
        raise ValueError(f"timespans must be among {TIMESPANS}: {sorted(out)}")
    return out


@attrs.frozen
class SimulatorOptions:
    """How the simulator behaves. `now_ms=None` follows the wall clock.

    Attributes beyond the basics:
        not_entitled, not_entitled_timespans: aggregates requests refused with 403
            NOT_AUTHORIZED ("not entitled"): a request is refused when its ticker is listed (or
            no ticker is) and its timespan is listed (or no timespan is); both empty: none is.
        outages: (start, duration) in seconds after the simulator starts, on trio's clock:
            every API request inside `[start, start + duration)` gets an nginx 503.
        outage_retry_after: seconds sent as `Retry-After` on outage 503s (None: no header).
        defects: ticker -> share of its bars served defective (daemon.simulator.defects).
        fault_kinds: the rotation `fault_rate` draws from (default: today's FAULT_KINDS).
        splits: registered at start (daemon.simulator.splits); `hidden` ones unannounced.
        cache_bytes: bound of the rendered-page cache (0: no cache).
        max_connections: connections served at once; more get a 503 (None: no cap).
    """

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    requests_per_minute: float = attrs.field(default=0.0, validator=attrs.validators.ge(0))
    latency_ms: tuple[float, float] = attrs.field(default=(0.0, 0.0), converter=_latency)
    fault_rate: float = attrs.field(
        default=0.0, validator=[attrs.validators.ge(0), attrs.validators.le(1)])
    seed: int = 1
    api_key: str | None = None  # None: any non-empty key is accepted
    retry_after: bool = True  # send Retry-After on 429 (the real API may not)
    now_ms: int | None = None  # no bar at or after this instant (or before its session) exists
    # The sliding window the rate is counted over: the real API's minute, or shorter so a test
    # meets 429s within seconds rather than a minute.
    window_seconds: float = attrs.field(default=WINDOW_SECONDS, validator=attrs.validators.gt(0))
    not_entitled: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    not_entitled_timespans: frozenset[str] = attrs.field(default=frozenset(),
                                                         converter=_timespans)
    outages: tuple[tuple[float, float], ...] = attrs.field(default=(), converter=_outages)
    outage_retry_after: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(0)))
    defects: dict[str, float] = attrs.field(factory=dict, converter=_rates)
    fault_kinds: tuple[str, ...] = attrs.field(default=FAULT_KINDS, converter=_fault_kinds)
    splits: tuple[Split, ...] = attrs.field(default=(), converter=_splits)
    cache_bytes: int = attrs.field(default=CACHE_BYTES, validator=attrs.validators.ge(0))
    max_connections: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(1)))

    @latency_ms.validator
    def _check_latency(self, _: attrs.Attribute[tuple[float, float]],
                       value: tuple[float, float]) -> None:
        if not 0 <= value[0] <= value[1]:
            raise ValueError(f"latency_ms must be (low, high) with 0 <= low <= high: {value}")

    @splits.validator
    def _check_splits(self, _: attrs.Attribute[tuple[Split, ...]],
                      value: tuple[Split, ...]) -> None:
        keys = [(s.ticker, s.execution_date) for s in value]
        if len(set(keys)) != len(keys):
            raise ValueError("two splits of one ticker on one execution date")

    def refuses(self, ticker: str, timespan: str) -> bool:
        """True when an aggregates request for `ticker` at `timespan` is not entitled."""
        if not self.not_entitled and not self.not_entitled_timespans:
            return False
        return ((not self.not_entitled or ticker in self.not_entitled)
                and (not self.not_entitled_timespans or timespan in self.not_entitled_timespans))


# --- the command line ----------------------------------------------------------------------


def _parse_latency(text: str) -> tuple[float, float]:
    low, sep, high = text.partition("-")
    try:
        values = (float(low), float(high if sep else low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A-B in ms, e.g. 2000-4000: {text!r}") from None
    if not 0 <= values[0] <= values[1]:
        raise argparse.ArgumentTypeError(f"expected 0 <= A <= B: {text!r}")
    return values


def _parse_now(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected Unix ms or an ISO date/time, e.g. 2024-06-01T16:00-04:00: {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp() * 1000)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a probability from 0 to 1: {text!r}")
    return value


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _parse_timespans(text: str) -> list[str]:
    values = _csv(text)
    if set(values) - set(TIMESPANS):
        raise argparse.ArgumentTypeError(f"expected timespans among {', '.join(TIMESPANS)}: "
                                         f"{text!r}")
    return values


def _parse_fault_kinds(text: str) -> tuple[str, ...]:
    values = tuple(_csv(text))
    try:
        return _fault_kinds(values)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected kinds among {', '.join(ALL_FAULT_KINDS)}: {text!r}") from None


def _parse_outage(text: str) -> tuple[float, float]:
    start, sep, duration = text.partition(":")
    try:
        value = (float(start), float(duration))
        _outages([value])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected START:DURATION in seconds, e.g. 30:10: {text!r}") from None
    return value


def _parse_defects(text: str) -> tuple[str, float]:
    # Tickers may hold ':' (X:BTCUSD): the rate is after the last one.
    ticker, _, rate = text.rpartition(":")
    try:
        value = float(rate)
    except ValueError:
        value = -1.0
    if not ticker or not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected TICKER:RATE, rate 0 to 1: {text!r}")
    return ticker, value


def _parse_split(text: str) -> Split:
    try:
        return parse_split(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """The `backfilld simulate` options."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--requests-per-minute", type=float, default=0.0,
                        help="per-key rate limit over a sliding minute; 0 = unlimited (default)")
    parser.add_argument("--latency-ms", type=_parse_latency, default=(0.0, 0.0),
                        metavar="A-B", help="uniform latency per request in ms (default 0-0)")
    parser.add_argument("--fault-rate", type=_fraction, default=0.0,
                        help="probability a request fails on purpose (default 0)")
    parser.add_argument("--fault-kinds", type=_parse_fault_kinds, default=FAULT_KINDS,
                        metavar="KIND[,KIND...]",
                        help="the faults drawn from (default: " + ",".join(FAULT_KINDS)
                        + "; opt-in: status_error,status_not_authorized)")
    parser.add_argument("--seed", type=int, default=1, help="data and fault seed (default 1)")
    parser.add_argument("--api-key", default=None,
                        help="accept only this key (default: any non-empty key)")
    parser.add_argument("--no-retry-after", dest="retry_after", action="store_false",
                        help="send 429s without a Retry-After header")
    parser.add_argument("--window-seconds", type=float, default=WINDOW_SECONDS,
                        help="sliding window the rate is counted over (default 60)")
    parser.add_argument("--now", type=_parse_now, default=None, metavar="TIME",
                        help="freeze 'now' (Unix ms or ISO time): no bars from then on")
    parser.add_argument("--not-entitled", type=_csv, action="extend", default=[],
                        metavar="TICKER[,TICKER...]",
                        help="answer 403 NOT_AUTHORIZED (not entitled) for these tickers")
    parser.add_argument("--not-entitled-timespans", type=_parse_timespans, action="extend",
                        default=[], metavar="SPAN[,SPAN...]",
                        help="...only at these timespans (alone: these timespans of any ticker)")
    parser.add_argument("--outage", type=_parse_outage, action="append", default=[],
                        metavar="START:DURATION",
                        help="answer 503 to every API request from START for DURATION seconds "
                        "after starting (repeatable)")
    parser.add_argument("--outage-retry-after", type=int, default=None, metavar="SECONDS",
                        help="send Retry-After on outage 503s")
    parser.add_argument("--defects", type=_parse_defects, action="append", default=[],
                        metavar="TICKER:RATE",
                        help="serve this share of TICKER's bars defective (repeatable)")
    parser.add_argument("--split", type=_parse_split, action="append", default=[],
                        metavar="TICKER:YYYY-MM-DD:FROM:TO[:hidden]",
                        help="register a split; ':hidden' leaves it unannounced (repeatable)")
    parser.add_argument("--cache-mb", type=float, default=CACHE_BYTES / 2**20,
                        help=f"rendered-page cache bound in MiB (default {CACHE_BYTES >> 20}; "
                        "0 = off)")
    parser.add_argument("--max-connections", type=int, default=None,
                        help="connections served at once; more get a 503 (default: no cap)")


def options_from_args(args: argparse.Namespace) -> SimulatorOptions:
    """SimulatorOptions from the parsed `backfilld simulate` arguments."""
    return SimulatorOptions(
        host=args.host,
        port=args.port,
        requests_per_minute=args.requests_per_minute,
        latency_ms=args.latency_ms,
        fault_rate=args.fault_rate,
        seed=args.seed,
        api_key=args.api_key,
        retry_after=args.retry_after,
        now_ms=args.now,
        window_seconds=args.window_seconds,
        not_entitled=frozenset(args.not_entitled),
        not_entitled_timespans=frozenset(args.not_entitled_timespans),
        outages=tuple(args.outage),
        outage_retry_after=args.outage_retry_after,
        defects=dict(args.defects),
        fault_kinds=args.fault_kinds,
        splits=tuple(args.split),
        cache_bytes=int(args.cache_mb * 2**20),
        max_connections=args.max_connections,
    )
