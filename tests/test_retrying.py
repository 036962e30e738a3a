"""The one retry mechanism, on trio's MockClock: what is retried, how long it waits, when it
gives up."""

from __future__ import annotations

import pytest
import trio

from daemon import retrying
from daemon.errors import ApiRequestError, ApiServerError, DatabaseError, DatabaseUnavailable
from daemon.retrying import Backoff, is_transient, when_available


def test_backoff_doubles_caps_and_jitters_within_bounds() -> None:
    assert [Backoff(1, 10)(k) for k in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    low = Backoff(1, 10, jitter=0.5, uniform=lambda lo, hi: lo)
    high = Backoff(1, 10, jitter=0.5, uniform=lambda lo, hi: hi)
    assert [low(k) for k in (1, 4, 6)] == [1, 8, 10]
    assert [high(k) for k in (1, 4, 6)] == [1.5, 12, 15]


def test_the_exception_tree_decides_what_is_transient() -> None:
    assert is_transient(ApiServerError("503")) and is_transient(DatabaseUnavailable("down"))
    assert not is_transient(ApiRequestError("400")) and not is_transient(DatabaseError("syntax"))
    assert not is_transient(ValueError("not ours"))


async def test_database_waits_double_to_the_cap_then_succeed(
        autojump_clock: trio.abc.Clock) -> None:
    calls: list[float] = []
    t0 = trio.current_time()

    def flaky() -> str:
        calls.append(trio.from_thread.run_sync(trio.current_time) - t0)
        if len(calls) < 9:
            raise DatabaseUnavailable("connection refused")
        return "ok"

    assert await when_available(flaky) == "ok"
    waits = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert waits == [0.5, 1, 2, 4, 8, 16, 30, 30]


async def test_database_gives_up_after_a_bound_and_raises_the_last_error(
        autojump_clock: trio.abc.Clock) -> None:
    attempts = 0

    def down() -> None:
        nonlocal attempts
        attempts += 1
        raise DatabaseUnavailable(f"refused {attempts}")

    t0 = trio.current_time()
    with pytest.raises(DatabaseUnavailable, match="refused 6"):
        await when_available(down, give_up_after=20)
    # 0.5 + 1 + 2 + 4 + 8 = 15.5 s; the next wait (16 s) would end past 20 s
    assert trio.current_time() - t0 == 15.5 and attempts == 6


async def test_a_permanent_database_error_is_raised_at_once() -> None:
    attempts = 0

    def broken() -> None:
        nonlocal attempts
        attempts += 1
        raise DatabaseError("syntax error at or near SELEC")

    with pytest.raises(DatabaseError, match="syntax"):
        await when_available(broken)
    assert attempts == 1


async def test_attempts_bound_and_custom_sleep(autojump_clock: trio.abc.Clock) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        await trio.sleep(seconds)

    policy = retrying.retrying(wait=lambda state: 2.0, attempts=3, sleep=sleep)
    attempts = 0

    async def fail() -> None:
        nonlocal attempts
        attempts += 1
        raise ApiServerError("HTTP 503")

    with pytest.raises(ApiServerError):
        await policy(fail)
    assert attempts == 3 and slept == [2.0, 2.0]
