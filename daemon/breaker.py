"""The circuit breaker: one per API, shared by every job, so an outage waits instead of failing.

Without it, an API answering 503 for a minute makes every page spend its retry attempts in that
minute and fail, and the cycle loses the data it was fetching. With it:

    closed    requests go out; N consecutive transient failures (5xx, connect errors, timeouts,
              cut-off bodies; not 429, which the rate limiter owns) open it
    open      no request goes out; every caller of `admit()` waits. When the probe interval is
              up (5 s, doubling to 60 s), one caller is let through as the probe
    probing   that one request is in flight; its success closes the circuit and releases every
              waiter, its failure opens it again with the next, longer interval

Requests that wait here spend no retry attempt (the client charges a page's attempts only for
failures while the circuit is closed), so a page rides out an outage of any length. A request
already in flight when the circuit opened still counts: its success closes the circuit too
(the API is back), its failure changes nothing.

Any answer that proves the API is serving (a 4xx, a refused entitlement, a 429) counts as a
success here: the breaker is about reachability, not about what the answer says.

`give_up_after` (from `run --once --max-wait`) makes a caller that would wait past that many
seconds of continuous outage raise ApiUnavailable instead. `close()` (a stop) ends every wait
with trio.ClosedResourceError, like the rate limiter.

Everything reads `trio.current_time()`, so a MockClock test sees exact probe times.
"""

from __future__ import annotations

import enum

import attrs
import trio
from loguru import logger

from .errors import ApiUnavailable
from .timefmt import wall_clock

__all__ = ["BreakerState", "BreakerStatistics", "CircuitBreaker", "Ticket"]

# Consecutive transient failures that open the circuit, and the probe intervals.
DEFAULT_THRESHOLD = 5
DEFAULT_FIRST_PROBE_SECONDS = 5.0
DEFAULT_MAX_PROBE_SECONDS = 60.0


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    PROBING = "probing"


@attrs.frozen
class Ticket:
    """What `admit()` hands a request, to give back to `succeeded` / `failed`."""

    probe: bool


@attrs.frozen
class BreakerStatistics:
    """A snapshot for /status, /metrics, health and the STATUS= line.

    Attributes:
        state: closed / open / probing.
        consecutive_failures: Transient failures in a row (while closed).
        open_since: trio time the circuit opened (None while closed).
        opened_at: Unix seconds of that moment, for people.
        next_probe_at: trio time the next probe may go (None unless open).
        probes: Probes sent during the current (or last) outage.
        waiting: Requests waiting for the circuit to close.
        opened_total: Times the circuit opened since start.
        open_seconds_total: Seconds spent open since start (the current outage included).
    """

    state: BreakerState
    consecutive_failures: int
    open_since: float | None
    opened_at: float | None
    next_probe_at: float | None
    probes: int
    waiting: int
    opened_total: int
    open_seconds_total: float
    threshold: int


