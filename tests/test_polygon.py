"""PolygonClient against httpx.MockTransport on a MockClock: URLs, auth, retries, exact schedules.

A scripted handler (`Api`) answers each attempt in turn and records when it came (trio time), so
backoff and Retry-After are asserted as exact lists of attempt times. One test runs a real
loopback socket (real clock) for what only a real transport does: h11 refusing a body shorter
than its Content-Length, and the request line a server actually receives.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import aclosing
from functools import partial
from typing import Any

import attrs
import httpx
import msgspec
import pytest
import trio
import trio.testing
from loguru import logger

from daemon.bars import Bar
from daemon.config import PolygonConfig, RetryConfig, Secret
from daemon.errors import (
    ApiAuthError,
    ApiError,
    ApiKeyRefused,
    ApiRequestError,
    ApiServerError,
    ApiTransportError,
    BadResponse,
    NotEntitled,
    RateLimited,
)
from daemon.polygon import ClientStatistics, Page, PolygonClient
from daemon.ratelimit import RateLimiter
from daemon.timeframes import Timeframe

KEY = "SECRET123KEY"
BASE = "https://api.test"
DAY = Timeframe(1, "d")
FROM, TO = 1_700_000_000_000, 1_708_640_000_000  # 100 days
EXACT = RetryConfig(attempts=5, min_seconds=1.0, max_seconds=300.0, jitter=0.0)

Reply = Callable[[httpx.Request], httpx.Response]


# --- helpers ----------------------------------------------------------------------------------


def bar(t: int, **fields: Any) -> dict[str, Any]:
    values: dict[str, Any] = {"o": 10.0, "h": 11.0, "l": 9.0, "c": 10.5, "v": 1000.0,
                              "vw": 10.2, "n": 12, "t": t}
    values.update(fields)
    return values


def bars(count: int, start: int = FROM) -> list[dict[str, Any]]:
    return [bar(start + i * 86_400_000) for i in range(count)]


def ok(results: list[dict[str, Any]] | None = None, *, next_url: str | None = None,
       status: str = "OK", omit_results: bool = False) -> Reply:
    body: dict[str, Any] = {"ticker": "AAPL", "status": status, "queryCount": 1,
                            "request_id": "r1", "adjusted": True}
    if not omit_results:
        body["results"] = results
        body["resultsCount"] = len(results or [])
    if next_url is not None:
        body["next_url"] = next_url
    return raw(200, json.dumps(body).encode())


def raw(status: int, content: bytes, headers: dict[str, str] | None = None) -> Reply:
    return lambda request: httpx.Response(status, content=content, headers=headers)


def body_of(reply: Reply) -> bytes:
    return reply(httpx.Request("GET", BASE)).content


def fail(exc: Exception) -> Reply:
    def reply(request: httpx.Request) -> httpx.Response:
        raise exc

    return reply


class Api:
    """Answers attempts with `replies` in order (the last one repeats); records each attempt."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.calls: list[tuple[float, httpx.Request]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append((trio.current_time(), request))
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        return reply(request)

    @property
    def times(self) -> list[float]:
        return [t for t, _ in self.calls]

    @property
    def requests(self) -> list[httpx.Request]:
        return [r for _, r in self.calls]


def make_client(
    api: Api,
    *,
    retry: RetryConfig = EXACT,
    limiter: RateLimiter | None = None,
    rpm: float = 0,
    **polygon: Any,
) -> PolygonClient:
    config = PolygonConfig(base_url=BASE, api_key=Secret(KEY), requests_per_minute=rpm,
                           **polygon)
    limiter = limiter or RateLimiter(rpm, max_in_flight=config.max_in_flight)
    return PolygonClient(config, retry, limiter=limiter, transport=httpx.MockTransport(api))


async def collect(client: PolygonClient, symbol: str = "AAPL", timeframe: Timeframe = DAY,
                  from_ms: int = FROM, to_ms: int = TO) -> list[Page]:
    pages = []
    async with aclosing(client.pages(symbol, timeframe, from_ms, to_ms)) as stream:
        async for page in stream:
            pages.append(page)
    return pages


