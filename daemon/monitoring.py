"""Monitoring rows (sql/003_monitoring.sql): written by the writer inside the data's transactions,
read back for the status endpoints on short-lived connections of their own.

Why in the same transactions: a page's `series_freshness.last_bar_ts` commits with the page's
bars, and a job's `job_results` row and its `executions` counters commit with the job's last
message, so what the status endpoints read can never claim data that is not there (or miss data
that is). Nothing here opens a connection: the helpers take the writer's cursor.

- `record_page(cur, series, last_bar_ms)` and `record_job(cur, row, execution_id)`: called by
  the writer inside a page's and a job's last transaction.
- `ExecutionStarted` / `ExecutionFinished`: writer messages (plain data) the scheduler sends at
  the start and end of each cycle, through the same channel, so they are ordered with the jobs'
  messages; `record_execution_started` / `record_execution_finished` write them.
- `close_abandoned_executions`: at start, closes the rows a killed process left 'running'.
- `check_database`, `read_freshness`, `read_history`: synchronous readers for daemon.status,
  run in worker threads, each on its own connection with short connect and statement timeouts
  (never the writer's: a slow status query must not delay a page).

Error handling: a statement failing in a writer message fails the whole message like any other
rejected write (the writer logs it and goes on); these rows are ours, so that means a bug, not
bad data. The readers raise DatabaseError (password redacted) and nothing else from psycopg.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import psycopg

from .db import Migration, from_ms, pending_migrations, to_ms
from .errors import DatabaseError
from .jobs import JobOutcome, SeriesKey
from .timefmt import iso_dt, utc

__all__ = [
    "ExecutionFinished",
    "ExecutionStarted",
    "Freshness",
    "JobRow",
    "Prune",
    "check_database",
    "prune",
    "close_abandoned_executions",
    "read_freshness",
    "read_history",
    "read_readjusting",
    "record_execution_finished",
    "record_execution_started",
    "record_job",
    "record_page",
]

# Readers' limits: a status request must answer (503 with the reason) rather than hang.
READ_CONNECT_TIMEOUT_SECONDS = 2
READ_STATEMENT_TIMEOUT_MS = 3000
# Failed jobs listed per execution in the history; the rest are counted, not listed.
HISTORY_FAILED_JOBS = 50

_FRESHNESS_PAGE = """
INSERT INTO series_freshness AS f (symbol, timeframe, last_bar_ts, last_attempt_at)
VALUES (%(symbol)s, %(timeframe)s, %(last_bar)s, now())
ON CONFLICT (symbol, timeframe) DO UPDATE SET
    last_bar_ts = GREATEST(f.last_bar_ts, EXCLUDED.last_bar_ts),
    last_attempt_at = EXCLUDED.last_attempt_at
"""
# GREATEST and COALESCE skip nulls: a failed job leaves the success columns as they were, a
# successful one leaves the last error (with its time) for the operator to see.
# A refusal asked anew sets refused_at (the once-a-day clock); one remembered leaves it; a
# success clears it.
_FRESHNESS_DONE = """
INSERT INTO series_freshness AS f
    (symbol, timeframe, last_success_at, checked_through, last_attempt_at, last_error,
     last_error_at, refused_at, refused_reason)
VALUES (%(symbol)s, %(timeframe)s,
        CASE WHEN %(ok)s THEN now() END,
        CASE WHEN %(ok)s THEN LEAST(now(), %(to_ts)s) END,
        now(), %(error)s::text,
        CASE WHEN %(error)s::text IS NOT NULL THEN now() END,
        CASE WHEN %(refused)s::text IS NOT NULL AND %(asked)s THEN now() END,
        %(refused)s::text)
ON CONFLICT (symbol, timeframe) DO UPDATE SET
    last_success_at = COALESCE(EXCLUDED.last_success_at, f.last_success_at),
    checked_through = GREATEST(f.checked_through, EXCLUDED.checked_through),
    last_attempt_at = EXCLUDED.last_attempt_at,
    last_error = COALESCE(EXCLUDED.last_error, f.last_error),
    last_error_at = COALESCE(EXCLUDED.last_error_at, f.last_error_at),
    refused_at = CASE WHEN %(ok)s THEN NULL
                      ELSE COALESCE(EXCLUDED.refused_at, f.refused_at) END,
    refused_reason = CASE WHEN %(ok)s THEN NULL
                          ELSE COALESCE(EXCLUDED.refused_reason, f.refused_reason) END
