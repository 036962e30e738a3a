"""The circuit breaker on trio's MockClock: when it opens, when it probes, when it closes, and
that a page rides out an outage without spending its retry attempts."""

from __future__ import annotations

from contextlib import aclosing
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from daemon.breaker import BreakerState, CircuitBreaker
from daemon.config import PolygonConfig, RetryConfig, Secret
from daemon.errors import ApiServerError, ApiUnavailable
from daemon.polygon import Page, PolygonClient
from daemon.ratelimit import RateLimiter

from .test_polygon import BASE, DAY, EXACT, FROM, KEY, TO, bars, ok, raw


async def test_opens_after_n_failures_and_probes_at_doubling_intervals(
        autojump_clock: trio.abc.Clock) -> None:
    breaker = CircuitBreaker(threshold=3, first_probe_seconds=5, max_probe_seconds=20)
    t0 = trio.current_time()
    for _ in range(2):
        breaker.failed(await breaker.admit())
    assert breaker.statistics().state is BreakerState.CLOSED
    breaker.succeeded(await breaker.admit())  # a success resets the count
    for _ in range(3):
        breaker.failed(await breaker.admit())
    stats = breaker.statistics()
    assert stats.state is BreakerState.OPEN and stats.open_since == t0 and stats.opened_total == 1
    probes = []
    for _ in range(4):
        ticket = await breaker.admit()
        assert ticket.probe
        probes.append(trio.current_time() - t0)
        breaker.failed(ticket)
    assert probes == [5, 15, 35, 55]  # +5, +10, +20, then capped at +20
    ticket = await breaker.admit()
    breaker.succeeded(ticket)
    stats = breaker.statistics()
    assert stats.state is BreakerState.CLOSED and stats.probes == 5
    assert stats.open_seconds_total == 75 and stats.open_since is None


async def test_one_probe_at_a_time_and_every_waiter_released_by_its_success(
        autojump_clock: trio.abc.Clock) -> None:
    breaker = CircuitBreaker(threshold=1, first_probe_seconds=5)
    breaker.failed(await breaker.admit())
    admitted: list[tuple[float, bool]] = []
    t0 = trio.current_time()

    async def request() -> None:
        ticket = await breaker.admit()
        admitted.append((trio.current_time() - t0, ticket.probe))
        if ticket.probe:
            await trio.sleep(1)  # the probe's round trip
            breaker.succeeded(ticket)

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(request)
        await trio.testing.wait_all_tasks_blocked()
        assert breaker.statistics().waiting == 10
    # one probe at t=5; the nine others go the moment it succeeds (t=6), none before
    assert admitted[0] == (5, True)
    assert sorted(admitted[1:]) == [(6, False)] * 9


async def test_a_cancelled_probe_gives_its_turn_back(autojump_clock: trio.abc.Clock) -> None:
    breaker = CircuitBreaker(threshold=1, first_probe_seconds=5)
    breaker.failed(await breaker.admit())
    ticket = await breaker.admit()
    assert ticket.probe and breaker.statistics().state is BreakerState.PROBING
    breaker.abandoned(ticket)
    before = trio.current_time()
    assert (await breaker.admit()).probe and trio.current_time() == before


async def test_give_up_after_and_close(autojump_clock: trio.abc.Clock) -> None:
    breaker = CircuitBreaker(threshold=1, first_probe_seconds=5, give_up_after=12)
    breaker.failed(await breaker.admit())
    t0 = trio.current_time()
    with pytest.raises(ApiUnavailable, match="unavailable for 12 s"):
        while True:
            breaker.failed(await breaker.admit())  # every probe fails
    assert trio.current_time() - t0 == 12
    other = CircuitBreaker(threshold=1)
    other.failed(await other.admit())
    async with trio.open_nursery() as nursery:
        async def wait() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await other.admit()

        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        other.close()


class Outage:
    """The API answers 503 from `start` for `seconds`, else a page of bars."""

    def __init__(self, start: float, seconds: float) -> None:
        self.start, self.end = start, start + seconds
        self.calls: list[tuple[float, int]] = []
        self.good = ok(bars(3))
        self.bad = raw(503, b"<html>503 Service Temporarily Unavailable</html>")

    def __call__(self, request: httpx.Request) -> httpx.Response:
        now = trio.current_time()
        down = self.start <= now < self.end
        self.calls.append((now, 503 if down else 200))
        return (self.bad if down else self.good)(request)


async def pages(client: PolygonClient) -> list[Page]:
    async with aclosing(client.pages("AAPL", DAY, FROM, TO)) as it:
        return [p async for p in it]


def client_for(api: Any, breaker: CircuitBreaker, retry: RetryConfig = EXACT) -> PolygonClient:
    config = PolygonConfig(base_url=BASE, api_key=Secret(KEY), requests_per_minute=0)
    return PolygonClient(config, retry, limiter=RateLimiter(0, max_in_flight=4),
                         breaker=breaker, transport=httpx.MockTransport(api))


async def test_a_page_rides_out_a_45_s_outage_with_a_few_probes(
        autojump_clock: trio.abc.Clock) -> None:
    t0 = trio.current_time()
    api = Outage(t0, 45)
    breaker = CircuitBreaker(threshold=5, first_probe_seconds=5, max_probe_seconds=60)
    async with client_for(api, breaker) as client:
        [page] = await pages(client)
    times = [(t - t0, status) for t, status in api.calls]
    # attempts at 0, 1, 3, 7 are charged (backoff 1, 2, 4); the 5th failure (t=15) opens the
    # circuit; probes at 20 and 30 fail, the one at 50 finds the API back
    assert times == [(0, 503), (1, 503), (3, 503), (7, 503), (15, 503), (20, 503), (30, 503),
                     (50, 200)]
    assert len(page.bars) == 3 and page.attempts == 8
    assert breaker.statistics().state is BreakerState.CLOSED


async def test_without_the_circuit_the_same_outage_fails_the_page(
        autojump_clock: trio.abc.Clock) -> None:
    t0 = trio.current_time()
    api = Outage(t0, 45)
    never_opens = CircuitBreaker(threshold=1000)
    async with client_for(api, never_opens) as client:
        with pytest.raises(ApiServerError, match="gave up after 5 attempts"):
            await pages(client)
    assert len(api.calls) == 5