def stats(client: PolygonClient, **expected: int) -> None:
    actual = attrs.asdict(client.statistics())
    assert {k: actual[k] for k in expected} == expected


@pytest.fixture
def logs() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="TRACE",
                      format="{level} {message} {extra}")
    yield lines
    logger.remove(sink)


# --- URLs, auth, pagination -------------------------------------------------------------------


async def test_pagination_follows_next_url_with_the_key_in_the_header_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    page2 = f"{BASE}/v2/aggs/ticker/AAPL/range/1/day/{FROM}/{TO}?cursor=Y3Vyc29yMg%3D%3D"
    page3 = f"{BASE}/v2/aggs/ticker/AAPL/range/1/day/{FROM}/{TO}?cursor=Y3Vyc29yMw%3D%3D"
    replies = [ok(bars(3), next_url=page2), ok(bars(2, FROM + 10 * 86_400_000), next_url=page3),
               ok(omit_results=True)]
    api = Api(*replies)
    async with make_client(api, page_limit=5000) as client:
        pages = await collect(client)

    first, second, third = (r.url for r in api.requests)
    assert first.raw_path == (
        f"/v2/aggs/ticker/AAPL/range/1/day/{FROM}/{TO}?adjusted=true&sort=asc&limit=5000".encode()
    )
    assert str(second) == page2 and str(third) == page3  # cursor bytes untouched
    for request in api.requests:
        assert request.headers["Authorization"] == f"Bearer {KEY}"
        assert KEY not in str(request.url) and "apikey" not in str(request.url).lower()
    assert [len(p.bars) for p in pages] == [3, 2, 0]
    assert [p.last for p in pages] == [False, False, True]
    assert [p.attempts for p in pages] == [1, 1, 1]
    assert all(isinstance(b, Bar) for p in pages for b in p.bars)
    sizes = [len(body_of(reply)) for reply in replies]
    assert [p.bytes for p in pages] == sizes
    stats(client, total_requests=3, pages=3, bars=5, retries=0, failures=0, rate_limited_count=0,
          bytes_received=sum(sizes))


@pytest.mark.parametrize("symbol", ["X:BTCUSD", "BRK.A", "I:SPX", "C:EURUSD"])
async def test_tickers_reach_the_server_with_colon_and_dot_intact(
    symbol: str, autojump_clock: trio.testing.MockClock
) -> None:
    api = Api(ok([]))
    async with make_client(api, adjusted=False, page_limit=50_000) as client:
        await collect(client, symbol, Timeframe(5, "m"))
    assert api.requests[0].url.raw_path == (
        f"/v2/aggs/ticker/{symbol}/range/5/minute/{FROM}/{TO}"
        "?adjusted=false&sort=asc&limit=50000".encode()
    )


async def test_characters_that_would_change_the_path_are_escaped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    api = Api(ok([]))
    async with make_client(api) as client:
        await collect(client, "A/B C")
    assert api.requests[0].url.raw_path.startswith(b"/v2/aggs/ticker/A%2FB%20C/range/1/day/")
    with pytest.raises(ApiRequestError):
        await collect(client, "..")


async def test_next_url_goes_to_the_configured_host_without_a_key_in_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    foreign = ("https://elsewhere.example:8443/v2/aggs/ticker/AAPL/range/1/day/1/2"
               f"?cursor=ab+c%2F&apiKey={KEY}")
    api = Api(ok(bars(1), next_url=foreign), ok([]))
    async with make_client(api) as client:
        await collect(client)
    followed = api.requests[1].url
    assert (followed.scheme, followed.host, followed.port) == ("https", "api.test", None)
    assert followed.raw_path == b"/v2/aggs/ticker/AAPL/range/1/day/1/2?cursor=ab+c%2F"