"""
# A series can run twice in one execution (a reload re-queues a finished symbol): one row per
# series, its counts summed, its status and error the latest.
_JOB_RESULT = """
INSERT INTO job_results AS r
    (symbol, timeframe, execution_id, status, from_ts, to_ts, bars, pages, attempts,
     api_seconds, db_seconds, error, quarantined, instance_id)
VALUES (%(symbol)s, %(timeframe)s, %(execution_id)s, %(status)s, %(from_ts)s, %(to_ts)s,
        %(bars)s, %(pages)s, %(attempts)s, %(api_seconds)s, %(db_seconds)s, %(error)s,
        %(quarantined)s, %(instance_id)s)
ON CONFLICT (symbol, timeframe, execution_id) DO UPDATE SET
    status = EXCLUDED.status,
    from_ts = LEAST(r.from_ts, EXCLUDED.from_ts),
    to_ts = GREATEST(r.to_ts, EXCLUDED.to_ts),
    bars = r.bars + EXCLUDED.bars,
    pages = r.pages + EXCLUDED.pages,
    attempts = r.attempts + EXCLUDED.attempts,
    api_seconds = r.api_seconds + EXCLUDED.api_seconds,
    db_seconds = r.db_seconds + EXCLUDED.db_seconds,
    quarantined = r.quarantined + EXCLUDED.quarantined,
    instance_id = EXCLUDED.instance_id,
    error = EXCLUDED.error,
    finished_at = now()
"""
_EXECUTION_JOB = """
UPDATE executions SET
    jobs_ok = jobs_ok + (%(status)s = 'ok')::int,
    jobs_failed = jobs_failed + (%(status)s = 'failed')::int,
    jobs_cancelled = jobs_cancelled + (%(status)s = 'cancelled')::int,
    jobs_not_entitled = jobs_not_entitled + (%(status)s = 'not_entitled')::int,
    bars_written = bars_written + %(bars)s,
    bars_quarantined = bars_quarantined + %(quarantined)s
WHERE id = %(execution_id)s
"""
_EXECUTION_START = """
INSERT INTO executions (id, instance, number, trigger, started_at, instance_id)
VALUES (%(id)s, %(instance)s, %(number)s, %(trigger)s, %(started_at)s, %(instance_id)s)
ON CONFLICT (id) DO NOTHING
"""
_EXECUTION_FINISH = """
UPDATE executions SET
    status = %(status)s, finished_at = %(finished_at)s, duration_seconds = %(duration)s,
    jobs_total = %(jobs_total)s, jobs_ok = %(jobs_ok)s, jobs_failed = %(jobs_failed)s,
    jobs_cancelled = %(jobs_cancelled)s, bars_written = %(bars_written)s,
    jobs_not_entitled = %(jobs_not_entitled)s, bars_quarantined = %(bars_quarantined)s,
    requests = %(requests)s, rate_limited = %(rate_limited)s, retries = %(retries)s,
    error = %(error)s
