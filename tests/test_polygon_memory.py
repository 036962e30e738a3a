"""What a page costs in memory: a body lives until it is decoded, and only a few are read at
once, however many requests are in flight (issue 9: memory that does not grow with history);
and the time a response waits for a slot is not counted against the API's timeout.

The first test fetches from the simulator as a child process over loopback HTTP, so what
tracemalloc sees in this process is the client's alone.
"""

from __future__ import annotations

import gc
import json
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from functools import partial

import httpx
import pytest
import trio
import trio.testing

from daemon import polygon
from daemon.config import PolygonConfig, RetryConfig, Secret
from daemon.errors import ApiTransportError
from daemon.polygon import BODIES_IN_MEMORY, PolygonClient
from daemon.ratelimit import RateLimiter
from daemon.simulator.process import simulator_process
from daemon.timeframes import parse_timeframe

KEY = "memory-test-key"
FIVE_MINUTES = parse_timeframe("5m")
# 2022-01-03 .. 2023-12-29 of SPY 5m: 10 pages of up to 10,000 bars (~1 MB of JSON each)
FROM_MS, TO_MS = 1_641_186_000_000, 1_703_894_400_000
EXACT = RetryConfig(attempts=1, min_seconds=0.1, max_seconds=1, jitter=False)


@pytest.fixture(scope="module")
def simulator_url() -> Iterator[str]:
    with simulator_process(api_key=KEY, seed=3) as url:
        yield url


@pytest.fixture
def collector_off() -> Iterator[None]:
    """No cyclic garbage collection: what is still held is held by references, not waiting
    for the collector's next pass (which, in a long backfill, comes rarely)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


async def test_a_body_is_freed_once_decoded_not_at_the_next_collection(
        simulator_url: str, collector_off: None) -> None:
    config = PolygonConfig(base_url=simulator_url, api_key=Secret(KEY), requests_per_minute=0)
    client = PolygonClient(config, EXACT, limiter=RateLimiter(0, max_in_flight=4))
    tracemalloc.start()
    try:
        async with client:
            baseline = tracemalloc.get_traced_memory()[0]
            pages = body_bytes = 0
            async with aclosing(client.pages("SPY", FIVE_MINUTES, FROM_MS, TO_MS)) as stream:
                async for page in stream:
                    pages += 1
                    body_bytes = max(body_bytes, page.bytes)
                    del page
            held = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    assert pages >= 8 and body_bytes > 900_000
    # one body's worth of slack (buffers, the connection): all ten would be held if each
    # response kept its body until the collector ran
    assert held < 2 * body_bytes, f"{held:,} bytes still held after {pages} pages"


ONE_BAR_BODY = json.dumps({"status": "OK", "resultsCount": 1, "results": [
    {"v": 1.0, "vw": 1.0, "o": 1.0, "c": 1.0, "h": 1.0, "l": 1.0, "t": FROM_MS, "n": 1}]}).encode()


async def _count_bars(client: PolygonClient, got: dict[str, int], symbol: str) -> None:
    """Fetch `symbol`'s range, adding up its bars in `got`."""
    async with aclosing(client.pages(symbol, FIVE_MINUTES, FROM_MS, TO_MS)) as stream:
        async for page in stream:
            got[symbol] = got.get(symbol, 0) + len(page.bars)


class _CountedBody(httpx.AsyncByteStream):
    """A response body that counts when it starts being read."""

    def __init__(self, content: bytes, started: list[int]) -> None:
        self._content, self._started = content, started

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self._started.append(1)
        yield self._content


async def test_bodies_stay_unread_while_every_decoder_is_busy(
        mock_clock: trio.testing.MockClock) -> None:
    started: list[int] = []
    asked: list[str] = []

    def api(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        return httpx.Response(200, stream=_CountedBody(ONE_BAR_BODY, started))

    config = PolygonConfig(base_url="http://127.0.0.1:9", api_key=Secret(KEY),
                           requests_per_minute=0, max_in_flight=8)
    client = PolygonClient(config, EXACT, limiter=RateLimiter(0, max_in_flight=8),
                           transport=httpx.MockTransport(api))
    symbols = [f"S{i}" for i in range(8)]
    got: dict[str, int] = {}
    fetch = partial(_count_bars, client, got)

    busy = object()  # every decoding thread taken, as by pages still being decoded
    async with client:
        await polygon._DECODE_THREADS.acquire_on_behalf_of(busy)
        try:
            async with trio.open_nursery() as nursery:
                for symbol in symbols:
                    nursery.start_soon(fetch, symbol)
                for _ in range(20):  # the unlimited rate still spaces requests ~10 ms apart
                    await trio.testing.wait_all_tasks_blocked()
                    mock_clock.jump(0.05)
                await trio.testing.wait_all_tasks_blocked()
                assert len(asked) == 8  # every request was sent
                assert len(started) == BODIES_IN_MEMORY < 8  # the rest wait in the socket
                polygon._DECODE_THREADS.release_on_behalf_of(busy)
                busy = None
        finally:
            if busy is not None:
                polygon._DECODE_THREADS.release_on_behalf_of(busy)
    assert got == {symbol: 1 for symbol in symbols}
    assert len(started) == 8


async def test_waiting_for_a_busy_decoder_does_not_count_against_the_timeout(
        autojump_clock: trio.testing.MockClock) -> None:
    asked: list[float] = []

    def api(request: httpx.Request) -> httpx.Response:
        asked.append(trio.current_time())
        return httpx.Response(200, content=ONE_BAR_BODY)

    config = PolygonConfig(base_url="http://127.0.0.1:9", api_key=Secret(KEY),
                           requests_per_minute=0, max_in_flight=8, timeout_seconds=5.0)
    client = PolygonClient(config, EXACT, limiter=RateLimiter(0, max_in_flight=8),
                           transport=httpx.MockTransport(api))
    symbols = [f"S{i}" for i in range(8)]
    got: dict[str, int] = {}
    fetch = partial(_count_bars, client, got)

    busy = object()  # the decoder stays busy for 12 timeouts' worth of time
    async with client:
        await polygon._DECODE_THREADS.acquire_on_behalf_of(busy)
        try:
            async with trio.open_nursery() as nursery:
                for symbol in symbols:
                    nursery.start_soon(fetch, symbol)
                await trio.sleep(60)
                polygon._DECODE_THREADS.release_on_behalf_of(busy)
                busy = None
        finally:
            if busy is not None:
                polygon._DECODE_THREADS.release_on_behalf_of(busy)
    # every request answered at once and sent once: no attempt timed out (EXACT makes one)
    assert got == {symbol: 1 for symbol in symbols}
    assert len(asked) == 8 and max(asked) < 1
    assert client.statistics().total_requests == 8


class _DrippingBody(httpx.AsyncByteStream):
    """A body whose first byte comes, then nothing more: only our deadline ends it."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"{"
        await trio.sleep_forever()


async def test_a_dripping_body_still_times_out_once_its_slot_is_free(
        autojump_clock: trio.testing.MockClock) -> None:
    config = PolygonConfig(base_url="http://127.0.0.1:9", api_key=Secret(KEY),
                           requests_per_minute=0, timeout_seconds=5.0)
    client = PolygonClient(
        config, EXACT, limiter=RateLimiter(0, max_in_flight=4),
        transport=httpx.MockTransport(lambda request: httpx.Response(200, stream=_DrippingBody())))
    holders = [object() for _ in range(BODIES_IN_MEMORY)]  # every body slot taken for 60 s
    failed_at: list[float] = []

    async def fetch() -> None:
        with pytest.raises(ApiTransportError, match="no complete response within 5 s"):
            async with aclosing(client.pages("S0", FIVE_MINUTES, FROM_MS, TO_MS)) as stream:
                async for _ in stream:
                    raise AssertionError("no page can come")  # pragma: no cover
        failed_at.append(trio.current_time())

    async with client:
        for holder in holders:
            await client._bodies.acquire_on_behalf_of(holder)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch)
            await trio.sleep(60)
            for holder in holders:
                client._bodies.release_on_behalf_of(holder)
    assert failed_at == [pytest.approx(65.0)]  # 60 s waiting for a slot, then its 5 s
