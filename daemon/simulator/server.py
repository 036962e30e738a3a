"""The Polygon/Massive API, simulated on daemon.httpserver.

What is served:

    GET /v2/aggs/ticker/{ticker}/range/{multiplier}/{timespan}/{from}/{to}   aggregates
    GET /v3/reference/splits                      the visible splits (daemon.simulator.reference)
    GET /__stats                                  counters (SimulatorStatistics) as JSON
        /__control/...                            scripting the run (daemon.simulator.control)

Aggregates come with the real API's query parameters, body shape and `next_url` pagination
(absolute, a `cursor`, no key); both API paths take the key as `apiKey` or
`Authorization: Bearer`, count against a sliding-window rate limit per key with the real 429
body, and may fail on purpose. So the daemon can be tested against everything the real service
does without a network or a subscription.

What an API request meets, in this order (the first that applies answers):

    1. an outage window (options or POST /__control/outage): nginx 503, at once, before
       anything else, as when the service behind the load balancer is down
    2. latency (`latency_ms`), then 404 for an unknown path or method
    3. auth: 401 without a key or, when `api_key` is set, with another ("Unknown API Key")
    4. the rate limit: 429 with Retry-After (unless `retry_after=False`)
    5. bad parameters: 400 (404 for an impossible ticker)
    6. entitlement (aggregates only): 403 NOT_AUTHORIZED "not entitled" for the tickers and
       timespans of `not_entitled`/`not_entitled_timespans`; the key works for the rest
    7. an injected fault (daemon.simulator.faults), at `fault_rate`
    8. the answer. Aggregates: bars from daemon.simulator.data scaled for the ticker's splits
       (adjusted=true: the hidden ones only; false: all), then spoiled at the ticker's defect
       rate (daemon.simulator.defects); the rendered `results` come from a byte-bounded LRU
       cache keyed by everything that shapes them, and each answer gets its own request_id.

Determinism: bars come from daemon.simulator.data (pure functions of seed and time); latency
and faults come from the seed and the request's sequence number; defects from seed, ticker,
timeframe and t. All waiting and every window uses `trio.sleep` / `trio.current_time`, so
trio's MockClock drives them in tests.

Error handling: every request gets a well-formed answer or a deliberate fault; a handler bug
becomes a 500 from daemon.httpserver and the simulator goes on serving.
"""

from __future__ import annotations

import base64
import collections
import datetime as dt
import hashlib
import math
import random
import re
import signal
import threading
import time
from functools import partial
from urllib.parse import parse_qsl, quote, urlencode

import attrs
import msgspec
import trio
from loguru import logger

from ..httpserver import Hijack, Request, Response, serve_http
from ..market_calendar import et_midnight_ms, is_crypto, latest_bar_start_ms
from ..timeframes import Timeframe
from .cache import ByteLRU, CacheStatistics
from .control import PREFIX as CONTROL_PREFIX
from .control import handle_control
from .data import page_with_count
from .defects import DEFECT_KINDS, spoil
from .faults import (
    ALL_FAULT_KINDS,
    FAULT_KINDS,
    NOT_ENTITLED_MESSAGE,
    OPT_IN_FAULT_KINDS,
    RATE_LIMIT_ERROR,
    choose_fault,
    fault_response,
    html_error,
    truncated,
)
from .options import (
    DEFAULT_PORT,
    WINDOW_SECONDS,
    SimulatorOptions,
    add_simulate_arguments,
    options_from_args,
)
from .reference import list_splits
from .scenario import Scenario

__all__ = [
    "ALL_FAULT_KINDS",
    "DEFAULT_PORT",
    "FAULT_KINDS",
    "NOT_ENTITLED_MESSAGE",
    "OPT_IN_FAULT_KINDS",
    "PATH_KINDS",
    "RATE_LIMIT_ERROR",
    "WINDOW_SECONDS",
    "Simulator",
    "SimulatorOptions",
    "SimulatorStatistics",
    "add_simulate_arguments",
    "options_from_args",
    "run_simulator",
    "serve_simulator",
]

DEFAULT_LIMIT = 5000
MAX_LIMIT = 50_000
# Forget idle keys' windows once this many keys are tracked (bounded memory under key spray).
MAX_TRACKED_KEYS = 1024
SPLITS_PATH = "/v3/reference/splits"
# How /__stats groups requests by path.
PATH_KINDS = ("aggs", "splits", "stats", "control", "other")
# Bytes a cached page costs beyond its results (key, bookkeeping): keeps tiny pages honest.
_ENTRY_OVERHEAD = 256
_AGGS_PATH = re.compile(
    r"^/v2/aggs/ticker/(?P<ticker>.+)/range/(?P<multiplier>[^/]+)/(?P<timespan>[^/]+)"
    r"/(?P<from>[^/]+)/(?P<to>[^/]+)/?$"
)
# What the config accepts as a ticker: letters, digits and : . - / (X:BTCUSD, BRK.A, I:SPX).
_TICKER = re.compile(r"^[A-Za-z0-9:._/-]{1,40}$")
_TIMESPAN_UNIT = {"minute": "m", "hour": "h", "day": "d", "week": "w", "month": "mo"}
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@attrs.frozen
class SimulatorStatistics:
    """Everything served so far. `requests` counts every API request, answered or not."""

    requests: int = 0
    ok: int = 0  # complete answers served (aggregates pages and splits pages)
    bars_served: int = 0
    bytes_served: int = 0
    rate_limited: int = 0  # 429s from the window (spurious ones count under faults)
    unauthorized: int = 0  # 401s: no key or a wrong one
    not_found: int = 0
    bad_request: int = 0
    faults_total: int = 0
    not_entitled: int = 0  # 403s for tickers/timespans outside the plan
    outage: int = 0  # 503s answered because an outage window was open
    defects_served: int = 0  # defective bars in answers (one per spoiled bar)
    splits_requests: int = 0  # requests to /v3/reference/splits
    faults: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(FAULT_KINDS, 0))
    defects: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(DEFECT_KINDS, 0))
    requests_by_path: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(PATH_KINDS, 0))
    cache: CacheStatistics = CacheStatistics(0, 0, 0, 0, 0, 0)


_COUNTERS = tuple(a.name for a in attrs.fields(SimulatorStatistics)
                  if a.name not in ("faults", "defects", "requests_by_path", "cache"))


class _BadRequest(Exception):
    """A parameter the real API would refuse with 400 (status 404 for a bad ticker)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@attrs.frozen
class _Query:
    ticker: str
    timespan: str
    timeframe: Timeframe
    from_ms: int
    to_ms: int
    adjusted: bool
    descending: bool
    limit: int


@attrs.frozen
class _Page:
    """A rendered aggregates page: what the cache keeps (all but the per-answer envelope)."""

    results: bytes  # the JSON array, as served
    count: int  # bars in `results`
    used: int  # base aggregates covered (queryCount)
    next_ms: int | None
    defects: tuple[tuple[str, int], ...]


class Simulator:
    """The request handler and its state: rate windows, counters, faults, scenario, cache.

    Construct inside trio: the outage windows of the options count from `trio.current_time()`
    at construction.
    """

    def __init__(self, options: SimulatorOptions) -> None:
        self.options = options
        self.port = options.port  # the bound port, once serving (options.port may be 0)
        self.scenario = Scenario(options, trio.current_time())
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._faults = dict.fromkeys(options.fault_kinds, 0)
        self._defects = dict.fromkeys(DEFECT_KINDS, 0)
        self._by_path = dict.fromkeys(PATH_KINDS, 0)
        self._cache: ByteLRU[_Page] = ByteLRU(options.cache_bytes)
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
        return SimulatorStatistics(**self._counts, faults=dict(self._faults),
                                   defects=dict(self._defects),
                                   requests_by_path=dict(self._by_path),
                                   cache=self._cache.statistics())

    def _count(self, **increments: int) -> None:
        for name, value in increments.items():
            self._counts[name] += value

    def _request_id(self) -> str:
        self._ids += 1
        return hashlib.blake2b(f"{self.options.seed}|id|{self._ids}".encode(),
                               digest_size=16).hexdigest()

    async def handle(self, request: Request) -> Response | Hijack:
        """Answer one request (the daemon.httpserver handler)."""
        path = request.path
        if path == "/__stats":
            self._by_path["stats"] += 1
            return Response.json(attrs.asdict(self.statistics()))
        if path == CONTROL_PREFIX or path.startswith(CONTROL_PREFIX + "/"):
            self._by_path["control"] += 1
            return handle_control(self.scenario, request, trio.current_time())
        match = _AGGS_PATH.match(path)
        kind = "aggs" if match else "splits" if path.rstrip("/") == SPLITS_PATH else "other"
        self._by_path[kind] += 1
        self._count(requests=1)
        if kind == "splits":
            self._count(splits_requests=1)
        if self.scenario.in_outage(trio.current_time()):
            self._count(outage=1)
            retry = self.options.outage_retry_after
            return html_error(503, {"retry-after": str(retry)} if retry is not None else None)
        low, high = self.options.latency_ms
        if high > 0:
            await trio.sleep(self._latency_rng.uniform(low, high) / 1000)
        if kind == "other" or request.method not in ("GET", "HEAD"):
            self._count(not_found=1)
            return self._error(404, "NOT_FOUND", "Not found")
        refused = self._authorize(request)
        if refused is not None:
            return refused
        host = request.headers.get("host")
        if kind == "splits":
            return self._splits(request.query, host)
        assert match is not None
        try:
            query = _parse_query(match, request.query)
        except _BadRequest as exc:
            if exc.status == 404:
                self._count(not_found=1)
                return self._error(404, "NOT_FOUND", str(exc))
            return self._bad_request(str(exc))
        if self.options.refuses(query.ticker, query.timespan):
            self._count(not_entitled=1)
            return self._error(403, "NOT_AUTHORIZED", NOT_ENTITLED_MESSAGE)
        fault = self._next_fault()
        if fault is not None and fault != "truncated":
            return fault_response(fault, self._request_id, {
                "ticker": query.ticker, "queryCount": 0, "resultsCount": 0,
                "adjusted": query.adjusted, "results": None, "status": "OK", "request_id": "",
                "count": 0})
        page = self._page(query)
        body: dict[str, object] = {
            "ticker": query.ticker,
            "queryCount": page.used,
            "resultsCount": page.count,
            "adjusted": query.adjusted,
        }
        if page.count:
            body["results"] = msgspec.Raw(page.results)
        body["status"] = "OK"
        body["request_id"] = self._request_id()
        body["count"] = page.count
        if page.next_ms is not None:
            body["next_url"] = self._next_url(query, page.next_ms, host)
        return self._complete(Response.json(body), fault, bars=page.count, defects=page.defects)

    def _complete(self, response: Response, fault: str | None, *, bars: int = 0,
                  defects: tuple[tuple[str, int], ...] = ()) -> Response | Hijack:
        """Send `response` whole, or cut off when the fault drawn for it is `truncated`."""
        if fault == "truncated":
            return truncated(response, self.options.seed, self._sequence)
        self._count(ok=1, bars_served=bars, bytes_served=len(response.body))
        for name, n in defects:
            self._defects[name] += n
            self._count(defects_served=n)
        return response

    def _authorize(self, request: Request) -> Response | None:
        """None when the key is good and the rate allows the request, else the refusal."""
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
        return None

    def _error(self, status: int, kind: str, message: str) -> Response:
        return Response.json(
            {"status": kind, "request_id": self._request_id(), "message": message}, status)

    def _bad_request(self, message: str) -> Response:
        self._count(bad_request=1)
        return Response.json({"status": "ERROR", "request_id": self._request_id(),
                              "error": message}, 400)

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
        kind = choose_fault(self.options.seed, self._sequence, self.options.fault_rate,
                            self.options.fault_kinds)
        if kind is not None:
            self._faults[kind] += 1
            self._count(faults_total=1)
        return kind

    # --- aggregates -----------------------------------------------------------------------

    def _page(self, query: _Query) -> _Page:
        """The page `query` asks for now: from the cache, or generated, spoiled and encoded."""
        now_ms = self.options.now_ms
        if now_ms is None:
            now_ms = int(time.time() * 1000)
        # A bar exists once a session minute inside it has begun: no daily bar at 01:00 ET.
        newest = latest_bar_start_ms(query.timeframe, now_ms - 1, crypto=is_crypto(query.ticker))
        to_ms = min(query.to_ms, newest)
        adjust = self.scenario.adjustment(query.ticker, adjusted=query.adjusted)
        rate = self.scenario.defect_rate(query.ticker)
        key = (query, to_ms, adjust.key, rate)
        page = self._cache.get(key)
        if page is not None:
            return page
        bars, next_ms, used = page_with_count(
            self.options.seed, query.ticker, query.timeframe, query.from_ms, to_ms,
            query.limit, descending=query.descending, adjust=adjust)
        served, counts = spoil(bars, self.options.seed, query.ticker, query.timeframe, rate,
                               from_ms=query.from_ms, to_ms=query.to_ms,
                               descending=query.descending)
        page = _Page(msgspec.json.encode(served), len(served), used, next_ms,
                     tuple(sorted(counts.items())))
        self._cache.put(key, page, len(page.results) + _ENTRY_OVERHEAD)
        return page

    def _base(self, host: str | None) -> str:
        if not host:
            name = self.options.host
            host = f"[{name}]:{self.port}" if ":" in name else f"{name}:{self.port}"
        return f"http://{host}"

    def _next_url(self, query: _Query, next_ms: int, host: str | None) -> str:
        tf = query.timeframe
        from_ms, to_ms = (query.from_ms, next_ms) if query.descending else (next_ms, query.to_ms)
        cursor = base64.urlsafe_b64encode(urlencode({
            "adjusted": "true" if query.adjusted else "false",
            "limit": query.limit,
            "sort": "desc" if query.descending else "asc",
        }).encode()).decode().rstrip("=")
        return (f"{self._base(host)}/v2/aggs/ticker/{quote(query.ticker, safe=':.-')}/range/"
                f"{tf.multiplier}/{query.timespan}/{from_ms}/{to_ms}?cursor={cursor}")

    # --- reference ------------------------------------------------------------------------

    def _splits(self, params: dict[str, str], host: str | None) -> Response | Hijack:
        try:
            page = list_splits(self.scenario.splits(), params)
        except ValueError as exc:
            return self._bad_request(str(exc))
        fault = self._next_fault()
        if fault is not None and fault != "truncated":
            return fault_response(fault, self._request_id,
                                  {"results": None, "status": "OK", "request_id": ""})
        body: dict[str, object] = {"results": page.results, "status": "OK",
                                   "request_id": self._request_id()}
        if page.cursor is not None:
            body["next_url"] = f"{self._base(host)}{SPLITS_PATH}?cursor={page.cursor}"
        return self._complete(Response.json(body), fault)


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
        timespan=match["timespan"],
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
            partial(serve_http, simulator.handle, options.host, options.port,
                    max_connections=options.max_connections))
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
            scripted = {
                "not entitled": ",".join(sorted(options.not_entitled)) or None,
                "not entitled timespans": ",".join(sorted(options.not_entitled_timespans))
                or None,
                "outages": options.outages or None,
                "defects": options.defects or None,
                "splits": ", ".join(f"{s.ticker} {s.execution_date} {s.split_from:g}:"
                                    f"{s.split_to:g}{' hidden' if s.hidden else ''}"
                                    for s in options.splits) or None,
            }
            for name, value in scripted.items():
                if value is not None:
                    logger.info("simulator {}: {}", name, value)

    trio.run(main)
    logger.info("simulator stopped")
