"""RateLimiter on a MockClock (autojump): token spacing, fairness, pauses and caps, exactly."""

from __future__ import annotations

import pytest
import trio
import trio.lowlevel
import trio.testing

from daemon.budget import Reservation, SharedBudget
from daemon.ratelimit import FLOOR, RateLimiter, RateLimiterStatistics


def _rounded(times: list[float]) -> list[float]:
    # Grants land on sums of 0.4 s steps: round off the float noise (1.2000000000000002).
    return [round(t, 9) for t in times]


async def _take(limiter: RateLimiter, times: list[float], hold: float = 0.0) -> None:
    async with limiter.request():
        times.append(trio.current_time())
        await trio.sleep(hold)


async def test_150_per_minute_spaces_ten_tasks_exactly_0_4_s(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = RateLimiter(150, max_in_flight=16)
    times: list[float] = []
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(_take, limiter, times)
    assert _rounded(times) == [0.0, 0.4, 0.8, 1.2, 1.6, 2.0, 2.4, 2.8, 3.2, 3.6]
    assert limiter.statistics().total_granted == 10


async def test_tokens_go_in_arrival_order(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(60, max_in_flight=16)
    order: list[int] = []

    async def arrive(i: int) -> None:
        await trio.sleep(0.01 * i)  # arrive at 0.00, 0.01, ... while the bucket is busy
        async with limiter.request():
            order.append(i)

    async with trio.open_nursery() as nursery:
        for i in reversed(range(8)):  # spawned in the opposite order on purpose
            nursery.start_soon(arrive, i)
    assert order == list(range(8))


async def test_idle_bucket_holds_one_token_not_a_burst(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = RateLimiter(60, max_in_flight=16)
    times: list[float] = []
    await _take(limiter, times)
    await trio.sleep(10)  # idle for ten intervals: still only one token saved
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(_take, limiter, times)
    assert _rounded(times) == [0.0, 10.0, 11.0, 12.0]


async def test_late_wake_ups_keep_the_schedule_and_never_burst(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A busy event loop (here: 7 ms pass at every scheduling point) wakes the task due a
    token late. The tokens keep their 40 ms schedule instead of drifting by each wake-up's
    lateness (the strict bucket gave 220 in 10 s here), no token comes before its place on
    that schedule, and no second holds more than 25 + 1 of them."""
    limiter = RateLimiter(1500, max_in_flight=16)
    times: list[float] = []

    async def busy_loop() -> None:
        while trio.current_time() < 10.0:
            await trio.lowlevel.checkpoint()
            autojump_clock.jump(0.007)

    async def requester() -> None:
        while trio.current_time() < 10.0:
            await _take(limiter, times)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(busy_loop)
        nursery.start_soon(requester)
    assert 249 <= len(times) <= 252
    assert all(t >= times[0] + k * 0.04 - 1e-9 for k, t in enumerate(times))
    for start in [i * 0.1 for i in range(90)]:
        assert sum(start <= t < start + 1.0 for t in times) <= 26


async def test_zero_means_no_budget_of_ours(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(0, max_in_flight=100)
    times: list[float] = []
    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(_take, limiter, times)
    # only the API's own ceiling (100 req/s) spaces them
    assert times == pytest.approx([i * 0.01 for i in range(50)])
    stats = limiter.statistics()
    assert stats.configured_per_minute == 0 and stats.effective_per_minute == 0


async def test_unlimited_still_caps_in_flight(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(0, max_in_flight=3)
    times: list[float] = []
    async with trio.open_nursery() as nursery:
        for _ in range(7):
            nursery.start_soon(_take, limiter, times, 1.0)
    assert times == pytest.approx([0.0, 0.01, 0.02, 1.0, 1.01, 1.02, 2.0])


async def test_in_flight_cap_with_a_rate(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(600, max_in_flight=2)  # a token every 0.1 s, requests last 1 s
    times: list[float] = []
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            stats = limiter.statistics()
            peak = max(peak, stats.in_flight)
            assert stats.in_flight + stats.waiting <= 6
            await trio.sleep(0.05)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        async with trio.open_nursery() as workers:
            for _ in range(6):
                workers.start_soon(_take, limiter, times, 1.0)
        nursery.cancel_scope.cancel()
    # The second of each pair waits for its token, not for a slot.
    assert _rounded(times) == [0.0, 0.1, 1.0, 1.1, 2.0, 2.1]
    assert peak == 2
    assert limiter.statistics().in_flight == 0


async def test_retry_after_pauses_every_task(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(60, max_in_flight=16)
    times: list[float] = []
    await _take(limiter, times)
    await trio.sleep(0.5)
    limiter.on_rate_limited(5.0)  # the key is over budget until 5.5
    assert limiter.statistics().paused_until == 5.5
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(_take, limiter, times)
        await trio.sleep(1)
        assert limiter.statistics().waiting == 3
    # One token at the end of the pause, then the slowed rate: 60 x 0.8 = 48/min, 1.25 s.
    assert _rounded(times) == [0.0, 5.5, 6.75, 8.0]
    assert limiter.statistics().paused_until is None


async def test_later_retry_after_extends_pause_earlier_does_not_shorten(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = RateLimiter(0, max_in_flight=16)
    limiter.on_rate_limited(10.0)
    limiter.on_rate_limited(3.0)
    assert limiter.statistics().paused_until == 10.0
    times: list[float] = []
    await _take(limiter, times)
    assert times == [10.0]


async def test_429_slows_down_to_a_floor_and_successes_recover(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = RateLimiter(100, max_in_flight=16)
    rates = []
    for _ in range(12):
        limiter.on_rate_limited(None)
        rates.append(round(limiter.statistics().effective_per_minute, 6))
    assert rates[:3] == [80.0, 64.0, 51.2]
    assert rates[-1] == 100 * FLOOR and min(rates) == 10.0
    recovered = []
    for _ in range(20):
        limiter.on_success()
        recovered.append(round(limiter.statistics().effective_per_minute, 6))
    assert recovered[:3] == [15.0, 20.0, 25.0]
    assert recovered[-3:] == [100.0, 100.0, 100.0]  # never above the configured rate


async def test_slowed_rate_spaces_tokens_wider(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(60, max_in_flight=16)
    limiter.on_rate_limited(None)  # 48/min: 1.25 s
    times: list[float] = []
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(_take, limiter, times)
    assert _rounded(times) == [0.0, 1.25, 2.5]


async def test_echoes_of_one_overload_slow_down_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = RateLimiter(100, max_in_flight=16)
    grants = []
    for _ in range(5):
        async with limiter.request() as grant:
            grants.append(grant)
    assert [g.number for g in grants] == [1, 2, 3, 4, 5]
    assert _rounded([g.granted_at for g in grants]) == [0.0, 0.6, 1.2, 1.8, 2.4]
    # All five were sent before the first 429 came back: they count as one overload.
    for grant in grants:
        limiter.on_rate_limited(None, grant=grant)
    assert limiter.statistics().effective_per_minute == 80.0
    # Their successes say nothing about the new rate either; a fresh request's do.
    limiter.on_success(grant=grants[-1])
    assert limiter.statistics().effective_per_minute == 80.0
    async with limiter.request() as fresh:
        pass
    limiter.on_success(grant=fresh)
    assert limiter.statistics().effective_per_minute == 85.0
    limiter.on_rate_limited(None, grant=fresh)
    assert limiter.statistics().effective_per_minute == 68.0


async def test_set_rate_wakes_a_waiting_task(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(1, max_in_flight=16)  # one a minute
    times: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_take, limiter, times)
        nursery.start_soon(_take, limiter, times)
        await trio.sleep(2)
        limiter.set_rate(600)  # reload: the waiter goes now, not at 60 s
    assert _rounded(times) == [0.0, 2.0]
    assert limiter.statistics().configured_per_minute == 600


async def test_recovery_wakes_a_waiting_task(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(60, max_in_flight=16)
    for _ in range(20):
        limiter.on_rate_limited(None)  # floor: 6/min, 10 s
    times: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_take, limiter, times)
        nursery.start_soon(_take, limiter, times)
        await trio.sleep(2)
        for _ in range(18):
            limiter.on_success()  # back to 60/min: 1 s, already due
    assert _rounded(times) == [0.0, 2.0]


async def test_set_max_in_flight_live(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(0, max_in_flight=1)
    times: list[float] = []
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(_take, limiter, times, 1.0)
        await trio.sleep(0.5)
        limiter.set_max_in_flight(3)
    assert times == pytest.approx([0.0, 0.5, 0.51, 1.0])


async def test_cancelled_waiter_gives_back_its_slot_and_takes_no_token(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = RateLimiter(60, max_in_flight=2)
    times: list[float] = []
    await _take(limiter, times)
    with trio.move_on_after(0.5):
        await _take(limiter, times)  # its token is due at 1.0
    stats = limiter.statistics()
    assert (stats.in_flight, stats.waiting, stats.total_granted) == (0, 0, 1)
    await _take(limiter, times)
    assert times == [0.0, 1.0]


async def test_statistics_is_a_frozen_snapshot(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(150, max_in_flight=4)
    stats = limiter.statistics()
    assert stats == RateLimiterStatistics(
        configured_per_minute=150.0,
        effective_per_minute=150.0,
        in_flight=0,
        waiting=0,
        paused_until=None,
        total_granted=0,
        max_in_flight=4,
    )
    with pytest.raises(AttributeError):
        stats.in_flight = 3  # type: ignore[misc]


def test_statistics_outside_trio() -> None:
    assert RateLimiter(5, max_in_flight=1).statistics().paused_until is None


@pytest.mark.parametrize(
    ("rate", "cap"), [(-1, 1), (float("nan"), 1), (float("inf"), 1), (10, 0), (10, True)]
)
def test_bad_arguments(rate: float, cap: int) -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate, max_in_flight=cap)


async def test_close_refuses_waiting_and_later_requests_not_granted_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # 60/min: tokens at 0, 1, 2, ...; one request in flight holds its slot for 5 s.
    limiter = RateLimiter(60, max_in_flight=16)
    outcomes: dict[int, str] = {}

    async def request(i: int) -> None:
        await trio.sleep(0.01 * i)  # arrive in order
        try:
            async with limiter.request():
                await trio.sleep(5)
                outcomes[i] = f"done at {trio.current_time():g}"
        except trio.ClosedResourceError:
            outcomes[i] = f"refused at {trio.current_time():g}"

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(request, i)
        await trio.sleep(1.5)  # #0 granted at 0, #1 at 1, #2 waits for its token at 2
        limiter.close()
        assert limiter.closed
    assert outcomes == {0: "done at 5", 1: "done at 6", 2: "refused at 1.5"}
    with pytest.raises(trio.ClosedResourceError):
        async with limiter.request():
            pass  # pragma: no cover
    stats = limiter.statistics()
    assert (stats.in_flight, stats.waiting, stats.total_granted) == (0, 0, 2)


async def test_close_refuses_requests_waiting_for_a_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = RateLimiter(0, max_in_flight=1)
    outcomes: list[str] = []

    async def request() -> None:
        try:
            async with limiter.request():
                await trio.sleep(2)
                outcomes.append("done")
        except trio.ClosedResourceError:
            outcomes.append("refused")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request)
        nursery.start_soon(request)
        await trio.sleep(1)
        limiter.close()
    assert sorted(outcomes) == ["done", "refused"]
    # the refused request gave its place back: nothing is left borrowed
    assert limiter._slots.borrowed_tokens == 0


async def test_unlimited_keeps_the_apis_own_ceiling(autojump_clock: trio.testing.MockClock
                                                    ) -> None:
    # requests_per_minute = 0 is "unlimited" on our side, never faster than ~100 req/s
    limiter = RateLimiter(0, max_in_flight=50)
    times: list[float] = []
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(_take, limiter, times)
    assert times == pytest.approx([0.0, 0.01, 0.02, 0.03, 0.04])
    assert limiter.statistics().configured_per_minute == 0


class _RoundTripBudget:
    """The shared bucket's arithmetic (daemon.budget's _RESERVE: the first slot is the later of
    the pointer and now, then the pointer moves `count` spacings on) with a database round trip
    of `trip` seconds before the answer: the database itself is tested in test_leases."""

    def __init__(self, trip: float) -> None:
        self.trip = trip
        self.next_slot = -float("inf")
        self.reservations = 0

    def batch(self, effective_per_minute: float, waiting: int) -> int:
        return SharedBudget.batch(self, effective_per_minute, waiting)  # type: ignore[arg-type]

    async def reserve(self, count: int, *, configured_per_minute: float, slowdowns: int,
                      successes: int, retry_after: float) -> Reservation:
        await trio.sleep(self.trip / 2)  # the statement reaches the server
        spacing = 60.0 / configured_per_minute
        now = trio.current_time()
        first = max(self.next_slot, now)
        self.next_slot = first + count * spacing
        self.reservations += 1
        await trio.sleep(self.trip / 2)  # the answer comes back
        # as SharedBudget maps the server's slot to this process: its delay from "now" there
        return Reservation(trio.current_time() + (first - now), spacing, count,
                           configured_per_minute)


async def test_the_shared_budget_loses_no_slot_to_its_round_trips(
        autojump_clock: trio.testing.MockClock) -> None:
    """At 1,500 req/min (a slot every 40 ms) with a 100 ms round trip per batch, 16 tasks get
    every slot: the next batch is asked for while this one's last slots are waited for, so it
    follows on from them. Asked for only once the slots ran out, each batch started late
    (18.9 s instead of 15.96 here)."""
    budget = _RoundTripBudget(trip=0.1)
    limiter = RateLimiter(1500, max_in_flight=16, shared=budget)  # type: ignore[arg-type]
    times: list[float] = []

    async def worker() -> None:
        for _ in range(25):
            await _take(limiter, times, hold=0.3)

    async with trio.open_nursery() as nursery:
        for _ in range(16):
            nursery.start_soon(worker)
    assert len(times) == 400 and budget.reservations > 1
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert min(gaps) >= 0.04 - 1e-9  # never faster than the budget
    # 400 slots 40 ms apart (the first at 0), plus the first batch's round trip
    assert times[-1] - times[0] <= 399 * 0.04 + 1e-6