class CircuitBreaker:
    """See the module docstring. Thresholds can change live (`configure`)."""

    def __init__(self, *, threshold: int = DEFAULT_THRESHOLD,
                 first_probe_seconds: float = DEFAULT_FIRST_PROBE_SECONDS,
                 max_probe_seconds: float = DEFAULT_MAX_PROBE_SECONDS,
                 give_up_after: float | None = None) -> None:
        self._threshold = threshold
        self._first_probe = first_probe_seconds
        self._max_probe = max_probe_seconds
        self._give_up_after = give_up_after
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._open_since: float | None = None
        self._opened_at: float | None = None
        self._interval = first_probe_seconds
        self._next_probe: float | None = None
        self._probes = 0
        self._waiting = 0
        self._opened_total = 0
        self._open_seconds = 0.0
        self._closed = False
        self._changed = trio.Event()

    def configure(self, *, threshold: int, first_probe_seconds: float,
                  max_probe_seconds: float) -> None:
        """Live reload: new settings apply from the next failure or probe."""
        self._threshold = threshold
        self._first_probe = first_probe_seconds
        self._max_probe = max_probe_seconds

    def statistics(self) -> BreakerStatistics:
        open_seconds = self._open_seconds
        if self._open_since is not None:
            try:
                open_seconds += trio.current_time() - self._open_since
            except RuntimeError:  # read after trio.run (a summary): as of the last event
                pass
        return BreakerStatistics(
            state=self._state, consecutive_failures=self._failures,
            open_since=self._open_since, opened_at=self._opened_at,
            next_probe_at=self._next_probe if self._state is BreakerState.OPEN else None,
            probes=self._probes, waiting=self._waiting, opened_total=self._opened_total,
            open_seconds_total=open_seconds, threshold=self._threshold)

    @property
    def is_closed(self) -> bool:
        return self._state is BreakerState.CLOSED

    async def admit(self) -> Ticket:
        """Return when a request may go out: at once while closed; while open, when the
        circuit closes or this caller is chosen as the probe.

        Error handling: trio.ClosedResourceError after `close()`; ApiUnavailable when the
        outage has lasted `give_up_after` seconds.
        """
        if self._closed:
            raise trio.ClosedResourceError("the circuit breaker is closed (stopping)")
        if self._state is BreakerState.CLOSED:
            return Ticket(probe=False)
        self._waiting += 1
        try:
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("the circuit breaker is closed (stopping)")
                now = trio.current_time()
                if self.is_closed:  # (a property: the state changes while we wait)
                    return Ticket(probe=False)
                if (self._state is BreakerState.OPEN and self._next_probe is not None
                        and now >= self._next_probe):
                    self._state = BreakerState.PROBING
                    self._probes += 1
                    logger.info("API circuit open for {:.0f} s: probe {}",
                                now - (self._open_since or now), self._probes)
                    return Ticket(probe=True)
                deadline = self._next_probe if self._state is BreakerState.OPEN else None
                if self._give_up_after is not None and self._open_since is not None:
                    limit = self._open_since + self._give_up_after
                    if now >= limit:
                        raise ApiUnavailable(
                            f"the API has been unavailable for {now - self._open_since:.0f} s "
                            f"(circuit open; --max-wait {self._give_up_after:g} s)")
                    deadline = limit if deadline is None else min(deadline, limit)
                changed = self._changed
                with trio.move_on_at(deadline if deadline is not None else float("inf")):
                    await changed.wait()
        finally:
            self._waiting -= 1

    def succeeded(self, ticket: Ticket) -> None:
        """The API answered (whatever it said): close the circuit if it was open."""
        self._failures = 0
        if self._state is not BreakerState.CLOSED:
            now = trio.current_time()
            assert self._open_since is not None
            logger.info("API circuit closed after {:.0f} s and {} probe(s): work resumes",
                        now - self._open_since, self._probes)
            self._open_seconds += now - self._open_since
            self._state = BreakerState.CLOSED
            self._open_since = None
            self._next_probe = None
            self._interval = self._first_probe
            self._notify()

    def failed(self, ticket: Ticket) -> None:
        """A transient failure (not 429): count it; open the circuit, or reopen after a probe."""
        now = trio.current_time()
        if ticket.probe:
            self._interval = min(self._interval * 2, self._max_probe)
            self._state = BreakerState.OPEN
            self._next_probe = now + self._interval
            self._notify()
            return
        if self._state is not BreakerState.CLOSED:
            return  # in flight before it opened: the outage is already known
        self._failures += 1
        if self._failures >= self._threshold:
            self._state = BreakerState.OPEN
            self._open_since = now
            self._opened_at = wall_clock()
            self._opened_total += 1
            self._probes = 0
            self._interval = self._first_probe
            self._next_probe = now + self._interval
            logger.warning("API circuit open after {} consecutive failures: requests wait, a "
                           "probe goes out in {:g} s", self._failures, self._interval)
            self._notify()

    def abandoned(self, ticket: Ticket) -> None:
        """The request never got an answer (cancelled, or refused by the rate limiter): a probe
        slot goes back so another caller can probe at once."""
        if ticket.probe and self._state is BreakerState.PROBING:
            self._state = BreakerState.OPEN
            self._next_probe = trio.current_time()
            self._notify()

    def close(self) -> None:
        """A stop: every wait ends with trio.ClosedResourceError. Idempotent."""
        self._closed = True
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
