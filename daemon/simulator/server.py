"""The Polygon/Massive aggregates API, simulated on daemon.httpserver.

Serves `GET /v2/aggs/ticker/{ticker}/range/{multiplier}/{timespan}/{from}/{to}` with the real
API's query parameters, body shape, `next_url` pagination (absolute, a `cursor`, no key), auth
(`apiKey` or `Authorization: Bearer`), a sliding-window rate limit per key with the real 429
body, and injected faults, so the daemon can be tested against everything the real service does
without a network or a subscription. `GET /__stats` returns counters for tests and the demo.
Cut-off bodies and dropped connections go out through daemon.httpserver's `Hijack`.

Determinism: bars come from daemon.simulator.data (pure functions of seed and time); latency
and faults come from the seed and the request's sequence number, and all waiting uses
`trio.sleep` / `trio.current_time`, so trio's MockClock drives them in tests.

Error handling: every request gets a well-formed answer or a deliberate fault; a handler bug
becomes a 500 from daemon.httpserver and the simulator goes on serving.
"""

from __future__ import annotations

import argparse
import base64
import collections
import datetime as dt
import email.utils
import hashlib
import http
import math
import random
import re
import signal
import threading
import time
from functools import partial
from urllib.parse import parse_qsl, quote, urlencode

import attrs
import trio
from loguru import logger

from ..httpserver import Hijack, Request, Response, serve_http
from ..market_calendar import et_midnight_ms, is_crypto, latest_bar_start_ms
from ..timeframes import Timeframe
from .data import page_with_count

__all__ = [
    "FAULT_KINDS",
    "Simulator",
    "SimulatorOptions",
    "SimulatorStatistics",
    "add_simulate_arguments",
    "options_from_args",
    "run_simulator",
    "serve_simulator",
]

DEFAULT_PORT = 8765
DEFAULT_LIMIT = 5000
MAX_LIMIT = 50_000
# The rate-limit window. A fractional rate (2.5/min) becomes 2 requests per 48 s, same rate.
WINDOW_SECONDS = 60.0
# Forget idle keys' windows once this many keys are tracked (bounded memory under key spray).
MAX_TRACKED_KEYS = 1024
FAULT_KINDS = ("http_500", "http_502", "http_503", "truncated", "null_results", "dropped",
               "spurious_429")
RATE_LIMIT_ERROR = (
    "You've exceeded the maximum requests per minute, please wait or upgrade your subscription "
    "to continue. https://polygon.io/pricing"
)
_AGGS_PATH = re.compile(
    r"^/v2/aggs/ticker/(?P<ticker>.+)/range/(?P<multiplier>[^/]+)/(?P<timespan>[^/]+)"
    r"/(?P<from>[^/]+)/(?P<to>[^/]+)/?$"
)
# What the config accepts as a ticker: letters, digits and : . - / (X:BTCUSD, BRK.A, I:SPX).
_TICKER = re.compile(r"^[A-Za-z0-9:._/-]{1,40}$")
_TIMESPAN_UNIT = {"minute": "m", "hour": "h", "day": "d", "week": "w", "month": "mo"}
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_HTML_PAGE = (
    "<html>\r\n<head><title>{code} {reason}</title></head>\r\n<body>\r\n"
    "<center><h1>{code} {reason}</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)
_REASONS = {
    500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Temporarily Unavailable",
}


def _latency(value: tuple[float, float] | list[float]) -> tuple[float, float]:
    low, high = value
    return float(low), float(high)


@attrs.frozen
class SimulatorOptions:
    """How the simulator behaves. `now_ms=None` follows the wall clock."""

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

    @latency_ms.validator
    def _check_latency(self, _: attrs.Attribute[tuple[float, float]],
                       value: tuple[float, float]) -> None:
        if not 0 <= value[0] <= value[1]:
            raise ValueError(f"latency_ms must be (low, high) with 0 <= low <= high: {value}")


@attrs.frozen
class SimulatorStatistics:
    """Everything served so far. `requests` counts every API request, answered or not."""

    requests: int = 0
    ok: int = 0  # complete pages served
    bars_served: int = 0
    bytes_served: int = 0
    rate_limited: int = 0  # 429s from the window (spurious ones count under faults)
    unauthorized: int = 0
    not_found: int = 0
    bad_request: int = 0
    faults_total: int = 0
    faults: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(FAULT_KINDS, 0))


