"""The one retry mechanism: tenacity, driven by the exception tree's own `transient` flag.

Everything that can fail for a while and then work again goes through here: an HTTP attempt
(daemon.polygon), reaching PostgreSQL (migrations, readers, the features task) and the writer's
transactions. What is retried is decided by `daemon.errors` (`BackfilldError.transient`), not
by each caller; how long to wait is an exponential backoff, or what the server asked for.

Time is trio's: tenacity sleeps with the `sleep` given (trio.sleep by default, or the rate
limiter's closable sleep), and a bound on total time is measured with `trio.current_time()`, so
MockClock tests see exact schedules. (tenacity's own `stop_after_delay` reads the real monotonic
clock, which MockClock does not move.) `trio.Cancelled` is a BaseException and is never retried.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio
from loguru import logger
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception
from tenacity.stop import stop_after_attempt, stop_base, stop_never

from .errors import BackfilldError, DatabaseUnavailable

__all__ = [
    "DB_MAX_SECONDS",
    "DB_MIN_SECONDS",
    "Backoff",
    "is_transient",
    "retrying",
    "when_available",
]

T = TypeVar("T")

# Backoff while the database is unreachable: a restart or failover is over in seconds, and 30 s
# between tries is quick enough to notice it back without flooding the log.
DB_MIN_SECONDS = 0.5
DB_MAX_SECONDS = 30.0


def is_transient(exc: BaseException) -> bool:
    """True for our errors that a later attempt can fix (see daemon.errors)."""
    return isinstance(exc, BackfilldError) and exc.transient


class Backoff:
    """`min * 2**(n-1)` capped at `max` after the n-th failure, plus up to `jitter` x of it.

    A jitter spreads tasks failed by the same outage so they do not come back in lockstep;
    `jitter = 0` gives exact waits (what the MockClock tests assert).
    """

    def __init__(self, min_seconds: float, max_seconds: float, *, jitter: float = 0.0,
                 uniform: Callable[[float, float], float] = random.uniform) -> None:
        self.min_seconds = min_seconds
        self.max_seconds = max_seconds
        self.jitter = jitter
        self._uniform = uniform

    def __call__(self, failures: int) -> float:
        base = min(self.max_seconds, self.min_seconds * 2.0 ** max(failures - 1, 0))
        if self.jitter > 0 and base > 0:
            base += self._uniform(0.0, self.jitter * base)
        return base


class _stop_at_trio_deadline(stop_base):  # noqa: N801 - tenacity's naming
    """Stop when the next sleep would end past `deadline` (trio time)."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> bool:
        return trio.current_time() + (retry_state.upcoming_sleep or 0.0) > self.deadline


class _stop_when(stop_base):  # noqa: N801 - tenacity's naming
    def __init__(self, predicate: Callable[[RetryCallState], bool]) -> None:
        self.predicate = predicate

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.predicate(retry_state)


def retrying(
    *,
    wait: Callable[[RetryCallState], float],
    attempts: int | None = None,
    give_up_after: float | None = None,
    stop: Callable[[RetryCallState], bool] | None = None,
    sleep: Callable[[float], Awaitable[None]] = trio.sleep,
    before_sleep: Callable[[RetryCallState], None] | None = None,
    retry_on: Callable[[BaseException], bool] = is_transient,
) -> AsyncRetrying:
    """An `AsyncRetrying` that retries transient errors: at most `attempts` attempts and/or
    until `give_up_after` seconds (trio time) from now, and/or until `stop(state)` says so;
    none given: forever.

    The last error is re-raised as it came (`reraise=True`), never a tenacity RetryError.
    """
    rules: list[stop_base] = []
    if attempts is not None:
        rules.append(stop_after_attempt(attempts))
    if give_up_after is not None:
        rules.append(_stop_at_trio_deadline(trio.current_time() + give_up_after))
    if stop is not None:
        rules.append(_stop_when(stop))
    combined: stop_base = stop_never
    for rule in rules:
        combined = rule if combined is stop_never else combined | rule
    return AsyncRetrying(
        sleep=sleep,
        stop=combined,
        wait=wait,
        retry=retry_if_exception(retry_on),
        before_sleep=before_sleep,
        reraise=True,
    )


def _database_wait(state: RetryCallState) -> float:
    return Backoff(DB_MIN_SECONDS, DB_MAX_SECONDS)(state.attempt_number)


def _log_database_wait(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    logger.warning("database unavailable, retrying in {:.1f} s: {}",
                   state.upcoming_sleep or 0.0, exc)


async def when_available(
    fn: Callable[..., T],
    *args: object,
    limiter: trio.CapacityLimiter | None = None,
    give_up_after: float | None = None,
) -> T:
    """Run the sync `fn(*args)` in a worker thread, waiting out DatabaseUnavailable.

    A database restarting, failing over, or still booting must not fail jobs or the start: the
    caller waits (a warning per try says why) with capped exponential backoff and goes on.
    `give_up_after` bounds the wait (at start, so a wrong URL still ends in a clear error).

    Error handling: any other error (a DatabaseError the server meant) is raised at once.
    """

    def unavailable(exc: BaseException) -> bool:
        return isinstance(exc, DatabaseUnavailable)

    async for attempt in retrying(wait=_database_wait, give_up_after=give_up_after,
                                  before_sleep=_log_database_wait, retry_on=unavailable):
        with attempt:
            return await trio.to_thread.run_sync(fn, *args, limiter=limiter)
    raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover
