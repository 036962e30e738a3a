"""The Polygon/Massive aggregates client: pages of validated bars, retried, rate-limited, counted.

`PolygonClient.pages()` walks one `(symbol, timeframe, from, to)` range: the first URL, then each
`next_url`, yielding a `Page` per response. Each HTTP attempt takes a token and an in-flight slot
from the shared `RateLimiter`; failures that a second try can fix (429, 5xx, network, a cut-off
or malformed body, `"results": null`) are retried by tenacity with `Retry-After` or exponential
backoff; failures it cannot fix (401/403, other 4xx, impossible bars) are raised at once.

Secrets: the key travels only in an `Authorization: Bearer` header set by `_BearerAuth` (whose
repr is masked), never in a URL, so no URL we log or put in an exception can carry it. `next_url`
is re-sent to the configured host only, with any `apiKey` parameter stripped. Every message is
scrubbed of the key's literal value and passed through `redact()`.

Error handling: httpx exceptions are translated at the edge (`_translate`) into daemon.errors
types, raised with no `__cause__` or `__context__`, so callers see only `ApiError` subclasses
with nothing else from httpx. Bad bars are not errors: they come out quarantined in
`Page.quarantined` (daemon.bars). After the last attempt the last error is raised again, same
type, saying how many attempts were made. Cancellation (trio.Cancelled, a BaseException) is
never retried and propagates at once.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import math
import re
import sys
import time
from collections.abc import AsyncGenerator, Callable, Generator
from functools import partial
from typing import TYPE_CHECKING, Protocol, TypeVar
from urllib.parse import quote

import attrs
import httpx
import msgspec
import trio
from loguru import logger
from tenacity import RetryCallState

from .bars import Bar, CopyRows, DecodedPage, Quarantined, decode_page
from .breaker import CircuitBreaker
from .config import PolygonConfig, RetryConfig, Secret
from .errors import (
    ApiAuthError,
    ApiError,
    ApiKeyRefused,
    ApiRequestError,
    ApiServerError,
    ApiTransportError,
    BadResponse,
    NotEntitled,
    RateLimited,
    redact,
)
from .ratelimit import Grant, RateLimiter
from .retrying import Backoff, retrying
from .splits import Split, decode_splits
from .timeframes import Timeframe

if TYPE_CHECKING:
    from loguru import Logger

__all__ = ["ClientStatistics", "Page", "PolygonClient"]

# `status` values of a usable body; DELAYED is what a delayed-data plan gets, same shape.
OK_STATUSES = frozenset({"OK", "DELAYED"})
# Characters of an error body quoted in an exception: enough for the API's one-line messages.
SNIPPET_CHARS = 200

# What a 403's message says when the key itself is refused (vs. the plan lacking the data).
_KEY_REFUSED = re.compile(r"(?i)\b(unknown|invalid|missing|not provided|revoked|expired)\b.*"
                          r"\bkey\b|\bapi key\b.*\b(unknown|invalid|not valid)\b")
class _Envelope(Protocol):
    """What every API body has: a status, an optional message, and (for the retry rule) whether
    its results came as null."""

    @property
    def status(self) -> str: ...

    @property
    def message(self) -> str | None: ...

    @property
    def results_null(self) -> bool: ...


_D = TypeVar("_D", bound=_Envelope)

# Worker threads decoding pages: the decode holds the GIL, so more threads buy nothing (two
# measured no faster end to end, and each holds a page's bars as objects while it works).
DECODE_THREADS = 1
_DECODE_THREADS = trio.CapacityLimiter(DECODE_THREADS)
# Response bodies read into memory at once: one per decode thread, and as many again read
# ahead so a thread never waits. The other requests in flight keep their bodies in the
# kernel's socket buffers (the server's send waits), so memory does not grow with how many
# ranges are walked at once, nor with max_in_flight.
BODIES_IN_MEMORY = 2 * DECODE_THREADS
_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")


class _BodySlot:
    """One attempt's claim on the client's BODIES_IN_MEMORY, taken at most once and given back
    at most once (the attempt may end before it ever read a body)."""

    def __init__(self, limiter: trio.CapacityLimiter) -> None:
        self._limiter, self._held = limiter, False

    async def acquire(self) -> None:
        await self._limiter.acquire_on_behalf_of(self)
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._limiter.release_on_behalf_of(self)


@attrs.frozen
class Page:
    """One response of a range, validated.

    Attributes:
        bars: The page's valid bars in ascending `t` (daemon.bars.check_bars); may be empty.
        attempts: HTTP attempts this page took (1 when the first succeeded).
        api_seconds: Time from the page's first token wait to its decoded body, retries and
            backoff included: what the page cost in wall time.
        bytes: Body bytes of the response that succeeded.
        last: True when the API sent no `next_url`: the range is complete.
        quarantined: The page's bars that did not decode or validate (not in `bars`).
    """

    bars: list[Bar] = attrs.field(repr=lambda bars: f"<{len(bars)} bars>")
    attempts: int
    api_seconds: float
    bytes: int
    last: bool
    quarantined: tuple[Quarantined, ...] = ()
    rows: CopyRows | None = None  # `bars` encoded for the writer (decoded in a worker thread)


@attrs.frozen
class ClientStatistics:
    """Counters since start, for /status, /metrics and the demo summary.

    Attributes:
        total_requests: HTTP attempts sent (each one took a token).
        rate_limited_count: 429 responses.
        retries: Attempts that followed a failed one (so total_requests - retries first tries).
        failures: Pages that raised: out of attempts, or not retryable (auth, 4xx).
        bytes_received: Body bytes of every response read to its end, error responses included
            (a body the connection cut off raised before it could be counted).
        pages: Pages yielded.
        bars: Bars yielded.
        request_seconds: Time spent in HTTP attempts (sent to body read), for mean latency.
        bars_quarantined: Bars that did not decode or validate (kept out of `bars`).
    """

    total_requests: int
    rate_limited_count: int
    retries: int
    failures: int
    bytes_received: int
    pages: int
    bars: int
    request_seconds: float = 0.0
    bars_quarantined: int = 0

    @property
    def mean_latency(self) -> float | None:
        """Mean seconds per HTTP attempt so far, None before the first."""
        return self.request_seconds / self.total_requests if self.total_requests else None


class _BearerAuth(httpx.Auth):
    """Sets `Authorization: Bearer KEY` on every request, next_url pages included."""

    def __init__(self, key: Secret) -> None:
        self._key = key

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self._key:
            request.headers["Authorization"] = "Bearer " + self._key.reveal()
        yield request

    def __repr__(self) -> str:
        return "_BearerAuth(***)"


class PolygonClient:
    """An aggregates client sharing one RateLimiter with every other user of the key.

    Args:
        config: Base URL, key, page limit, timeout, `max_in_flight` (sizes the connection pool).
        retry: Attempts and backoff.
        limiter: The key's shared limiter; each HTTP attempt runs inside `limiter.request()`.
        breaker: The API's circuit breaker (daemon.breaker), shared by every job; each attempt
            is admitted by it first. None: none (a tool or test that wants plain retries).
        transport: An httpx transport to use instead of the network (`httpx.MockTransport` in
            unit tests); None in production.

    Use as `async with PolygonClient(...) as client:` or call `aclose()`. The rate and in-flight
    cap live in the limiter: on reload call `limiter.set_rate` / `set_max_in_flight` as well as
    `client.update`.

    Error handling: `pages()` raises ApiAuthError, ApiRequestError, RateLimited, ApiServerError,
    ApiTransportError, BadResponse, ApiUnavailable (the ApiError family), nothing else.
    """

    def __init__(
        self,
        config: PolygonConfig,
        retry: RetryConfig,
        *,
        limiter: RateLimiter,
        breaker: CircuitBreaker | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._config = config
        self._retry = retry
        self._limiter = limiter
        self._bodies = trio.CapacityLimiter(BODIES_IN_MEMORY)
        # No breaker given: one that never opens (every failure is charged to its page).
        self._breaker = breaker or CircuitBreaker(threshold=sys.maxsize)
        self._transport = transport
        self._auth = _BearerAuth(config.api_key)
        self._pool_size = config.max_in_flight
        self._http = self._new_http(config.max_in_flight)
        # Clients replaced by a bigger pool on reload; closed with us (requests may still use them).
        self._retired: list[httpx.AsyncClient] = []
        self._total_requests = 0
        self._rate_limited = 0
        self._retries = 0
        self._failures = 0
        self._bytes = 0
        self._pages = 0
        self._bars = 0
        self._request_seconds = 0.0
        self._quarantined = 0

    def _new_http(self, pool_size: int) -> httpx.AsyncClient:
        # A pool as large as the in-flight cap: a request that has its token never queues for a
        # connection (which would space requests unevenly and could time out in the pool).
        limits = httpx.Limits(max_connections=pool_size, max_keepalive_connections=pool_size)
        return httpx.AsyncClient(
            transport=self._transport,
            limits=limits,
            headers={"Accept": "application/json", "User-Agent": "backfilld"},
            follow_redirects=False,  # a redirect is a misconfigured base_url: say so, don't chase
        )

    def __repr__(self) -> str:
        return f"PolygonClient(base_url={self._config.base_url!r}, api_key=***)"

    async def __aenter__(self) -> PolygonClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pools. Idempotent."""
        for http in [*self._retired, self._http]:
            await http.aclose()
        self._retired.clear()

    def update(self, config: PolygonConfig, retry: RetryConfig) -> None:
        """Live reload: the next attempt uses the new key, URL, timeout, page limit and retry.

        A page already being retried keeps the retry settings it started with. A larger
        `max_in_flight` gets a larger pool (the old one serves its requests until `aclose`).
        """
        self._config = config
        self._retry = retry
        self._auth = _BearerAuth(config.api_key)
        if config.max_in_flight > self._pool_size:
            self._retired.append(self._http)
            self._pool_size = config.max_in_flight
            self._http = self._new_http(config.max_in_flight)

    def statistics(self) -> ClientStatistics:
        return ClientStatistics(
            total_requests=self._total_requests,
            rate_limited_count=self._rate_limited,
            retries=self._retries,
            failures=self._failures,
            bytes_received=self._bytes,
            pages=self._pages,
            bars=self._bars,
            request_seconds=self._request_seconds,
            bars_quarantined=self._quarantined,
        )

    # --- pages --------------------------------------------------------------------------------

    async def pages(
        self, symbol: str, timeframe: Timeframe, from_ms: int, to_ms: int
    ) -> AsyncGenerator[Page, None]:
        """Yield the pages of bars of `symbol` at `timeframe` with `from_ms <= t <= to_ms`.

        Pages come in API order (ascending `t`); the last has `last=True`. Consume it inside
        `contextlib.aclosing(...)` so an early `break` closes it at once. Nothing is held (no
        slot, no token) while the consumer works on a page.

        Error handling: a page that fails for good raises (see the class docstring) and ends
        the iteration; pages yielded before it are complete. Bad bars do not fail a page: they
        come out in `Page.quarantined`.
        """
        log = logger.bind(symbol=symbol, timeframe=timeframe.label)
        try:
            url = self._first_url(symbol, timeframe, from_ms, to_ms)
            seen = {str(url)}
            while True:
                started = trio.current_time()
                body, nbytes, attempts = await self._fetch_retrying(
                    url, partial(decode_page, from_ms=from_ms, to_ms=to_ms, symbol=symbol,
                                     timeframe=timeframe.label), log)
                next_url = body.next_url
                handed = [Page(
                    bars=body.bars,
                    attempts=attempts,
                    api_seconds=trio.current_time() - started,
                    bytes=nbytes,
                    last=next_url is None,
                    quarantined=body.quarantined,
                    rows=body.rows,
                )]
                self._pages += 1
                self._bars += len(body.bars)
                self._quarantined += len(body.quarantined)
                del body
                # Not inside any cancel scope or nursery: a suspended generator holds nothing,
                # not even the page (popped as it is yielded): memory stays one page per
                # consumer, whatever the history's length.
                yield handed.pop()
                if next_url is None:
                    return
                url = self._follow(next_url)
                if str(url) in seen:
                    raise BadResponse("next_url points back to a page already fetched")
                seen.add(str(url))
        except ApiError:
            self._failures += 1
            raise

    async def splits(self, since: dt.date, until: dt.date) -> list[Split]:
        """Every split executed from `since` through `until` (market-wide: one request per
        1,000 splits), through the same limiter, breaker and retries as the bars.

        Error handling: as `pages()`."""
        log = logger.bind(symbol="*", timeframe="splits")
        params = {"execution_date.gte": since.isoformat(),
                  "execution_date.lte": until.isoformat(), "limit": "1000",
                  "sort": "execution_date", "order": "asc"}
        url = httpx.URL(self._config.base_url + "/v3/reference/splits", params=params)
        found: list[Split] = []
        seen = {str(url)}
        try:
            while True:
                body, _, _ = await self._fetch_retrying(url, decode_splits, log)
                found.extend(body.splits)
                if body.next_url is None:
                    return sorted(found)
                url = self._follow(body.next_url)
                if str(url) in seen:
                    raise BadResponse("next_url points back to a page already fetched")
                seen.add(str(url))
        except ApiError:
            self._failures += 1
            raise

    def _first_url(self, symbol: str, timeframe: Timeframe, from_ms: int, to_ms: int) -> httpx.URL:
        if symbol in ("", ".", ".."):
            raise ApiRequestError(f"{symbol!r} is not a ticker")
        # `:` and `.` stay as they are (X:BTCUSD, BRK.A): the API routes on the literal ticker.
        # Anything that could change the path's shape (`/`, `?`, `#`, spaces) is percent-encoded.
        ticker = quote(symbol, safe=":")
        path = (
            f"/v2/aggs/ticker/{ticker}/range/{timeframe.multiplier}/{timeframe.timespan}"
            f"/{from_ms}/{to_ms}"
        )
        params = {
            "adjusted": "true" if self._config.adjusted else "false",
            "sort": "asc",
            "limit": str(self._config.page_limit),
        }
        # An absolute URL built as a string: httpx keeps `:` in the path as sent. (Joining a
        # relative "X:BTCUSD/..." onto a base would parse `X:` as a scheme.)
        return httpx.URL(self._config.base_url + path, params=params)

    def _follow(self, next_url: str) -> httpx.URL:
        """The URL to fetch for `next_url`, on the configured host, without any key in it.

        The key goes with every request in a header, so it must go only where the operator
        pointed `base_url`: a `next_url` naming another host (api.polygon.io vs api.massive.com,
        or a hostile one) is re-rooted onto the configured scheme, host and port.
        """
        base = httpx.URL(self._config.base_url)
        try:
            url = base.join(next_url)
        except httpx.InvalidURL as exc:
            raise BadResponse(f"unusable next_url: {exc}") from None
        if (url.scheme, url.host, url.port) != (base.scheme, base.host, base.port):
            prefix = base.raw_path.rstrip(b"/")
            raw_path = url.raw_path
            if prefix and not raw_path.startswith(prefix + b"/"):
                raw_path = prefix + raw_path
            path, _, query = raw_path.partition(b"?")
            url = base.copy_with(raw_path=path + (b"?" + query if query else b""))
        query = url.query
        if b"apikey=" in query.lower():
            kept = [p for p in query.split(b"&") if not p.lower().startswith(b"apikey=")]
            url = url.copy_with(query=b"&".join(kept) or None)
        return url

    # --- one page, retried ----------------------------------------------------------------------

    async def _fetch_retrying(self, url: httpx.URL, decode: Callable[[bytes], _D], log: Logger
                              ) -> tuple[_D, int, int]:
        """Fetch and decode one page, retrying what can be retried. Returns body, bytes, attempts.

        A page's attempts are charged only for failures while the circuit breaker is closed:
        during an outage requests wait for the breaker (daemon.breaker) and spend nothing, so
        a page rides out an outage of any length.

        Error handling: the last retryable error is re-raised with the attempt count in its
        message; anything not retryable is raised as it came.
        """
        retry = self._retry  # a reload mid-page does not change this page's schedule
        backoff = Backoff(retry.min_seconds, retry.max_seconds, jitter=retry.jitter)
        attempts = 0
        charged = 0  # failures that count against `retry.attempts`

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            if not self._breaker.is_closed:
                return 0.0  # the breaker does the waiting (and the probing)
            if isinstance(exc, ApiError) and exc.retry_after is not None:
                return exc.retry_after
            return backoff(max(charged, 1))

        def stop(state: RetryCallState) -> bool:
            return charged >= retry.attempts

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            if not self._breaker.is_closed:
                return  # one warning when the circuit opens, not one per waiting page
            log.warning(
                "attempt {}/{} failed: {}: {}; retrying in {:.3f} s",
                charged, retry.attempts, type(exc).__name__, exc, state.upcoming_sleep or 0.0,
            )

        policy = retrying(
            wait=wait,
            stop=stop,
            sleep=self._limiter.sleep,  # trio.sleep that a stop (limiter.close) cuts short
            before_sleep=before_sleep,
        )

        async def attempt() -> tuple[_D, int, int]:
            nonlocal attempts, charged
            ticket = await self._breaker.admit()
            attempts += 1
            if attempts > 1:
                self._retries += 1
            try:
                body, nbytes = await self._fetch_once(url, retry, decode)
            except ApiError as exc:
                if exc.transient and not isinstance(exc, RateLimited):
                    self._breaker.failed(ticket)
                    if self._breaker.is_closed:
                        charged += 1
                else:
                    self._breaker.succeeded(ticket)  # the API answered: it is reachable
                    if exc.transient:
                        charged += 1  # a 429: the limiter slows down, the page pays
                raise
            except BaseException:
                self._breaker.abandoned(ticket)
                raise
            self._breaker.succeeded(ticket)
            return body, nbytes, attempts

        try:
            return await policy(attempt)
        except ApiError as exc:
            if not exc.transient:
                raise
            final = _gave_up(exc, attempts)
        raise final  # outside the except: no __context__ to carry the earlier errors around

    async def _fetch_once(self, url: httpx.URL, retry: RetryConfig, decode: Callable[[bytes], _D]
                          ) -> tuple[_D, int]:
        """One HTTP attempt under the limiter: send, read the whole body, check, decode (in a
        worker thread: a 50,000-bar page is tens of ms of CPU the event loop should not wait
        on)."""
        async with self._limiter.request() as grant:
            self._total_requests += 1
            body_slot = _BodySlot(self._bodies)
            try:
                return await self._answer(grant, url, decode, retry, body_slot)
            finally:
                body_slot.release()

    async def _answer(self, grant: Grant, url: httpx.URL, decode: Callable[[bytes], _D],
                      retry: RetryConfig, body_slot: _BodySlot) -> tuple[_D, int]:
        """The attempt's exchange, checked and decoded; its body holds `body_slot` from the
        moment it is read (by `_exchange`) until it is decoded."""
        config = self._config
        sent = trio.current_time()
        try:
            response, body = await self._exchange(self._http, self._auth, url,
                                                  config.timeout_seconds, body_slot)
        finally:
            self._request_seconds += trio.current_time() - sent
        raw_bytes = response.num_bytes_downloaded or len(body)
        self._bytes += raw_bytes
        status = response.status_code
        retry_after = _retry_after(response.headers.get("retry-after"), retry.max_seconds)
        if status == 429:
            self._rate_limited += 1
            self._limiter.on_rate_limited(retry_after, grant=grant)
            wait = f" (Retry-After {retry_after:g} s)" if retry_after is not None else ""
            raise RateLimited(self._scrub(f"HTTP 429{wait}: {_snippet(body)}"),
                              retry_after=retry_after)
        if not 200 <= status < 300:
            raise self._status_error(status, response.reason_phrase, body, retry_after)
        self._limiter.on_success(grant=grant)
        declared = _content_length(response)
        if declared is not None and raw_bytes < declared:
            raise BadResponse(f"body cut off: {raw_bytes} of {declared} bytes")
        # Decoded while the body slot is held: the raw bodies in memory stay within
        # BODIES_IN_MEMORY, however many ranges are walked at once.
        try:
            decoded = await trio.to_thread.run_sync(decode, body, limiter=_DECODE_THREADS)
        except BadResponse as exc:
            raise BadResponse(self._scrub(exc.message)) from None
        if decoded.status in OK_STATUSES:
            if decoded.results_null:
                raise BadResponse('"results": null (the API does this under load)')
            if isinstance(decoded, DecodedPage) and decoded.quarantined:
                # their raw JSON is stored: no key in it, ever
                scrubbed = attrs.evolve(decoded, quarantined=tuple(
                    attrs.evolve(q, raw=self._scrub(q.raw), reason=self._scrub(q.reason))
                    for q in decoded.quarantined))
                return scrubbed, raw_bytes
            return decoded, raw_bytes
        raise self._body_error(decoded, body)

    def _body_error(self, decoded: _Envelope, body: bytes) -> ApiError:
        """A 200 whose body says it failed: classified like the matching status code."""
        message = self._scrub(f"HTTP 200 with status {decoded.status!r}: {_snippet(body)}")
        if decoded.status == "NOT_AUTHORIZED":
            return _refusal(403, message, decoded.message or "")
        if decoded.status == "ERROR":
            return ApiServerError(message, status=200)
        return BadResponse(message)

    async def _exchange(
        self, http: httpx.AsyncClient, auth: httpx.Auth, url: httpx.URL, seconds: float,
        body_slot: _BodySlot,
    ) -> tuple[httpx.Response, bytes]:
        """Send, then (once `body_slot` is ours) read the whole body, within `seconds`; httpx
        errors become ours here. The wait for the slot does not count against `seconds`: it
        is our own decoder's backlog, not the API being slow, and a timeout there would only
        re-fetch (and pay rate budget for) a response that is waiting in the socket.

        Error handling: ours are raised outside the `except` blocks, so they carry no
        `__context__`: no httpx exception (whose request holds the Authorization header)
        stays reachable from an error a caller may log or keep.
        """
        try:
            # httpx's timeouts are per operation; the deadline also bounds a slow-drip body.
            with trio.fail_after(seconds) as deadline:
                request = http.build_request("GET", url, timeout=httpx.Timeout(seconds))
                response = await http.send(request, auth=auth, stream=True)
                try:
                    left = deadline.deadline - trio.current_time()
                    deadline.deadline = math.inf  # the clock stops while the slot is waited for
                    await body_slot.acquire()
                    deadline.deadline = trio.current_time() + left
                    # Not response.aread(): that keeps the body in the response, and a response
                    # is in a reference cycle (its stream points back at it), so every body
                    # would live until the cyclic GC's next full pass, not until decoded.
                    body = b"".join([chunk async for chunk in response.aiter_bytes()])
                finally:
                    await response.aclose()
                return response, body
        except trio.TooSlowError:
            error: ApiError = ApiTransportError(f"no complete response within {seconds:g} s")
        except httpx.HTTPError as exc:
            error = self._translate(exc)
        raise error

    def _translate(self, exc: httpx.HTTPError) -> ApiError:
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if isinstance(exc, httpx.TimeoutException):
            return ApiTransportError(self._scrub(f"timed out ({detail})"))
        if isinstance(exc, httpx.TransportError):
            return ApiTransportError(self._scrub(f"connection failed ({detail})"))
        if isinstance(exc, httpx.DecodingError):
            return BadResponse(self._scrub(f"body not decodable ({detail})"))
        return ApiTransportError(self._scrub(f"request failed ({detail})"))

    def _status_error(self, status: int, reason: str, body: bytes,
                      retry_after: float | None) -> ApiError:
        snippet = _snippet(body)
        message = self._scrub(f"HTTP {status} {reason}: {snippet}".replace(" :", ":"))
        if status in (401, 403):
            return _refusal(status, message, snippet)
        if status >= 500:
            return ApiServerError(message, status=status, retry_after=retry_after)
        return ApiRequestError(message, status=status)  # 3xx (no redirects followed), 4xx

    def _scrub(self, text: str) -> str:
        """`text` without the key's literal value (a proxy may echo it), then `redact()`ed."""
        key = self._config.api_key.reveal()
        if key:
            text = text.replace(key, "***")
        return redact(text)