async def test_next_url_under_a_base_path_keeps_the_prefix(
    autojump_clock: trio.testing.MockClock,
) -> None:
    api = Api(ok(bars(1), next_url="https://api.polygon.io/v2/aggs/x?cursor=1"), ok([]))
    config = PolygonConfig(base_url="http://127.0.0.1:9000/proxy", api_key=Secret(KEY))
    client = PolygonClient(config, EXACT, limiter=RateLimiter(0, max_in_flight=2),
                           transport=httpx.MockTransport(api))
    async with client:
        await collect(client)
    assert [str(r.url).split("?")[0] for r in api.requests] == [
        f"http://127.0.0.1:9000/proxy/v2/aggs/ticker/AAPL/range/1/day/{FROM}/{TO}",
        "http://127.0.0.1:9000/proxy/v2/aggs/x",
    ]


async def test_a_next_url_loop_is_refused_after_the_page(
    autojump_clock: trio.testing.MockClock,
) -> None:
    same = f"{BASE}/v2/aggs/ticker/AAPL/range/1/day/{FROM}/{TO}?cursor=again"
    api = Api(ok(bars(1), next_url=same))
    got: list[Page] = []
    async with make_client(api) as client:
        with pytest.raises(BadResponse, match="already fetched"):
            async with aclosing(client.pages("AAPL", DAY, FROM, TO)) as stream:
                async for page in stream:
                    got.append(page)
    assert len(got) == 2 and len(api.calls) == 2
    stats(client, pages=2, failures=1)


async def test_an_early_break_stops_fetching(autojump_clock: trio.testing.MockClock) -> None:
    api = Api(ok(bars(1), next_url=f"{BASE}/v2/next?cursor=1"), ok(bars(1)))
    async with make_client(api) as client:
        async with aclosing(client.pages("AAPL", DAY, FROM, TO)) as stream:
            async for _ in stream:
                break
    assert len(api.calls) == 1


# --- decoding and validation ------------------------------------------------------------------


async def test_exponent_volume_and_missing_optional_fields(
    autojump_clock: trio.testing.MockClock,
) -> None:
    body = (b'{"status":"DELAYED","resultsCount":1,"results":[{"v":4.1515e4,"o":1,"c":1.5,'
            b'"h":2,"l":0.5,"t":1700000000000}]}')
    async with make_client(Api(raw(200, body))) as client:
        (page,) = await collect(client)
    assert page.bars == [Bar(t=1_700_000_000_000, o=1.0, h=2.0, l=0.5, c=1.5, v=41515.0)]
    assert page.bars[0].vw is None and page.bars[0].n is None
    assert page.last and page.bytes == len(body)


async def test_no_results_key_is_an_empty_last_page(autojump_clock: trio.testing.MockClock) -> None:
    async with make_client(Api(ok(omit_results=True))) as client:
        pages = await collect(client)
    assert [(p.bars, p.last, p.attempts) for p in pages] == [([], True, 1)]
    stats(client, pages=1, bars=0, total_requests=1)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (bar(FROM, h=8.0), "high 8.0 < low 9.0"),
        (bar(FROM, o=12.0), "outside"),
        (bar(FROM, c=8.5), "outside"),
        (bar(FROM, v=-1.0), "negative volume"),
        (bar(FROM, n=-3), "negative trade count"),
        (bar(FROM - 1), "outside the requested range"),
        (bar(TO + 1), "outside the requested range"),
        (bar(FROM + 86_400_000), "repeated"),  # same t as the good bar before it
        # NaN and inf cannot be written in JSON: the decoder refuses them (BadResponse, below).
    ],
)
async def test_impossible_bars_are_quarantined_and_the_rest_kept(
    bad: dict[str, Any], reason: str, autojump_clock: trio.testing.MockClock
) -> None:
    good = bar(FROM + 2 * 86_400_000)
    api = Api(ok([bar(FROM + 86_400_000), bad, good]))
    async with make_client(api) as client:
        [page] = await collect(client)
    assert len(api.calls) == 1  # not retried: the same request would return the same bars
    assert [b.t for b in page.bars] == [t for t in (FROM + 86_400_000, FROM + 2 * 86_400_000)
                                        if reason != "repeated" or t != bad["t"]]
    [q, *more] = page.quarantined
    assert reason in q.reason and msgspec.json.decode(q.raw)["t"] == bad["t"]
    # a t the page can place is kept; one outside the range cannot be (the page is held out)
    assert q.t == (None if "outside the requested" in reason else bad["t"])
    if reason == "repeated":  # every copy of a repeated t: which one is right is unknown
        assert len(more) == 1 and more[0].t == bad["t"]
    stats(client, total_requests=1, retries=0, failures=0, pages=1, bars=len(page.bars),
          bars_quarantined=len(page.quarantined))


# --- retries: exact schedules -----------------------------------------------------------------


async def test_429_with_retry_after_retries_at_exactly_that_time(
    autojump_clock: trio.testing.MockClock, logs: list[str]
) -> None:
    api = Api(raw(429, b'{"status":"ERROR","error":"You\'ve exceeded the maximum requests"}',
                  {"Retry-After": "7"}),
              ok(bars(2)))
    limiter = RateLimiter(150, max_in_flight=16)
    async with make_client(api, limiter=limiter) as client:
        (page,) = await collect(client)
    assert api.times == [0.0, 7.0]
    assert page.attempts == 2 and page.api_seconds == 7.0 and len(page.bars) == 2
    stats(client, total_requests=2, rate_limited_count=1, retries=1, failures=0, pages=1)
    assert limiter.statistics().effective_per_minute == 150 * 0.8 + 150 * 0.05
    (warning,) = [line for line in logs if line.startswith("WARNING")]
    assert "attempt 1/5 failed: RateLimited" in warning and "retrying in 7.000 s" in warning
    assert "'symbol': 'AAPL'" in warning and "'timeframe': '1d'" in warning


async def test_retry_after_pauses_other_tasks_sharing_the_key(
    autojump_clock: trio.testing.MockClock,
) -> None:
    api = Api(raw(429, b"{}", {"Retry-After": "7"}), ok([]))
    limiter = RateLimiter(0, max_in_flight=16)
    other: list[float] = []

    async def another_job() -> None:
        await trio.sleep(1)
        async with limiter.request():
            other.append(trio.current_time())

    async with make_client(api, limiter=limiter) as client, trio.open_nursery() as nursery:
        nursery.start_soon(another_job)
        await collect(client)
    # both wait for the Retry-After; then the API's ceiling (100 req/s) spaces them by 10 ms
    assert sorted([*other, api.times[1]]) == pytest.approx([7.0, 7.01])


@pytest.mark.parametrize(
    ("max_seconds", "times"),
    [(300.0, [0.0, 1.0, 3.0, 7.0, 15.0]), (4.0, [0.0, 1.0, 3.0, 7.0, 11.0])],
)
async def test_429_without_retry_after_backs_off_then_gives_up(
    max_seconds: float, times: list[float], autojump_clock: trio.testing.MockClock
) -> None:
    too_many = raw(429, b'{"status":"ERROR","error":"You\'ve exceeded the maximum requests"}')
    api = Api(too_many)
    retry = RetryConfig(attempts=5, min_seconds=1.0, max_seconds=max_seconds, jitter=0.0)
    async with make_client(api, retry=retry, rpm=150) as client:
        with pytest.raises(RateLimited) as caught:
            await collect(client)
    assert api.times == times
    assert caught.value.message == (
        "gave up after 5 attempts; last: HTTP 429: You've exceeded the maximum requests"
    )
    assert caught.value.retry_after is None and caught.value.status == 429
    stats(client, total_requests=5, rate_limited_count=5, retries=4, failures=1, pages=0,
          bytes_received=5 * len(body_of(too_many)))


async def test_5xx_html_then_success(
    autojump_clock: trio.testing.MockClock, logs: list[str]
) -> None:
    html = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
    api = Api(raw(502, html, {"Content-Type": "text/html"}), raw(503, b""), ok(bars(1)))
    async with make_client(api) as client:
        (page,) = await collect(client)
    assert api.times == [0.0, 1.0, 3.0] and page.attempts == 3
    warnings = [line for line in logs if line.startswith("WARNING")]
    assert "ApiServerError: HTTP 502 Bad Gateway: 502 Bad Gateway nginx" in warnings[0]
    assert "HTTP 503 Service Unavailable: (empty body)" in warnings[1]
    stats(client, total_requests=3, retries=2, failures=0,
          bytes_received=len(html) + page.bytes)


