"""The event-loop lag monitor: it reports how late the loop woke, and forgets after a minute."""

from __future__ import annotations

import time

import trio
import trio.testing

from daemon.looplag import LoopLag


def test_the_worst_lag_is_kept_for_the_window_only() -> None:
    lag = LoopLag(window=60)
    lag.record(100.0, 0.5)
    lag.record(101.0, 0.01)
    assert lag.statistics().last_seconds == 0.01 and lag.statistics().max_seconds == 0.5
    lag.record(161.0, 0.02)  # the 0.5 s lateness is more than a minute old now
    assert lag.statistics().max_seconds == 0.02 and lag.statistics().samples == 3


async def test_a_quiet_loop_shows_no_lag(autojump_clock: trio.testing.MockClock) -> None:
    lag = LoopLag(interval=0.25)
    async with trio.open_nursery() as nursery:
        await nursery.start(lag.run)
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    stats = lag.statistics()
    # one wake-up every 0.25 s of (virtual) time, each exactly on time
    assert 39 <= stats.samples <= 40 and stats.max_seconds == 0.0


async def test_work_left_on_the_trio_thread_shows_as_lag() -> None:
    lag = LoopLag(interval=0.01)
    async with trio.open_nursery() as nursery:
        await nursery.start(lag.run)
        await trio.sleep(0.05)
        time.sleep(0.2)  # noqa: ASYNC251 - the point: the loop thread blocked
        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert lag.statistics().max_seconds >= 0.15