WHERE id = %(id)s
"""
# Failures the writer never saw (a symbol whose checkpoints could not be read never sent a
# message): recorded at the end; rows the jobs wrote themselves are left as they are.
_JOB_RESULT_LATE = _JOB_RESULT.split("ON CONFLICT")[0] + "ON CONFLICT DO NOTHING"


@attrs.frozen
class JobRow:
    """A finished job as `job_results` stores it (the outcome already decided)."""

    symbol: str
    timeframe: str
    outcome: JobOutcome
    from_ms: int
    to_ms: int
    bars: int
    pages: int
    attempts: int
    api_seconds: float
    db_seconds: float
    error: str | None
    quarantined: int = 0
    refused: str | None = None  # the API's refusal (not entitled)
    asked: bool = True  # the refusal came from a request now, not from memory

    def params(self, execution_id: uuid.UUID) -> dict[str, object]:
        return {
            "symbol": self.symbol, "timeframe": self.timeframe, "execution_id": execution_id,
            "status": self.outcome.value, "from_ts": from_ms(self.from_ms),
            "to_ts": from_ms(self.to_ms), "bars": self.bars, "pages": self.pages,
            "attempts": self.attempts, "api_seconds": self.api_seconds,
            "db_seconds": self.db_seconds, "error": self.error or self.refused,
            "quarantined": self.quarantined,
        }


def record_page(cur: psycopg.Cursor, series: SeriesKey, last_bar_ms: int) -> None:
    """The series' newest bar, in the page's transaction."""
    cur.execute(_FRESHNESS_PAGE, {"symbol": series.symbol, "timeframe": series.timeframe,
                                  "last_bar": from_ms(last_bar_ms)})


def record_job(cur: psycopg.Cursor, row: JobRow, execution_id: uuid.UUID | None,
               instance_id: str | None = None) -> None:
    """The job's result row, its execution's counters and the series' freshness, in the job's
    last transaction. A job outside any execution (tests, tools) records freshness only."""
    if execution_id is not None:
        cur.execute(_JOB_RESULT, {**row.params(execution_id), "instance_id": instance_id})
        cur.execute(_EXECUTION_JOB, {"status": row.outcome.value, "bars": row.bars,
                                     "quarantined": row.quarantined,
                                     "execution_id": execution_id})
    if row.timeframe != "*":
        cur.execute(_FRESHNESS_DONE, {
            "symbol": row.symbol, "timeframe": row.timeframe,
            "ok": row.outcome is JobOutcome.OK, "to_ts": from_ms(row.to_ms), "error": row.error,
            "refused": row.refused if row.outcome is JobOutcome.NOT_ENTITLED else None,
            "asked": row.asked,
        })


@attrs.frozen
class ExecutionStarted:
    """The cycle's `executions` row, before any of its jobs' rows (the channel keeps order)."""

    id: uuid.UUID
    instance: str
    number: int
    trigger: str
    started_wall: float
    instance_id: str | None = None  # daemon.leases: which process (the label is `instance`)


@attrs.frozen
class ExecutionFinished:
    """The cycle's totals: status, duration, jobs, bars, and the requests/429s/retries it sent.

    `late_failures` are failed jobs that never reached the writer (see `_JOB_RESULT_LATE`).
    """

    id: uuid.UUID
    status: str  # ok / failed / interrupted
    finished_wall: float
    duration_seconds: float
    jobs_total: int
    jobs_ok: int
    jobs_failed: int
    jobs_cancelled: int
    bars_written: int
    requests: int
    rate_limited: int
    retries: int
    error: str | None = None
    late_failures: tuple[JobRow, ...] = ()
    jobs_not_entitled: int = 0
    bars_quarantined: int = 0


@attrs.frozen
class Prune:
    """Delete finished executions (and, by cascade, their job results) started before
    `before_wall` (Unix seconds): `[monitoring] retention_days`."""

    before_wall: float


def prune(cur: psycopg.Cursor, message: Prune) -> int:
    cur.execute("DELETE FROM executions WHERE started_at < %s AND finished_at IS NOT NULL",
                (utc(message.before_wall),))
    return cur.rowcount


def record_execution_started(cur: psycopg.Cursor, message: ExecutionStarted) -> None:
    cur.execute(_EXECUTION_START, {
        "id": message.id, "instance": message.instance, "number": message.number,
        "trigger": message.trigger, "started_at": utc(message.started_wall),
        "instance_id": message.instance_id,
    })


def record_execution_finished(cur: psycopg.Cursor, message: ExecutionFinished) -> None:
    if message.late_failures:
        cur.executemany(_JOB_RESULT_LATE,
                        [{**row.params(message.id), "instance_id": None}
                         for row in message.late_failures])
    cur.execute(_EXECUTION_FINISH, {
        "id": message.id, "status": message.status, "finished_at": utc(message.finished_wall),
        "duration": message.duration_seconds, "jobs_total": message.jobs_total,
        "jobs_ok": message.jobs_ok, "jobs_failed": message.jobs_failed,
        "jobs_cancelled": message.jobs_cancelled, "bars_written": message.bars_written,
        "requests": message.requests, "rate_limited": message.rate_limited,
        "retries": message.retries, "error": message.error,
        "jobs_not_entitled": message.jobs_not_entitled,
        "bars_quarantined": message.bars_quarantined,
    })


# --- readers (worker threads, own connections) ------------------------------------------------


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


@contextmanager
def reader(url: str) -> Iterator[psycopg.Connection]:
    try:
        conn = psycopg.connect(
            url, autocommit=True, connect_timeout=READ_CONNECT_TIMEOUT_SECONDS,
            application_name="backfilld-status",
            options=f"-c statement_timeout={READ_STATEMENT_TIMEOUT_MS}",
        )
    except psycopg.Error as exc:
        raise DatabaseError(f"cannot connect to PostgreSQL: {_one_line(exc)}") from None
    try:
        yield conn
    except psycopg.Error as exc:
        raise DatabaseError(f"query failed: {_one_line(exc)}") from None
    finally:
        conn.close()


def close_abandoned_executions(url: str, instance: str, dead_after_seconds: float = 60.0
                               ) -> int:
    """Mark executions whose process is gone as interrupted; return how many.

    A cycle whose process was killed stays 'running' forever otherwise, and the history and
    health endpoints would show a cycle that is not running. A process is gone when its
    instance row (daemon.leases) stopped or stopped heartbeating `dead_after_seconds` ago, or,
    for rows written before instances were recorded, when it had this instance's label.
    Several live processes on one host (one label) keep their running cycles.
    """
    with reader(url) as conn:
        cur = conn.execute(
            "UPDATE executions SET status = 'interrupted', finished_at = now(),"
            " error = coalesce(error, 'the process ended before the cycle finished')"
            " WHERE finished_at IS NULL AND ("
            "   (instance_id IS NULL AND instance = %(label)s)"
            "   OR instance_id IN (SELECT id FROM instances WHERE stopped_at IS NOT NULL"
            "       OR heartbeat_at < now() - %(dead)s * interval '1 second')"
            "   OR (instance_id IS NOT NULL"
            "       AND instance_id NOT IN (SELECT id FROM instances)))",
            {"label": instance, "dead": dead_after_seconds},
        )
        return cur.rowcount


def check_database(url: str, migrations: list[Migration]) -> str | None:
    """None when the database answers and every migration is applied, else the reason."""
    try:
        with reader(url) as conn:
            pending = pending_migrations(conn, migrations)
    except DatabaseError as exc:
        return str(exc)
    if pending:
        names = ", ".join(f"{m.version:03d}_{m.name}" for m in pending)
        return f"{len(pending)} migration(s) not applied: {names} (run `backfilld migrate`)"
    return None


@attrs.frozen
class Freshness:
    """A `series_freshness` row, times in Unix ms."""

    last_bar_ms: int | None
    last_success_ms: int | None
    checked_through_ms: int | None
    last_attempt_ms: int | None
    last_error: str | None
    last_error_ms: int | None
    refused_ms: int | None = None  # when the API last refused the series (not entitled)
    refused_reason: str | None = None
    quarantined: int = 0  # bars of the series in quarantine now


@attrs.frozen
class Readjusting:
    """A split applied to a series whose history before it is not fetched again yet."""

    split: str  # e.g. "NVDA split 10-for-1 on 2024-06-10"
    before_ms: int  # the execution date's ET midnight: bars before it are being re-fetched
    applied_ms: int


def read_readjusting(url: str, first_ms: int) -> dict[tuple[str, str], Readjusting]:
    """Series being re-adjusted after a split: a split was applied to their ticker and their
    coverage does not hold `[first_ms, execution date)` again yet (first_ms: the history's
    configured start)."""
    with reader(url) as conn:
        rows = conn.execute(
            "SELECT s.ticker, c.timeframe, s.execution_date, s.split_from, s.split_to,"
            "       s.applied_at,"
            "       extract(epoch FROM s.execution_date::timestamp AT TIME ZONE"
            "               'America/New_York')::bigint * 1000 AS before_ms"
            " FROM splits s JOIN coverage c ON c.symbol = s.ticker"
            " WHERE s.applied_at IS NOT NULL AND NOT (c.covered @> int8range(%(first)s,"
            "   extract(epoch FROM s.execution_date::timestamp AT TIME ZONE"
            "           'America/New_York')::bigint * 1000))"
            " ORDER BY s.execution_date", {"first": first_ms}).fetchall()
    out: dict[tuple[str, str], Readjusting] = {}
    for ticker, timeframe, day, split_from, split_to, applied, before in rows:
        if before <= first_ms:
            continue
        kind = "reverse split" if split_from > split_to else "split"
        label = f"{ticker} {kind} {split_to:g}-for-{split_from:g} on {day.isoformat()}"
        out[(ticker, timeframe)] = Readjusting(label, int(before), to_ms(applied))
    return out


@attrs.frozen
class CoverageSummary:
    """A series' coverage at a glance: the first and last covered instant (Unix ms, half-open
    upper bound) and the holes between its spans."""

    first_ms: int
    end_ms: int
    holes: int


def read_coverage_summary(url: str) -> dict[tuple[str, str], CoverageSummary]:
    """Every series' coverage bounds and hole count (from `coverage`, not a scan of `bars`)."""
    with reader(url) as conn:
        rows = conn.execute(
            "SELECT symbol, timeframe, lower(covered), upper(covered),"
            " (SELECT count(*) FROM unnest(covered)) - 1"
            " FROM coverage WHERE NOT isempty(covered)").fetchall()
    return {(s, tf): CoverageSummary(int(lo), int(hi), int(holes))
            for s, tf, lo, hi, holes in rows}


