"""FeaturesTask: its schedule on MockClock (the database pass replaced), then the real thing."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import psycopg
import pytest
import trio
import trio.testing

from daemon import retrying
from daemon.errors import DatabaseError
from daemon.features import SERVER_NICENESS, FeaturesRun, FeaturesTask

from .test_features import (
    _wait_for_lock_wait,
    assert_matches,
    dirty,
    reference,
    run_dirty,
    stored,
    truth_bars,
    write_page,
)


def _rounded(times: list[float]) -> list[float]:
    return [round(t, 9) for t in times]


class FakePass:
    """A pass that takes `seconds` of (mock) time and records when each one started."""

    def __init__(self, seconds: float = 0.5, fail_on: tuple[int, ...] = ()) -> None:
        self.seconds = seconds
        self.fail_on = fail_on
        self.starts: list[float] = []

    async def __call__(self) -> FeaturesRun:
        self.starts.append(trio.current_time())
        await trio.sleep(self.seconds)
        if len(self.starts) in self.fail_on:
            raise DatabaseError("relation \"features\" does not exist")
        return FeaturesRun(series=2, rows=10, seconds=self.seconds)


async def test_bursts_coalesce_and_idle_polls(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakePass()
    task = FeaturesTask("unused", coalesce_seconds=0.2, poll_seconds=30.0, run_pass=fake)
    async with trio.open_nursery() as nursery:
        await nursery.start(task.run)  # the start pass: 0.0 - 0.5
        await trio.sleep(1.0)
        for _ in range(3):  # a burst of commits at 1.0, 1.05, 1.1: one pass at 1.2
            task.notify()
            await trio.sleep(0.05)
        assert task.statistics().pending == 3
        await trio.sleep_until(1.8)
        stats = task.statistics()
        assert (stats.runs, stats.pending, stats.series_computed, stats.rows_written) == (2, 0,
                                                                                        4, 20)
        assert stats.last_latency_seconds == pytest.approx(0.7)  # 1.0 -> end of pass at 1.7
        assert stats.last_run_seconds == pytest.approx(0.5)
        # Nothing more: the poll pass at 1.7 + 30. A commit during it waits for the next one.
        await trio.sleep_until(31.9)
        task.notify()
        await trio.sleep_until(32.3)
        assert task.statistics().pending == 1  # the poll pass began before the commit
        await trio.sleep_until(33.0)
        stats = task.statistics()
        assert (stats.runs, stats.pending) == (4, 0)
        assert stats.last_latency_seconds == pytest.approx(1.0)  # 31.9 -> 32.9
        nursery.cancel_scope.cancel()
    assert _rounded(fake.starts) == [0.0, 1.2, 31.7, 32.4]


async def test_failed_pass_is_counted_and_the_task_goes_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakePass(seconds=0.1, fail_on=(2,))
    task = FeaturesTask("unused", coalesce_seconds=0.2, poll_seconds=10.0, run_pass=fake)
    async with trio.open_nursery() as nursery:
        await nursery.start(task.run)
        await trio.sleep(1.0)
        task.notify()  # pass 2 at 1.2 fails at 1.3
        await trio.sleep(1.0)
        stats = task.statistics()
        assert (stats.runs, stats.errors, stats.pending) == (1, 1, 1)  # not served
        assert stats.last_error is not None and "does not exist" in stats.last_error
        assert stats.last_error_at is not None
        await trio.sleep_until(11.5)  # the poll pass at 1.3 + 10 serves it
        stats = task.statistics()
        assert (stats.runs, stats.errors, stats.pending) == (2, 1, 0)
        assert stats.last_latency_seconds == pytest.approx(11.4 - 1.0)
        nursery.cancel_scope.cancel()
    assert _rounded(fake.starts) == [0.0, 1.2, 11.3]


# --- on a real database (real time) -----------------------------------------------------------


WAIT_SECONDS = 20.0


async def _wait_until(condition: Callable[[], bool]) -> None:
    """Poll the task's statistics: a snapshot is all a part exposes, there is no event."""
    with trio.fail_after(WAIT_SECONDS):
        while not condition():  # noqa: ASYNC110 - see above
            await trio.sleep(0.01)