async def test_5xx_every_time_raises_server_error_with_status(
    autojump_clock: trio.testing.MockClock,
) -> None:
    api = Api(raw(500, b"oops"))
    retry = RetryConfig(attempts=3, min_seconds=0.5, max_seconds=10, jitter=0)
    async with make_client(api, retry=retry) as client:
        with pytest.raises(ApiServerError, match=r"gave up after 3 attempts; last: HTTP 500"):
            await collect(client)
    assert api.times == [0.0, 0.5, 1.5]


@pytest.mark.parametrize(
    "broken",
    [
        raw(200, b'{"status":"OK","results":[]}', {"Content-Length": "4096"}),  # cut off
        raw(200, b'{"status":"OK","results":[{"o":1,"h":2,"l":0.5,"c":1,"v":1,"t":17'),
        raw(200, b"<html>maintenance</html>"),
        raw(200, b'{"status":"OK","results":null}'),
        raw(200, b'{"status":"ERROR","error":"internal"}'),
        raw(200, b'{"status":"OK","results":{"t":1}}'),
        raw(200, b'{"status":"OK","results":[{"o":NaN,"h":2,"l":0.5,"c":1,"v":1,"t":1}]}'),
        raw(200, b""),
    ],
    ids=["content-length", "cut-json", "html", "results-null", "status-error", "shape",
         "nan", "empty"],
)
async def test_bad_bodies_are_retried(
    broken: Reply, autojump_clock: trio.testing.MockClock
) -> None:
    api = Api(broken, ok(bars(2)))
    async with make_client(api) as client:
        (page,) = await collect(client)
    assert api.times == [0.0, 1.0] and len(page.bars) == 2 and page.attempts == 2
    stats(client, total_requests=2, retries=1, failures=0)


async def test_an_undecodable_bar_spoils_that_bar_not_the_page(
        autojump_clock: trio.testing.MockClock) -> None:
    good = [bar(FROM + i * 86_400_000) for i in range(1, 4)]
    spoilt = [good[0], {**good[1], "o": "12.5x"}, {k: v for k, v in good[2].items() if k != "t"}]
    api = Api(ok(spoilt))
    async with make_client(api) as client:
        [page] = await collect(client)
    assert len(api.calls) == 1 and [b.t for b in page.bars] == [good[0]["t"]]
    price, no_t = page.quarantined
    assert price.t == good[1]["t"] and "undecodable bar" in price.reason and "12.5x" in price.raw
    assert no_t.t is None and '"t"' not in no_t.raw and "undecodable" in no_t.reason


async def test_bad_body_every_time_raises_bad_response(
    autojump_clock: trio.testing.MockClock,
) -> None:
    api = Api(raw(200, b'{"status":"OK","results":null}'))
    retry = RetryConfig(attempts=2, min_seconds=1, max_seconds=1, jitter=0)
    async with make_client(api, retry=retry) as client:
        with pytest.raises(BadResponse, match='gave up after 2 attempts; last: "results": null'):
            await collect(client)


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ConnectError("[Errno 111] Connection refused"),
        httpx.ReadTimeout("timed out"),
        httpx.RemoteProtocolError("peer closed connection without sending complete message body"),
        httpx.ReadError(""),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_transport_errors_are_translated_and_retried(
    exc: Exception, autojump_clock: trio.testing.MockClock, logs: list[str]
) -> None:
    api = Api(fail(exc), ok([]))
    async with make_client(api) as client:
        await collect(client)
    assert api.times == [0.0, 1.0]
    (warning,) = [line for line in logs if line.startswith("WARNING")]
    assert "ApiTransportError" in warning and type(exc).__name__ in warning


