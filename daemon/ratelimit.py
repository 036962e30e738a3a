"""The API budget: one token bucket per API key, shared by every task, on trio time.

The API counts requests over a sliding minute, so the bucket holds one token (no bursts: a burst
spends next minute's budget now and earns 429s later) and refills every `60 / rate` seconds.
Tasks take tokens strictly in arrival order (a FIFO lock in front of the bucket), so a job that
has waited longest goes next and no symbol starves.

Tokens bound the *rate*; a global `trio.CapacityLimiter(max_in_flight)` bounds the requests in
flight. Both are needed: at 150 req/min and 2-4 s per page a request must be in flight about
every 0.4 s, so ~10 overlap; the cap keeps a slow API from piling up connections. A request takes
its slot first and its token second, so it is sent the moment it gets the token and the spacing
the bucket enforces is the spacing the API sees.

Adaptive: a 429 means the whole key is over budget (another process, a smaller plan than
configured, the vendor's own accounting), so `on_rate_limited` slows the bucket for everyone and,
when the server said `Retry-After`, holds every token until then. Successes then give the rate
back step by step (additive increase, multiplicative decrease, as in TCP).

Stopping: `close()` refuses every request not yet granted (those waiting for a slot or a token,
and any later one) with `trio.ClosedResourceError`, while granted ones run to their end; a
retry's backoff sleeping in `sleep()` ends at once the same way. That is
how a graceful stop starts no new request yet lets the pages in flight land.

Everything reads `trio.current_time()` and sleeps with trio, so a `MockClock` test sees exact
schedules.
"""

from __future__ import annotations

import collections
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio
from loguru import logger

from .budget import SharedBudget

__all__ = ["Grant", "RateLimiter", "RateLimiterStatistics"]

# A 429 multiplies the effective rate by SLOWDOWN, but never below FLOOR x the configured rate:
# the vendor's limit is rarely below a tenth of the plan, and a floor keeps recovery short.
SLOWDOWN = 0.8
FLOOR = 0.1
# "Unlimited" plans still must stay under ~100 req/s (the vendor's fair-use ceiling): with
# requests_per_minute = 0 tokens are spaced at this rate, never faster.
UNLIMITED_CEILING_PER_MINUTE = 6000.0
# Each success adds RECOVERY x the configured rate back (additive increase): ~5 successes undo
# one 429, 18 climb back from the floor. Slower than the slowdown, so 429s stay rare.
RECOVERY = 0.05


@attrs.frozen
class RateLimiterStatistics:
    """A snapshot for /status and /metrics.

    Attributes:
        configured_per_minute: The rate from the config; 0 means unlimited.
        effective_per_minute: The rate in force after 429 slowdowns; 0 means unlimited.
        in_flight: Requests holding a token and a slot (being sent or awaiting a response).
        waiting: Requests waiting for a slot or a token.
        paused_until: trio time until which a Retry-After holds every token, or None.
        total_granted: Tokens granted since start.
        max_in_flight: The in-flight cap in force.
    """

    configured_per_minute: float
    effective_per_minute: float
    in_flight: int
    waiting: int
    paused_until: float | None
    total_granted: int
    max_in_flight: int = 0


@attrs.frozen
class Grant:
    """What `RateLimiter.request()` hands the caller: which token it got, and when.

    Passing it back to `on_rate_limited` / `on_success` lets the limiter tell news from echoes:
    the requests already in flight when the rate was cut were sent under the old rate, and their
    429s must not cut it again (ten of them would drive it straight to the floor).

    Attributes:
        number: The token's serial number (1 for the first granted by this limiter).
        granted_at: trio time of the grant.
    """

    number: int
    granted_at: float


# The next shared batch is asked for once this batch's last slot is no more than this many
# database round trips away.
AHEAD_TRIPS = 2.0