def _refusal(status: int, message: str, detail: str) -> ApiAuthError:
    """401, or a 403 that says the key is unknown or invalid, refuses the key; any other 403
    refuses this one ticker or timespan (the plan does not cover it)."""
    if status == 401 or _KEY_REFUSED.search(detail):
        return ApiKeyRefused(message, status=status)
    return NotEntitled(message, status=status)


def _gave_up(exc: ApiError, attempts: int) -> ApiError:
    """The error raised after the last attempt: same type, saying how many were made."""
    plural = "s" if attempts != 1 else ""
    message = f"gave up after {attempts} attempt{plural}; last: {exc.message}"
    return type(exc)(message, status=exc.status, retry_after=exc.retry_after)


def _retry_after(value: str | None, cap: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date), at most `cap`."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), cap)


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _snippet(body: bytes) -> str:
    """A short, one-line reason from an error body: the JSON `message`/`error`, else its text."""
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError:
        data = None
    if isinstance(data, dict):
        for field in ("message", "error", "status"):
            value = data.get(field)
            if isinstance(value, str):
                return value[:SNIPPET_CHARS]
    text = _SPACE.sub(" ", _TAG.sub(" ", body[: SNIPPET_CHARS * 20].decode("utf-8", "replace")))
    return text.strip()[:SNIPPET_CHARS] or "(empty body)"