def _ms(value: dt.datetime | None) -> int | None:
    return None if value is None else to_ms(value)


def read_freshness(url: str) -> dict[tuple[str, str], Freshness]:
    """Every series' freshness row, keyed by (symbol, timeframe)."""
    with reader(url) as conn:
        rows = conn.execute(
            "SELECT f.symbol, f.timeframe, last_bar_ts, last_success_at, checked_through,"
            " last_attempt_at, last_error, last_error_at, refused_at, refused_reason,"
            " coalesce(q.n, 0)"
            " FROM series_freshness f LEFT JOIN (SELECT symbol, timeframe, count(*) AS n"
            "   FROM quarantined_bars GROUP BY 1, 2) q"
            " ON q.symbol = f.symbol AND q.timeframe = f.timeframe"
        ).fetchall()
    return {(r[0], r[1]): Freshness(_ms(r[2]), _ms(r[3]), _ms(r[4]), _ms(r[5]), r[6], _ms(r[7]),
                                    _ms(r[8]), r[9], int(r[10]))
            for r in rows}


_EXECUTION_COLUMNS = (
    "id", "instance", "number", "trigger", "status", "started_at", "finished_at",
    "duration_seconds", "jobs_total", "jobs_ok", "jobs_failed", "jobs_cancelled",
    "bars_written", "requests", "rate_limited", "retries", "error",
)