async def test_transport_error_every_time_is_ours_not_httpx(
    autojump_clock: trio.testing.MockClock,
) -> None:
    api = Api(fail(httpx.ConnectError("refused")))
    async with make_client(api, retry=RetryConfig(attempts=2, jitter=0)) as client:
        with pytest.raises(ApiTransportError) as caught:
            await collect(client)
    assert caught.value.__cause__ is None and caught.value.__context__ is None
    assert str(caught.value) == (
        "gave up after 2 attempts; last: connection failed (ConnectError: refused)"
    )


async def test_a_hung_response_times_out_after_timeout_seconds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls: list[float] = []

    async def hang(request: httpx.Request) -> httpx.Response:
        calls.append(trio.current_time())
        await trio.sleep_forever()
        raise AssertionError  # pragma: no cover

    config = PolygonConfig(base_url=BASE, api_key=Secret(KEY), timeout_seconds=5.0)
    retry = RetryConfig(attempts=2, min_seconds=1, max_seconds=1, jitter=0)
    client = PolygonClient(config, retry, limiter=RateLimiter(0, max_in_flight=4),
                           transport=httpx.MockTransport(hang))
    async with client:
        with pytest.raises(ApiTransportError, match="no complete response within 5 s"):
            await collect(client)
    assert calls == [0.0, 6.0]
    stats(client, total_requests=2, failures=1)


@pytest.mark.parametrize(("status", "body", "error"), [
    (401, {"status": "NOT_AUTHORIZED", "message": "Unknown API Key"}, "ApiKeyRefused"),
    (403, {"status": "NOT_AUTHORIZED", "message": "Unknown API Key"}, "ApiKeyRefused"),
    (403, {"status": "ERROR", "error": "Invalid API key"}, "ApiKeyRefused"),
    (403, {"status": "NOT_AUTHORIZED", "message": "You are not entitled to this data. Please "
           "upgrade your plan at https://polygon.io/pricing"}, "NotEntitled"),
    (200, {"status": "NOT_AUTHORIZED", "message": "You are not entitled to this data."},
     "NotEntitled"),
])
async def test_a_refused_key_is_told_from_a_refused_entitlement(
    status: int, body: dict[str, str], error: str, autojump_clock: trio.testing.MockClock
) -> None:
    api = Api(raw(status, msgspec.json.encode(body)))
    async with make_client(api) as client:
        with pytest.raises(ApiAuthError) as caught:
            await collect(client)
    assert type(caught.value).__name__ == error and api.times == [0.0]  # never retried
    assert isinstance(caught.value, ApiKeyRefused if error == "ApiKeyRefused" else NotEntitled)


@pytest.mark.parametrize(("status", "error"), [(401, ApiKeyRefused), (403, ApiKeyRefused),
                                               (400, ApiRequestError), (404, ApiRequestError),
                                               (301, ApiRequestError)])
async def test_client_errors_are_not_retried(
    status: int, error: type[ApiError], autojump_clock: trio.testing.MockClock
) -> None:
    body = b'{"status":"NOT_AUTHORIZED","request_id":"x","message":"Unknown API Key"}'
    api = Api(raw(status, body, {"Location": f"{BASE}/elsewhere"}))
    async with make_client(api) as client:
        with pytest.raises(error) as caught:
            await collect(client)
    assert type(caught.value) is error and caught.value.status == status
    assert caught.value.message.endswith(": Unknown API Key")
    assert api.times == [0.0]
    stats(client, total_requests=1, retries=0, failures=1, rate_limited_count=0)


# --- jitter, cancellation, reload -------------------------------------------------------------


async def test_jittered_waits_stay_within_bounds(autojump_clock: trio.testing.MockClock) -> None:
    api = Api(raw(503, b""))
    retry = RetryConfig(attempts=8, min_seconds=1, max_seconds=16, jitter=0.5)
    async with make_client(api, retry=retry) as client:
        with pytest.raises(ApiServerError):
            await collect(client)
    gaps = [b - a for a, b in zip(api.times, api.times[1:], strict=False)]
    for gap, base in zip(gaps, [1, 2, 4, 8, 16, 16, 16], strict=True):
        assert base <= gap <= base * 1.5
    assert len(set(gaps)) == len(gaps)  # drawn, not constant


