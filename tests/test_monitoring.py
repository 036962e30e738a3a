"""Monitoring rows against a real PostgreSQL: written with the data, in the same transactions."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from typing import Any

import attrs
import psycopg
import trio

from daemon import db
from daemon.bars import Bar
from daemon.config import parse_config
from daemon.db import SeriesState
from daemon.jobs import JobOutcome
from daemon.monitoring import ExecutionFinished, ExecutionStarted, JobRow
from daemon.polygon import ClientStatistics, Page
from daemon.scheduler import Scheduler
from daemon.timeframes import Timeframe
from daemon.writer import Writer, open_writer_channel

from .writing import Job, write_all

DAY = 86_400_000
T0 = 1_700_000_000_000  # 2023-11-14


def bar(t: int, n: int | None = 5) -> Bar:
    return Bar(t=t, o=10.0, h=12.0, l=9.0, c=10.0, v=1.5e4, vw=10.0, n=n)


def query(url: str, sql: str, *args: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, args or None).fetchall()


def started(eid: uuid.UUID, number: int = 1) -> ExecutionStarted:
    return ExecutionStarted(eid, "test-instance", number, "start", T0 / 1000)


def finished(eid: uuid.UUID, **values: Any) -> ExecutionFinished:
    fields: dict[str, Any] = dict(
        status="ok", finished_wall=T0 / 1000 + 5, duration_seconds=5.0, jobs_total=1, jobs_ok=1,
        jobs_failed=0, jobs_cancelled=0, bars_written=3, requests=4, rate_limited=1, retries=1)
    fields.update(values)
    return ExecutionFinished(eid, **fields)


async def test_a_job_and_its_execution_are_recorded_with_the_data(database: str) -> None:
    eid = uuid.uuid4()
    job = Job("BRK.A", "1d", T0, T0 + 10 * DAY, execution_id=eid, pages=2,
                   attempts=3, api_seconds=1.25)
    await write_all(database, [
        started(eid), job.page([bar(T0), bar(T0 + DAY)]), job.page([bar(T0 + 2 * DAY)]),
        job.done(), finished(eid)])
    assert job.receipt.finished.is_set() and job.receipt.outcome is JobOutcome.OK
    [execution] = query(database, "SELECT instance, number, trigger, status, started_at,"
                        " finished_at, duration_seconds, jobs_total, jobs_ok, jobs_failed,"
                        " bars_written, requests, rate_limited, retries, error FROM executions")
    assert execution == (
        "test-instance", 1, "start", "ok", db.from_ms(T0), db.from_ms(T0 + 5000), 5.0, 1, 1, 0,
        3, 4, 1, 1, None)
    [result] = query(database, "SELECT symbol, timeframe, execution_id, status, from_ts, to_ts,"
                     " bars, pages, attempts, api_seconds, db_seconds, error FROM job_results")
    assert result[:10] == ("BRK.A", "1d", eid, "ok", db.from_ms(T0), db.from_ms(T0 + 10 * DAY),
                           3, 2, 3, 1.25)
    assert result[10] > 0 and result[11] is None  # the two pages' transactions
    [fresh] = query(database, "SELECT last_bar_ts, last_success_at IS NOT NULL, checked_through,"
                    " last_attempt_at IS NOT NULL, last_error FROM series_freshness")
    # the job asked up to T0 + 10 days (in the past): that is as far as it proves anything
    assert fresh == (db.from_ms(T0 + 2 * DAY), True, db.from_ms(T0 + 10 * DAY), True, None)


async def test_a_rejected_page_leaves_freshness_where_the_data_is(database: str) -> None:
    eid = uuid.uuid4()
    job = Job("A", "1d", T0, T0 + 10 * DAY, execution_id=eid)
    bad = [Bar(t=2**50, o=1, h=1, l=1, c=1, v=1)]  # year 35 million: the database refuses it
    writer = await write_all(database, [
        started(eid), job.page([bar(T0)]), job.page(bad), job.done()])
    assert job.receipt.outcome is JobOutcome.FAILED
    assert query(database, "SELECT last_bar_ts, last_success_at, last_error IS NOT NULL"
                 " FROM series_freshness") == [(db.from_ms(T0), None, True)]
    assert query(database, "SELECT status, bars, error LIKE 'database rejected the page%'"
                 " FROM job_results") == [("failed", 1, True)]
    assert query(database, "SELECT jobs_ok, jobs_failed, bars_written FROM executions") == [
        (0, 1, 1)]
    stats = writer.statistics()
    assert stats.last_error is not None and stats.last_error.startswith("A 1d: database rejected")


async def test_failures_keep_the_last_success_and_successes_keep_the_last_error(
        database: str) -> None:
    first, second, third = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    ok = Job("A", "1h", T0, T0 + DAY, execution_id=first)
    failing = Job("A", "1h", T0, T0 + DAY, execution_id=second,
                       error="ApiServerError: gave up after 5 attempts; last: HTTP 503")
    again = Job("A", "1h", T0, T0 + 2 * DAY, execution_id=third)
    await write_all(database, [started(first), ok.page([bar(T0)]), ok.done()])
    [(success_1,)] = query(database, "SELECT last_success_at FROM series_freshness")
    await write_all(database, [started(second, 2), failing.done()])
    row = query(database, "SELECT last_success_at, last_error, last_error_at IS NOT NULL"
                " FROM series_freshness")
    assert row == [(success_1, failing.fetch.error, True)]
    await write_all(database, [started(third, 3), again.page([bar(T0 + DAY)]),
                               again.done()])
    [(success_3, error, bar_ts, checked)] = query(
        database, "SELECT last_success_at, last_error, last_bar_ts, checked_through"
        " FROM series_freshness")
    assert success_3 > success_1 and error == failing.fetch.error
    assert (bar_ts, checked) == (db.from_ms(T0 + DAY), db.from_ms(T0 + 2 * DAY))
    assert query(database, "SELECT status FROM job_results ORDER BY finished_at") == [
        ("ok",), ("failed",), ("ok",)]


async def test_a_series_run_twice_in_one_execution_is_one_row_and_cancelled_is_not_failed(
        database: str) -> None:
    eid = uuid.uuid4()
    a1 = Job("A", "1d", T0, T0 + DAY, execution_id=eid, pages=1, attempts=1)
    a2 = Job("A", "1d", T0 + DAY, T0 + 3 * DAY, execution_id=eid, pages=1,
                  attempts=2)
    b = Job("B", "1d", T0, T0 + DAY, execution_id=eid, pages=1, attempts=1,
                 cancelled=True)
    await write_all(database, [started(eid), a1.page([bar(T0)]), a1.done(),
                               a2.page([bar(T0 + DAY), bar(T0 + 2 * DAY)]), a2.done(),
                               b.page([bar(T0)]), b.done()])
    assert query(database, "SELECT symbol, status, from_ts, to_ts, bars, pages, attempts"
                 " FROM job_results ORDER BY symbol") == [
        ("A", "ok", db.from_ms(T0), db.from_ms(T0 + 3 * DAY), 3, 2, 3),
        ("B", "cancelled", db.from_ms(T0), db.from_ms(T0 + DAY), 1, 1, 1)]
    assert query(database, "SELECT jobs_ok, jobs_failed, jobs_cancelled, bars_written"
                 " FROM executions") == [(2, 0, 1, 4)]
    # a cancelled job neither succeeded nor failed
    assert query(database, "SELECT symbol, last_success_at IS NULL, last_error"
                 " FROM series_freshness ORDER BY symbol") == [("A", False, None),
                                                              ("B", True, None)]


def late(job: Job) -> JobRow:
    return JobRow(job.series.symbol, job.series.timeframe, JobOutcome.FAILED, job.fetch.from_ms,
                  job.fetch.to_ms, 0, 0, 0, 0.0, 0.0, job.fetch.error)


async def test_failures_the_writer_never_saw_are_recorded_at_the_end(database: str) -> None:
    eid = uuid.uuid4()
    seen = Job("A", "1d", T0, T0 + DAY, execution_id=eid, error="BadData: h < l")
    unseen = Job("B", "*", 0, 0, execution_id=eid,
                      error="cannot read checkpoints: server closed the connection")
    await write_all(database, [
        started(eid), seen.done(),
        finished(eid, status="failed", jobs_total=2, jobs_ok=0, jobs_failed=2, bars_written=0,
                 late_failures=(late(seen), late(unseen)))])
    assert query(database, "SELECT symbol, timeframe, status, error FROM job_results"
                 " ORDER BY symbol") == [("A", "1d", "failed", "BadData: h < l"),
                                        ("B", "*", "failed", unseen.fetch.error)]
    assert query(database, "SELECT status, jobs_failed FROM executions") == [("failed", 2)]
    assert query(database, "SELECT symbol FROM series_freshness") == [("A",)]


async def test_a_rejected_job_done_still_releases_its_producer(database: str) -> None:
    job = Job("A", "1d", T0, T0 + DAY, execution_id=uuid.uuid4())  # no such execution
    later = Job("B", "1d", T0, T0 + DAY)
    writer = await write_all(database, [job.page([bar(T0)]), job.done(),
                                        later.page([bar(T0)]), later.done()])
    assert job.receipt.finished.is_set() and job.receipt.write_error is not None
    assert "rejected the JobFinished" in job.receipt.write_error
    assert job.receipt.outcome is JobOutcome.FAILED
    assert later.receipt.outcome is JobOutcome.OK
    assert writer.statistics().write_errors == 1


def test_migration_seeds_freshness_from_existing_checkpoints(empty_database: str) -> None:
    migrations = db.load_migrations()
    db.apply_migrations(empty_database, [m for m in migrations if m.version < 3])
    with psycopg.connect(empty_database) as conn:
        conn.execute("INSERT INTO checkpoints (symbol, timeframe, covered_from, covered_through)"
                     " VALUES ('SPY', '1d', %s, %s)", (db.from_ms(T0), db.from_ms(T0 + DAY)))
    assert "003_monitoring" in db.apply_migrations(empty_database)
    assert query(empty_database, "SELECT symbol, timeframe, last_bar_ts, last_success_at"
                 " FROM series_freshness") == [("SPY", "1d", db.from_ms(T0 + DAY), None)]


# --- the scheduler's side: one execution per cycle, its own requests -----------------------


@attrs.define
class CountingClient:
    """Pages of one bar; each page costs 3 requests, one of them a 429 retried."""

    total_requests: int = 0
    rate_limited: int = 0
    retries: int = 0
    gate: trio.Event | None = None

    def statistics(self) -> ClientStatistics:
        return ClientStatistics(self.total_requests, self.rate_limited, self.retries, 0, 0, 0, 0)

    async def pages(self, symbol: str, timeframe: Timeframe, from_ms: int, to_ms: int
                    ) -> AsyncIterator[Any]:
        if self.gate is not None:
            await self.gate.wait()
        self.total_requests += 3
        self.rate_limited += 1
        self.retries += 1
        yield Page([bar(from_ms - from_ms % DAY + DAY)], attempts=3, api_seconds=0.5, bytes=0,
                   last=True)



async def no_coverage(symbol: str) -> dict[tuple[str, str], SeriesState]:
    return {}


async def test_each_cycle_is_an_execution_with_its_own_request_counts(database: str) -> None:
    config = parse_config('[daemon]\ninstance = "sched"\n[backfill]\nsymbols = ["A", "B"]\n'
                          'timeframes = ["1d"]\nhistory_days = 3\nstagger_seconds = 0\n', env={})
    client = CountingClient()
    send, receive = open_writer_channel(4)
    writer = Writer(database, receive)
    scheduler = Scheduler(config, client, send, series_state=no_coverage,  # type: ignore[arg-type]
                          today=lambda: dt.date(2024, 3, 15))
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        async with send:
            first = await scheduler.run_cycle("start")
            second = await scheduler.run_cycle("wake")
    assert (first.requests, first.rate_limited, first.retries) == (6, 2, 2)
    assert (second.requests, second.rate_limited, second.retries) == (6, 2, 2)
    rows = query(database, "SELECT id, number, trigger, status, jobs_total, jobs_ok, requests,"
                 " rate_limited, retries, instance FROM executions ORDER BY number")
    assert rows == [
        (first.execution_id, 1, "start", "ok", 2, 2, 6, 2, 2, "sched"),
        (second.execution_id, 2, "wake", "ok", 2, 2, 6, 2, 2, "sched"),
    ]
    assert query(database, "SELECT execution_id, count(*), sum(attempts) FROM job_results"
                 " GROUP BY 1 ORDER BY min(finished_at)") == [
        (first.execution_id, 2, 6), (second.execution_id, 2, 6)]


async def test_an_interrupted_cycle_is_recorded_as_interrupted(database: str) -> None:
    config = parse_config('[backfill]\nsymbols = ["A", "B"]\ntimeframes = ["1d"]\n'
                          'history_days = 3\n', env={})
    client = CountingClient(gate=trio.Event())  # requests never come back
    send, receive = open_writer_channel(4)
    writer = Writer(database, receive)
    scheduler = Scheduler(config, client, send, series_state=no_coverage,  # type: ignore[arg-type]
                          today=lambda: dt.date(2024, 3, 15))
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        async with send:
            with trio.move_on_after(0.2):
                await scheduler.run_cycle("start")
    assert query(database, "SELECT status, finished_at IS NOT NULL FROM executions") == [
        ("interrupted", True)]


def test_a_restart_closes_the_executions_its_killed_predecessor_left_running(
    database: str,
) -> None:
    from daemon.monitoring import close_abandoned_executions

    with psycopg.connect(database, autocommit=True) as conn:
        for instance, finished in (("box-1", None), ("box-1", None), ("box-2", None),
                                   ("box-1", dt.datetime.now(dt.UTC))):
            conn.execute(
                "INSERT INTO executions (id, instance, number, trigger, started_at, finished_at,"
                " status) VALUES (%s, %s, 1, 'start', now(), %s, %s)",
                (uuid.uuid4(), instance, finished, "ok" if finished else "running"),
            )
    assert close_abandoned_executions(database, "box-1") == 2
    assert close_abandoned_executions(database, "box-1") == 0
    with psycopg.connect(database) as conn:
        rows = conn.execute(
            "SELECT instance, status, finished_at IS NOT NULL, error FROM executions"
            " ORDER BY instance, status"
        ).fetchall()
    assert rows == [
        ("box-1", "interrupted", True, "the process ended before the cycle finished"),
        ("box-1", "interrupted", True, "the process ended before the cycle finished"),
        ("box-1", "ok", True, None),
        ("box-2", "running", False, None),  # another instance's cycle is left alone
    ]


async def test_executions_past_the_retention_are_pruned_with_their_jobs(database: str) -> None:
    from daemon.monitoring import Prune

    old, recent, running = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    day = 86_400.0
    jobs = [Job("A", "1d", T0, T0 + DAY, execution_id=e) for e in (old, recent)]
    await write_all(database, [
        ExecutionStarted(old, "i", 1, "start", T0 / 1000), jobs[0].done(),
        finished(old),
        ExecutionStarted(recent, "i", 2, "start", T0 / 1000 + 100 * day), jobs[1].done(),
        finished(recent),
        ExecutionStarted(running, "i", 3, "start", T0 / 1000 - day),  # still open: kept
        Prune(T0 / 1000 + 10 * day)])
    assert sorted(query(database, "SELECT number FROM executions")) == [(2,), (3,)]
    assert query(database, "SELECT execution_id FROM job_results") == [(recent,)]