def read_history(url: str, limit: int) -> list[dict[str, Any]]:
    """The `limit` latest executions, newest first, each with its failed jobs and their errors
    (at most HISTORY_FAILED_JOBS listed; `jobs_failed` counts them all)."""
    with reader(url) as conn:
        executions = conn.execute(
            f"SELECT {', '.join(_EXECUTION_COLUMNS)} FROM executions"
            " ORDER BY started_at DESC LIMIT %s", (limit,)
        ).fetchall()
        ids = [row[0] for row in executions]
        failed = conn.execute(
            "SELECT execution_id, symbol, timeframe, error, attempts, pages, bars, finished_at"
            " FROM (SELECT *, row_number() OVER (PARTITION BY execution_id"
            "                                    ORDER BY finished_at DESC, symbol, timeframe) n"
            "       FROM job_results WHERE execution_id = ANY(%s) AND status = 'failed') f"
            " WHERE n <= %s ORDER BY finished_at, symbol, timeframe",
            (ids, HISTORY_FAILED_JOBS),
        ).fetchall() if ids else []
    by_execution: dict[uuid.UUID, list[dict[str, Any]]] = {}
    for eid, symbol, timeframe, error, attempts, pages, bars, finished in failed:
        by_execution.setdefault(eid, []).append({
            "symbol": symbol, "timeframe": timeframe, "error": error, "attempts": attempts,
            "pages": pages, "bars": bars, "finished_at": iso_dt(finished),
        })
    out = []
    for row in executions:
        item = dict(zip(_EXECUTION_COLUMNS, row, strict=True))
        item["id"] = str(item["id"])
        item["started_at"] = iso_dt(item["started_at"])
        item["finished_at"] = iso_dt(item["finished_at"])
        if item["duration_seconds"] is not None:
            item["duration_seconds"] = round(item["duration_seconds"], 3)
        item["failed_jobs"] = by_execution.get(row[0], [])
        out.append(item)
    return out