async def test_cancellation_during_backoff_propagates_and_is_not_a_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    api = Api(raw(503, b""))
    async with make_client(api) as client:
        with trio.move_on_after(2.5) as scope:
            await collect(client)
    assert scope.cancelled_caught
    assert api.times == [0.0, 1.0]  # cancelled in the 2 s sleep, never tried again
    stats(client, total_requests=2, retries=1, failures=0)


async def test_cancellation_during_a_request_is_not_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls: list[float] = []

    async def slow(request: httpx.Request) -> httpx.Response:
        calls.append(trio.current_time())
        await trio.sleep(10)
        return ok([])(request)  # pragma: no cover

    limiter = RateLimiter(0, max_in_flight=4)
    client = PolygonClient(PolygonConfig(base_url=BASE, api_key=Secret(KEY)), EXACT,
                           limiter=limiter, transport=httpx.MockTransport(slow))
    async with client:
        with trio.move_on_after(3) as scope:
            await collect(client)
    assert scope.cancelled_caught and calls == [0.0]
    assert limiter.statistics().in_flight == 0
    stats(client, total_requests=1, retries=0, failures=0)


async def test_update_swaps_key_retry_and_page_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    api = Api(raw(503, b""), ok([]), raw(503, b""), ok([]))
    async with make_client(api) as client:
        await collect(client)
        client.update(
            PolygonConfig(base_url=BASE, api_key=Secret("NEWKEY"), page_limit=10,
                          max_in_flight=64),
            RetryConfig(attempts=5, min_seconds=3, max_seconds=3, jitter=0),
        )
        await collect(client)
    assert api.times == pytest.approx([0.0, 1.0, 1.01, 4.01])
    assert [r.headers["Authorization"] for r in api.requests] == [f"Bearer {KEY}"] * 2 + [
        "Bearer NEWKEY"] * 2
    assert api.requests[3].url.params["limit"] == "10"


# --- secrets ----------------------------------------------------------------------------------


async def test_the_key_never_appears_in_errors_logs_or_reprs(
    autojump_clock: trio.testing.MockClock, logs: list[str]
) -> None:
    echoing = [
        raw(401, f'{{"status":"NOT_AUTHORIZED","message":"Unknown API Key {KEY}"}}'.encode()),
        raw(403, f"Authorization: Bearer {KEY}".encode()),
        raw(400, f"bad request /v2/aggs?apiKey={KEY}".encode()),
        raw(500, f"<html>debug: key={KEY}</html>".encode()),
        raw(429, f'{{"error":"over budget for {KEY}"}}'.encode()),
        raw(200, f'{{"status":"ERROR","error":"{KEY}"}}'.encode()),
        raw(200, KEY.encode()),
        fail(httpx.ConnectError(f"cannot connect with {KEY}")),
        fail(httpx.ReadTimeout(f"Bearer {KEY}")),
        raw(200, b'{"status":"OK","results":[]}', {"Content-Length": "999"}),
    ]
    texts: list[str] = []
    retry = RetryConfig(attempts=2, min_seconds=0.1, max_seconds=0.1, jitter=0)
    for reply in echoing:
        api = Api(reply)
        async with make_client(api, retry=retry) as client:
            with pytest.raises(ApiError) as caught:
                await collect(client)
            chain: BaseException | None = caught.value
            while chain is not None:
                assert isinstance(chain, ApiError)  # no httpx error (or its request) kept
                texts += [str(chain), repr(chain)]
                chain = chain.__cause__ or chain.__context__
            texts += [repr(client), repr(client.statistics())]
            assert all(KEY not in str(r.url) for r in api.requests)
    # bars that echo it are quarantined (their raw JSON goes to the database): scrubbed too
    for reply in (raw(200, f'{{"status":"OK","results":[{{"{KEY}":1}}]}}'.encode()),
                  raw(200, f'{{"status":"OK","results":[{{"o":"{KEY}"}}]}}'.encode())):
        async with make_client(Api(reply), retry=retry) as client:
            [page] = await collect(client)
        assert page.quarantined
        texts += [repr(page), *(f"{q.raw} {q.reason}" for q in page.quarantined)]
    page_text = repr(Page(bars=[], attempts=1, api_seconds=0.0, bytes=0, last=True))
    texts += [page_text, "\n".join(logs)]
    assert logs, "the retries were logged"
    for text in texts:
        assert KEY not in text