class RateLimiter:
    """A shared, FIFO-fair, adaptive token bucket plus a global in-flight cap.

    Args:
        requests_per_minute: The key's budget; 0 means "unlimited" (the API's own ceiling,
            UNLIMITED_CEILING_PER_MINUTE, still spaces the tokens; the in-flight
            cap and Retry-After pauses still apply).
        max_in_flight: Requests in flight at once across all tasks.

    Error handling: raises ValueError for a negative rate or a cap below 1, here and in
    `set_rate` / `set_max_in_flight` (the config checks these first). Cancellation while waiting
    gives back the slot and takes no token.
    """

    def __init__(self, requests_per_minute: float, *, max_in_flight: int,
                 shared: SharedBudget | None = None) -> None:
        # With `shared` (daemon.budget), tokens come from the key's bucket in PostgreSQL, so
        # every instance using the key spends one budget; without, from this process's clock.
        self._shared = shared
        self._reserved: collections.deque[float] = collections.deque()
        # Set when the batch asked for ahead (while the last reserved slot is waited for) has
        # landed; None when none is in flight.
        self._ahead: trio.Event | None = None
        self._rate_changes = 0  # a batch reserved before a change of rate is dropped
        self._round_trip = 0.0  # how long the last batch took to arrive (trio seconds)
        self._report = [0, 0, 0.0]  # slowdowns, successes, Retry-After since the last batch
        self._configured = _check_rate(requests_per_minute)
        self._effective = self._configured
        self._slots = trio.CapacityLimiter(_check_cap(max_in_flight))
        # The queue for tokens: whoever holds it is next and sleeps until its token is due.
        self._turn = trio.StrictFIFOLock()
        self._last_grant = -math.inf  # when the last token was due (see _take_token)
        self._paused_until = -math.inf
        # Tokens granted when the rate was last cut: requests holding those are echoes.
        self._slowed_after = 0
        # Set (and replaced) whenever a token may come due earlier than the holder computed.
        self._changed = trio.Event()
        self._in_flight = 0
        self._waiting = 0
        self._granted = 0
        self._closed = False
        self._waiters: set[trio.CancelScope] = set()  # one per request not yet granted

    @asynccontextmanager
    async def request(self) -> AsyncIterator[Grant]:
        """Wait for an in-flight slot, then for a token; hold the slot until the block exits.

        Use one `async with limiter.request() as grant:` around each HTTP attempt (not around a
        retry's backoff sleep, which would hold a slot idle), and pass `grant` to
        `on_rate_limited` / `on_success` when the answer comes.
        """
        if self._closed:
            raise trio.ClosedResourceError("the rate limiter is closed (stopping)")
        # Not the task: CapacityLimiter refuses a second slot to one borrower, and a task may
        # well have two requests open (a test, a probe inside a job).
        borrower = object()
        self._waiting += 1
        waiting = trio.CancelScope()  # cancelled by close()
        self._waiters.add(waiting)
        try:
            with waiting:
                await self._slots.acquire_on_behalf_of(borrower)
                try:
                    grant = await self._take_token()
                except BaseException:
                    self._slots.release_on_behalf_of(borrower)
                    raise
        finally:
            self._waiting -= 1
            self._waiters.discard(waiting)
        if waiting.cancelled_caught:
            raise trio.ClosedResourceError("the rate limiter is closed (stopping)")
        self._in_flight += 1
        try:
            yield grant
        finally:
            self._in_flight -= 1
            self._slots.release_on_behalf_of(borrower)

    async def _take_token(self) -> Grant:
        async with self._turn:
            while True:
                if self._shared is not None and not self._reserved:
                    if self._ahead is not None:
                        await self._ahead.wait()
                        continue  # landed (or failed: then asked for here)
                    await self._reserve()
                elif (self._shared is not None and self._ahead is None and self._waiting > 1
                      and self._reserved[-1] - trio.current_time()
                      <= AHEAD_TRIPS * self._round_trip):
                    self._reserve_ahead()
                now = trio.current_time()
                due = self._token_due()
                if due <= now:
                    break
                changed = self._changed
                with trio.move_on_at(due):
                    await changed.wait()
            if self._reserved:
                self._reserved.popleft()
            # A token handed out late by less than one spacing (this task woke late: the
            # event loop or the CPU was busy) keeps the schedule: the next one is due a
            # spacing after this one was due, not after it was handed out, or every late
            # wake-up would lower the rate for good (measured in the demo: 23.5 of 25 req/s).
            # Tokens are still due a spacing apart, so a window of the API's minute holds at
            # most one more than a strict bucket's; a bucket nobody asked for a spacing or more
            # starts afresh, saving nothing up.
            self._last_grant = due if now - due < self._spacing() else now
            self._granted += 1
            return Grant(self._granted, now)

    def _reserve_ahead(self) -> None:
        """Ask for the next batch in the background while this one's last slots are waited
        for (those within AHEAD_TRIPS round trips). Asked for only once the slots ran out, a
        batch starts a database round trip after the bucket's pointer, which has passed by the
        time it arrives when the trip is slower than a slot (measured in the demo: 228 of 583
        batches late, 18 of 25 req/s); asked for ahead, it follows on from this batch's last
        slot."""
        landed = self._ahead = trio.Event()
        trio.lowlevel.spawn_system_task(self._reserve_in_background, landed,
                                        name="backfilld.ratelimit.reserve_ahead")

    async def _reserve_in_background(self, landed: trio.Event) -> None:
        try:
            await self._reserve()
        except Exception as exc:  # noqa: BLE001 - a system task must not raise; asked again
            logger.warning("reserving API budget ahead failed (asked again when needed): {}",
                           exc)
        finally:
            self._ahead = None
            landed.set()

    async def _reserve(self) -> None:
        """Take the next batch of send times from the shared bucket (daemon.budget)."""
        assert self._shared is not None
        changes, asked = self._rate_changes, trio.current_time()
        configured = self._configured or UNLIMITED_CEILING_PER_MINUTE
        slowdowns, successes, retry_after = self._report
        self._report = [0, 0, 0.0]
        reservation = await self._shared.reserve(
            self._shared.batch(self._effective or configured, self._waiting),
            configured_per_minute=configured, slowdowns=int(slowdowns),
            successes=int(successes), retry_after=float(retry_after))
        self._round_trip = trio.current_time() - asked
        if changes != self._rate_changes:
            return  # reserved under the old rate (a 429 meanwhile): the next batch is slower
        if self._configured > 0:
            self._effective = reservation.effective_per_minute
        self._reserved.extend(reservation.times())

    def _token_due(self) -> float:
        due = self._paused_until
        if self._reserved:  # the shared bucket decided the spacing
            return max(due, self._reserved[0])
        return max(due, self._last_grant + self._spacing())

    def _spacing(self) -> float:
        rate = self._effective if self._effective > 0 else UNLIMITED_CEILING_PER_MINUTE
        return 60.0 / rate

    def _notify(self) -> None:
        """Wake the task at the head of the queue to recompute when its token is due."""
        self._changed.set()
        self._changed = trio.Event()

    def on_rate_limited(self, retry_after: float | None, *, grant: Grant | None = None) -> None:
        """Record a 429: slow the bucket, and hold every token for `retry_after` seconds if given.

        Args:
            retry_after: The server's Retry-After in seconds, or None.
            grant: The `Grant` of the request that got the 429. A request granted before the
                last slowdown was sent under the old rate: its Retry-After still pauses the
                bucket, but it does not slow it again. None always slows.
        """
        now = trio.current_time()
        if self._configured > 0 and not self._is_echo(grant):
            self._effective = max(self._effective * SLOWDOWN, self._configured * FLOOR)
            self._slowed_after = self._granted
            self._report[0] += 1
            self._reserved.clear()  # reserved under the old rate: the next batch is slower
            self._rate_changes += 1
        if retry_after is not None and retry_after > 0:
            self._paused_until = max(self._paused_until, now + retry_after)
            self._report[2] = max(float(self._report[2]), retry_after)

    def on_success(self, *, grant: Grant | None = None) -> None:
        """Record an accepted request: give back RECOVERY x the configured rate, up to it.

        A request granted before the last slowdown (see `on_rate_limited`) says nothing about
        the new rate and gives nothing back.
        """
        if self._effective >= self._configured:
            return
        if self._is_echo(grant):
            return
        self._effective = min(self._configured, self._effective + RECOVERY * self._configured)
        self._report[1] += 1
        self._notify()

    def _is_echo(self, grant: Grant | None) -> bool:
        return grant is not None and grant.number <= self._slowed_after

    def close(self) -> None:
        """Grant nothing more: waiting and later requests raise trio.ClosedResourceError.

        Requests already granted are not touched. Idempotent; there is no reopening.
        """
        self._closed = True
        for scope in self._waiters:
            scope.cancel()

    @property
    def closed(self) -> bool:
        return self._closed

    async def sleep(self, seconds: float) -> None:
        """`trio.sleep` for a retry's backoff that a `close()` ends at once.

        Error handling: raises trio.ClosedResourceError when the limiter is or becomes closed:
        the retry it waits for would be refused anyway.
        """
        if self._closed:
            raise trio.ClosedResourceError("the rate limiter is closed (stopping)")
        waiting = trio.CancelScope()
        self._waiters.add(waiting)
        try:
            with waiting:
                await trio.sleep(seconds)
        finally:
            self._waiters.discard(waiting)
        if waiting.cancelled_caught:
            raise trio.ClosedResourceError("the rate limiter is closed (stopping)")

    def set_rate(self, requests_per_minute: float) -> None:
        """Live reload: a new configured rate, in force at once (any slowdown is forgotten)."""
        self._configured = _check_rate(requests_per_minute)
        self._effective = self._configured
        self._notify()

    def set_max_in_flight(self, max_in_flight: int) -> None:
        """Live reload: a new in-flight cap. Lowering it lets current requests finish first."""
        self._slots.total_tokens = _check_cap(max_in_flight)

    def statistics(self) -> RateLimiterStatistics:
        try:
            now = trio.current_time()
        except RuntimeError:  # outside trio (a summary printed after trio.run): report as is
            now = -math.inf
        paused = self._paused_until if self._paused_until > now else None
        return RateLimiterStatistics(
            configured_per_minute=self._configured,
            effective_per_minute=self._effective,
            in_flight=self._in_flight,
            waiting=self._waiting,
            paused_until=paused,
            total_granted=self._granted,
            max_in_flight=int(self._slots.total_tokens),
        )


def _check_rate(requests_per_minute: float) -> float:
    rate = float(requests_per_minute)
    if not (math.isfinite(rate) and rate >= 0):
        raise ValueError(f"requests_per_minute must be 0 (unlimited) or positive, not {rate}")
    return rate


def _check_cap(max_in_flight: int) -> int:
    if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
        raise ValueError(f"max_in_flight must be a whole number >= 1, not {max_in_flight!r}")
    return max_in_flight