_COUNTERS = tuple(a.name for a in attrs.fields(SimulatorStatistics) if a.name != "faults")


class _BadRequest(Exception):
    """A parameter the real API would refuse with 400 (status 404 for a bad ticker)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@attrs.frozen
class _Query:
    ticker: str
    timeframe: Timeframe
    from_ms: int
    to_ms: int
    adjusted: bool
    descending: bool
    limit: int


class Simulator:
    """The request handler and its state: rate windows, counters, the fault sequence."""

    def __init__(self, options: SimulatorOptions) -> None:
        self.options = options
        self.port = options.port  # the bound port, once serving (options.port may be 0)
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._faults = dict.fromkeys(FAULT_KINDS, 0)
        self._windows: dict[str, collections.deque[float]] = {}
        self._latency_rng = random.Random(options.seed)
        self._sequence = 0  # requests that reached the fault stage
        self._ids = 0
        # The budget per window; a shorter window (tests, the demo) keeps the same rate.
        per_window = options.requests_per_minute * options.window_seconds / 60.0
        self._capacity = max(1, math.floor(per_window)) if per_window > 0 else 0
        self._window = (
            options.window_seconds * self._capacity / per_window if per_window > 0 else 0.0
        )

    def statistics(self) -> SimulatorStatistics:
        """A snapshot of the counters."""
        return SimulatorStatistics(**self._counts, faults=dict(self._faults))

    def _count(self, **increments: int) -> None:
        for name, value in increments.items():
            self._counts[name] += value

    def _request_id(self) -> str:
        self._ids += 1
        return hashlib.blake2b(f"{self.options.seed}|id|{self._ids}".encode(),
                               digest_size=16).hexdigest()

    async def handle(self, request: Request) -> Response | Hijack:
        """Answer one request (the daemon.httpserver handler)."""
        if request.path == "/__stats":
            return Response.json(attrs.asdict(self.statistics()))
        low, high = self.options.latency_ms
        if high > 0:
            await trio.sleep(self._latency_rng.uniform(low, high) / 1000)
        self._count(requests=1)
        match = _AGGS_PATH.match(request.path)
        if match is None or request.method not in ("GET", "HEAD"):
            self._count(not_found=1)
            return self._error(404, "NOT_FOUND", "Not found")
        key = _api_key(request)
        if not key:
            self._count(unauthorized=1)
            return self._error(401, "NOT_AUTHORIZED",
                               "API Key was not provided. Pass apiKey or an Authorization "
                               "Bearer header.")
        if self.options.api_key is not None and key != self.options.api_key:
            self._count(unauthorized=1)
            return self._error(401, "NOT_AUTHORIZED", "Unknown API Key")
        retry_after = self._admit(key)
        if retry_after is not None:
            self._count(rate_limited=1)
            headers = {"retry-after": str(retry_after)} if self.options.retry_after else {}
            return Response.json({"status": "ERROR", "request_id": self._request_id(),
                                  "error": RATE_LIMIT_ERROR}, 429, headers)
        try:
            query = _parse_query(match, request.query)
        except _BadRequest as exc:
            if exc.status == 404:
                self._count(not_found=1)
                return self._error(404, "NOT_FOUND", str(exc))
            self._count(bad_request=1)
            return Response.json({"status": "ERROR", "request_id": self._request_id(),
                                  "error": str(exc)}, 400)
        fault = self._next_fault()
        if fault is not None and fault != "truncated":
            return self._fault(fault, query)
        body, bars = self._aggs_body(query, request.headers.get("host"))
        response = Response.json(body)
        if fault == "truncated":
            cut = hashlib.blake2b(f"{self.options.seed}|cut|{self._sequence}".encode(),
                                  digest_size=4).digest()
            return Hijack(partial(_send_raw, _head(response) + response.body[
                : 1 + int.from_bytes(cut, "little") % max(1, len(response.body) - 1)]))
        self._count(ok=1, bars_served=bars, bytes_served=len(response.body))
        return response

    def _error(self, status: int, kind: str, message: str) -> Response:
        return Response.json(
            {"status": kind, "request_id": self._request_id(), "message": message}, status)

    def _admit(self, key: str) -> int | None:
        """None when `key` may make a request now (and count it), else Retry-After seconds."""
        if not self._capacity:
            return None
        now = trio.current_time()
        window = self._windows.get(key)
        if window is None:
            if len(self._windows) >= MAX_TRACKED_KEYS:
                self._forget_idle_keys(now)
            window = self._windows[key] = collections.deque()
        while window and window[0] <= now - self._window:
            window.popleft()
        if len(window) >= self._capacity:
            return max(1, math.ceil(window[0] + self._window - now))
        window.append(now)
        return None

    def _forget_idle_keys(self, now: float) -> None:
        for key in [k for k, w in self._windows.items() if not w or w[-1] <= now - self._window]:
            del self._windows[key]

    def _next_fault(self) -> str | None:
        self._sequence += 1
        if self.options.fault_rate <= 0:
            return None
        digest = hashlib.blake2b(f"{self.options.seed}|fault|{self._sequence}".encode(),
                                 digest_size=8).digest()
        if int.from_bytes(digest[:4], "little") / 2**32 >= self.options.fault_rate:
            return None
        kind = FAULT_KINDS[int.from_bytes(digest[4:], "little") % len(FAULT_KINDS)]
        self._faults[kind] += 1
        self._count(faults_total=1)
        return kind

    def _fault(self, kind: str, query: _Query) -> Response | Hijack:
        if kind.startswith("http_"):
            code = int(kind[5:])
            html = _HTML_PAGE.format(code=code, reason=_REASONS[code])
            return Response.text(html, code, "text/html")
        if kind == "dropped":
            return Hijack(_send_nothing)
        if kind == "spurious_429":
            return Response.json({"status": "ERROR", "request_id": self._request_id(),
                                  "error": RATE_LIMIT_ERROR}, 429)
        return Response.json({"ticker": query.ticker, "queryCount": 0, "resultsCount": 0,
                              "adjusted": True, "results": None, "status": "OK",
                              "request_id": self._request_id(), "count": 0})

    def _aggs_body(self, query: _Query, host: str | None) -> tuple[dict[str, object], int]:
        now_ms = self.options.now_ms
        if now_ms is None:
            now_ms = int(time.time() * 1000)
        # A bar exists once a session minute inside it has begun: no daily bar at 01:00 ET.
        newest = latest_bar_start_ms(query.timeframe, now_ms - 1, crypto=is_crypto(query.ticker))
        to_ms = min(query.to_ms, newest)
        bars, next_ms, used = page_with_count(
            self.options.seed, query.ticker, query.timeframe, query.from_ms, to_ms,
            query.limit, descending=query.descending)
        body: dict[str, object] = {
            "ticker": query.ticker,
            "queryCount": used,
            "resultsCount": len(bars),
            "adjusted": query.adjusted,
        }
        if bars:
            body["results"] = bars
        body["status"] = "OK"
        body["request_id"] = self._request_id()
        body["count"] = len(bars)
        if next_ms is not None:
            body["next_url"] = self._next_url(query, next_ms, host)
        return body, len(bars)

    def _next_url(self, query: _Query, next_ms: int, host: str | None) -> str:
        if not host:
            name = self.options.host
            host = f"[{name}]:{self.port}" if ":" in name else f"{name}:{self.port}"
        tf = query.timeframe
        span = next(k for k, v in _TIMESPAN_UNIT.items() if v == tf.unit)
        from_ms, to_ms = (query.from_ms, next_ms) if query.descending else (next_ms, query.to_ms)
        cursor = base64.urlsafe_b64encode(urlencode({
            "adjusted": "true" if query.adjusted else "false",
            "limit": query.limit,
            "sort": "desc" if query.descending else "asc",
        }).encode()).decode().rstrip("=")
        return (f"http://{host}/v2/aggs/ticker/{quote(query.ticker, safe=':.-')}/range/"
                f"{tf.multiplier}/{span}/{from_ms}/{to_ms}?cursor={cursor}")


def _head(response: Response) -> bytes:
    """The HTTP/1.1 head h11 would write for `response`, with `Connection: close`."""
    headers = {k.lower(): v for k, v in response.headers.items()}
    headers.setdefault("content-length", str(len(response.body)))
    headers.setdefault("date", email.utils.formatdate(usegmt=True))
    headers["connection"] = "close"
    lines = [f"HTTP/1.1 {response.status} {http.HTTPStatus(response.status).phrase}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _send_raw(data: bytes, stream: trio.SocketStream) -> None:
    """A cut-off body: the head promises more than follows (written past h11, on purpose)."""
    await stream.send_all(data)


async def _send_nothing(stream: trio.SocketStream) -> None:
    """A dropped connection: not a byte of answer."""


def _api_key(request: Request) -> str:
    key = request.query.get("apiKey", "")
    if not key:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer":
            key = token.strip()
    return key


def _parse_time(text: str, name: str, *, end: bool) -> int:
    """`YYYY-MM-DD` (the ET day: its midnight, or its last ms when `end`) or Unix ms."""
    if text.isdigit():
        return int(text)
    if _DATE.match(text):
        try:
            day = dt.date.fromisoformat(text)
        except ValueError:
            pass
        else:
            return et_midnight_ms(day + dt.timedelta(days=1)) - 1 if end else et_midnight_ms(day)
    raise _BadRequest(f"Could not parse the time parameter: '{name}'. "
                      "Use YYYY-MM-DD or Unix MS Timestamps")


def _parse_query(match: re.Match[str], params: dict[str, str]) -> _Query:
    ticker = match["ticker"]
    if not _TICKER.match(ticker):
        raise _BadRequest(f"Unknown ticker syntax: {ticker!r}", 404)
    if not match["multiplier"].isdigit() or not 1 <= int(match["multiplier"]) <= 9999:
        raise _BadRequest("multiplier must be a whole number from 1 to 9999")
    unit = _TIMESPAN_UNIT.get(match["timespan"])
    if unit is None:
        raise _BadRequest(f"Unsupported timespan {match['timespan']!r}: expected one of "
                          + ", ".join(_TIMESPAN_UNIT))
    if "cursor" in params:
        try:
            padded = params["cursor"] + "=" * (-len(params["cursor"]) % 4)
            params = {**dict(parse_qsl(base64.urlsafe_b64decode(padded).decode())), **{
                k: v for k, v in params.items() if k != "cursor"}}
        except ValueError:
            raise _BadRequest("Invalid cursor") from None
    adjusted = params.get("adjusted", "true").lower()
    sort = params.get("sort", "asc").lower()
    if adjusted not in ("true", "false"):
        raise _BadRequest("adjusted must be true or false")
    if sort not in ("asc", "desc"):
        raise _BadRequest("sort must be asc or desc")
    limit_text = params.get("limit", str(DEFAULT_LIMIT))
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LIMIT:
        raise _BadRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return _Query(
        ticker=ticker,
        timeframe=Timeframe(int(match["multiplier"]), unit),
        from_ms=_parse_time(match["from"], "from", end=False),
        to_ms=_parse_time(match["to"], "to", end=True),
        adjusted=adjusted == "true",
        descending=sort == "desc",
        limit=int(limit_text),
    )


async def serve_simulator(
    options: SimulatorOptions,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the simulated API until cancelled; report the bound port via task_status.

    Error handling: a port in use raises OSError before `started`.
    """
    simulator = Simulator(options)
    async with trio.open_nursery() as nursery:
        simulator.port = await nursery.start(
            partial(serve_http, simulator.handle, options.host, options.port))
        task_status.started(simulator.port)