# --- a real socket ----------------------------------------------------------------------------


async def test_real_transport_cut_off_body_is_retried_and_ticker_path_is_literal() -> None:
    """h11 itself refuses a body shorter than its Content-Length; we see ApiTransportError."""
    request_lines: list[bytes] = []
    good = json.dumps({"status": "OK", "resultsCount": 1, "results": [bar(FROM)]}).encode()

    async def serve(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some()
            if not chunk:
                return
            data += chunk
        request_lines.append(data.split(b"\r\n", 1)[0])
        if len(request_lines) == 1:
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{\"status\"")
        else:
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                  b"Content-Length: %d\r\n\r\n%s" % (len(good), good))
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        config = PolygonConfig(base_url=f"http://127.0.0.1:{port}", api_key=Secret(KEY),
                               timeout_seconds=5)
        retry = RetryConfig(attempts=3, min_seconds=0, max_seconds=0, jitter=0)
        async with PolygonClient(config, retry, limiter=RateLimiter(0, max_in_flight=2)) as client:
            pages = await collect(client, "X:BTCUSD")
        nursery.cancel_scope.cancel()
    assert [len(p.bars) for p in pages] == [1] and pages[0].attempts == 2
    assert request_lines == [
        f"GET /v2/aggs/ticker/X:BTCUSD/range/1/day/{FROM}/{TO}"
        "?adjusted=true&sort=asc&limit=50000 HTTP/1.1".encode()
    ] * 2
    stats(client, total_requests=2, retries=1, failures=0, bytes_received=len(good))


async def test_statistics_is_frozen() -> None:
    limiter = RateLimiter(0, max_in_flight=1)
    async with PolygonClient(PolygonConfig(), RetryConfig(), limiter=limiter) as client:
        snapshot = client.statistics()
    assert snapshot == ClientStatistics(0, 0, 0, 0, 0, 0, 0)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        snapshot.pages = 1  # type: ignore[misc]


async def test_a_stop_cuts_a_retry_backoff_short(autojump_clock: trio.testing.MockClock) -> None:
    # 503, then a 100 s backoff: closing the limiter (a SIGTERM) at t=5 ends the wait at once
    # and the retry is never sent.
    api = Api(raw(503, b""))
    limiter = RateLimiter(0, max_in_flight=4)
    slow = RetryConfig(attempts=5, min_seconds=100.0, max_seconds=300.0)
    async with make_client(api, retry=slow, limiter=limiter) as client:
        async with trio.open_nursery() as nursery:
            with pytest.raises(trio.ClosedResourceError):
                async with aclosing(client.pages("AAPL", DAY, FROM, TO)) as stream:
                    nursery.start_soon(_close_after, limiter, 5.0)
                    async for _ in stream:
                        pass  # pragma: no cover
            assert trio.current_time() == 5.0
    assert api.times == [0.0]


async def _close_after(limiter: RateLimiter, seconds: float) -> None:
    await trio.sleep(seconds)
    limiter.close()


async def test_a_value_the_database_cannot_hold_is_quarantined_not_written(
        autojump_clock: trio.testing.MockClock) -> None:
    api = Api(ok([bar(FROM + 86_400_000), bar(FROM + 2 * 86_400_000, n=2**70)]))
    async with make_client(api) as client:
        [page] = await collect(client)
    assert [b.t for b in page.bars] == [FROM + 86_400_000]
    assert page.rows is not None and page.rows.count == 1
    [q] = page.quarantined
    assert q.t == FROM + 2 * 86_400_000 and "out of range" in q.reason