async def test_notify_computes_what_was_committed(database: str) -> None:
    bars = truth_bars("AAPL", "5m", 10)
    task = FeaturesTask(database, coalesce_seconds=0.05, poll_seconds=60.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(task.run)
        assert task.statistics().connected
        await _wait_until(lambda: task.statistics().runs == 1)  # the start pass: nothing
        for page in (bars[:700], bars[700:]):
            await trio.to_thread.run_sync(write_page, database, "AAPL", "5m", page)
            task.notify()
        await _wait_until(lambda: task.statistics().pending == 0)
        nursery.cancel_scope.cancel()
    stats = task.statistics()
    assert stats.rows_written == len(bars) and stats.errors == 0 and not stats.connected
    assert stats.last_latency_seconds is not None and stats.last_latency_seconds < 1.0
    assert_matches(stored(database, "AAPL", "5m"), reference(bars))
    assert dirty(database) == {}


@pytest.mark.parametrize("connections", [1, 2])
async def test_lost_connection_is_waited_out(database: str, connections: int) -> None:
    bars = truth_bars("X:BTCUSD", "1h", 10)
    task = FeaturesTask(database, connections=connections, coalesce_seconds=0.0,
                        poll_seconds=60.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(task.run)
        await _wait_until(lambda: task.statistics().runs == 1)
        assert _backends(database) == connections
        assert _niceness(database) == [SERVER_NICENESS] * connections  # background work
        with psycopg.connect(database, autocommit=True) as admin:  # a restart, as the task sees it
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                          " WHERE datname = current_database() AND pid <> pg_backend_pid()")
        await trio.to_thread.run_sync(write_page, database, "X:BTCUSD", "1h", bars)
        task.notify()
        await _wait_until(lambda: task.statistics().runs == 2)
        assert task.statistics().connected
        assert _backends(database) == connections  # every one reconnected
        assert _niceness(database) == [SERVER_NICENESS] * connections
        nursery.cancel_scope.cancel()
    assert task.statistics().errors == 0  # an outage is waited out, not an error
    assert_matches(stored(database, "X:BTCUSD", "1h"), reference(bars))


def _niceness(url: str) -> list[int]:
    """The niceness of the server processes of the task's connections (all on this machine:
    the test server is the embedded one)."""
    with psycopg.connect(url) as conn:
        pids = [pid for (pid,) in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'backfilld'")]
    return [os.getpriority(os.PRIO_PROCESS, pid) for pid in pids]


def _backends(url: str) -> int:
    """The task's connections to the database (db.connect names them backfilld)."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname ="
                           " current_database() AND application_name = 'backfilld'").fetchone()
    return int(row[0]) if row else 0


async def test_a_broken_schema_is_an_error_not_a_crash(database: str) -> None:
    task = FeaturesTask(database, coalesce_seconds=0.0, poll_seconds=60.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(task.run)
        await _wait_until(lambda: task.statistics().runs == 1)
        with psycopg.connect(database) as conn:
            conn.execute("DROP TABLE features_dirty")
        task.notify()
        await _wait_until(lambda: task.statistics().errors == 1)
        stats = task.statistics()
        assert stats.last_error is not None and "features_dirty" in stats.last_error
        assert stats.pending == 1 and stats.runs == 1
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("connections", [1, 2])
async def test_cancelled_mid_computation_stops_at_once_and_keeps_the_claim(
    database: str, connections: int,
) -> None:
    bars = truth_bars("AAPL", "1d", 200)
    write_page(database, "AAPL", "1d", bars)
    blocker = psycopg.connect(database)
    blocker.execute("LOCK TABLE features_progress IN SHARE MODE")  # the start pass will wait
    rescue = threading.Timer(15, blocker.close)  # only if the task ignored its cancellation
    rescue.start()
    try:
        task = FeaturesTask(database, connections=connections, poll_seconds=60.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(task.run)
            await trio.to_thread.run_sync(_wait_for_lock_wait, database)
            cancelled_at = trio.current_time()
            nursery.cancel_scope.cancel()
        assert trio.current_time() - cancelled_at < 2.0  # not stuck behind the lock
    finally:
        rescue.cancel()
        blocker.close()
    assert stored(database, "AAPL", "1d") == []
    assert dirty(database) == {("AAPL", "1d"): (-1, 1, bars[0][0])}  # claimed, not lost
    assert run_dirty(database).rows == len(bars)
    assert dirty(database) == {}


def test_statistics_before_start() -> None:
    stats = FeaturesTask("unused").statistics()
    assert (stats.connected, stats.runs, stats.pending, stats.errors) == (False, 0, 0, 0)
    assert stats.last_run_seconds is None and stats.last_latency_seconds is None
    assert retrying.DB_MIN_SECONDS < 1.0  # the outage test relies on a quick first retry


async def test_a_deferred_series_waits_for_its_release_and_is_computed_once(
        database: str) -> None:
    """A deep backfill commits its sub-ranges out of order: while deferred, its pages are marked
    (the markers are durable) but not computed; released, it is computed once, from its first
    changed bar, and equals the straightforward reference. Other series go on meanwhile."""
    spy, ibm = truth_bars("SPY", "5m", 6), truth_bars("IBM", "5m", 2)
    third = len(spy) // 3
    task = FeaturesTask(database, coalesce_seconds=0.05, poll_seconds=60.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(task.run)
        await _wait_until(lambda: task.statistics().runs == 1)
        task.defer(("SPY", "5m"), True)
        task.defer(("SPY", "5m"), True)  # holds nest
        # the later sub-range lands first, then the earlier one
        for page in (spy[2 * third:], spy[:third], spy[third:2 * third]):
            await trio.to_thread.run_sync(write_page, database, "SPY", "5m", page)
            task.notify()
        await trio.to_thread.run_sync(write_page, database, "IBM", "5m", ibm)
        task.notify()
        await _wait_until(lambda: task.statistics().pending == 0)
        assert stored(database, "SPY", "5m") == []  # held back; its marker is kept
        assert set(dirty(database)) == {("SPY", "5m")}
        assert_matches(stored(database, "IBM", "5m"), reference(ibm))
        task.defer(("SPY", "5m"), False)
        await trio.sleep(0.2)
        assert set(dirty(database)) == {("SPY", "5m")}  # one hold is left
        runs = task.statistics().runs
        task.defer(("SPY", "5m"), False)  # released: computed in the next pass
        await _wait_until(lambda: task.statistics().pending == 0
                          and task.statistics().runs > runs)
        nursery.cancel_scope.cancel()
    assert_matches(stored(database, "SPY", "5m"), reference(spy))
    assert dirty(database) == {}
    assert task.statistics().rows_written == len(spy) + len(ibm)  # each row computed once