def run_simulator(options: SimulatorOptions) -> None:
    """Serve until SIGTERM or SIGINT (the `backfilld simulate` command), then return.

    Error handling: a port in use raises OSError out of this call.
    """

    async def stop_on_signal(cancel_scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                cancel_scope.cancel()
                return

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            if threading.current_thread() is threading.main_thread():
                nursery.start_soon(stop_on_signal, nursery.cancel_scope)
            port = await nursery.start(serve_simulator, options)
            host = f"[{options.host}]" if ":" in options.host else options.host
            low, high = options.latency_ms
            logger.info(
                "simulator on http://{}:{} (seed {}, {} req/min, latency {:g}-{:g} ms, "
                "fault rate {:g}, {})", host, port, options.seed,
                options.requests_per_minute or "unlimited", low, high, options.fault_rate,
                "api key required" if options.api_key else "any api key")

    trio.run(main)
    logger.info("simulator stopped")


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
    parser.add_argument("--seed", type=int, default=1, help="data and fault seed (default 1)")
    parser.add_argument("--api-key", default=None,
                        help="accept only this key (default: any non-empty key)")
    parser.add_argument("--no-retry-after", dest="retry_after", action="store_false",
                        help="send 429s without a Retry-After header")
    parser.add_argument("--window-seconds", type=float, default=WINDOW_SECONDS,
                        help="sliding window the rate is counted over (default 60)")
    parser.add_argument("--now", type=_parse_now, default=None, metavar="TIME",
                        help="freeze 'now' (Unix ms or ISO time): no bars from then on")


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
    )
