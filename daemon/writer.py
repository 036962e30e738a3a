"""The single DB writer: one task, one connection, one transaction per message.

Producers (one per job) send messages over a bounded trio memory channel; when the writer falls
behind, producers wait, so memory does not grow with history length. Each message is applied in
its own transaction on a sync psycopg connection driven by `trio.to_thread.run_sync` with the
writer's own limiter (the default `abandon_on_cancel=False` lets a transaction finish before
cancellation lands, so a stop never leaves half a page).

A page is written as binary COPY into a temp stage, then `INSERT ... ON CONFLICT DO UPDATE` into
`bars` (idempotent on (symbol, timeframe, ts); revised bars overwrite, unchanged ones are not
rewritten), then the job's checkpoint, all in one transaction: a crash at any instant resumes
from the last committed page.

Error handling:
- Connection lost, server restarting: reconnect with capped backoff and retry the same message
  (idempotent), for as long as it takes; producers wait on the full channel meanwhile.
- A statement rejected for its data: the job is marked failed (`JobState.write_error`), its later
  pages are dropped unwritten so its checkpoint never passes the hole, and the writer goes on.

Monitoring rows (daemon.monitoring) ride in the same transactions: a page's freshness with its
bars, a job's result row with its JobDone.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Protocol

import attrs
import psycopg
import trio
from loguru import logger

from . import db, monitoring
from .bars import Bar
from .errors import DatabaseUnavailable, redact

__all__ = ["JobDone", "JobState", "PageWrite", "Writer", "WriterStatistics", "open_writer_channel"]

_STAGE_DDL = """
CREATE TEMP TABLE IF NOT EXISTS bars_stage (
    ts_ms bigint, open float8, high float8, low float8, close float8,
    volume float8, vwap float8, trades int8
) ON COMMIT DELETE ROWS
"""
_STAGE_COPY = (
    "COPY bars_stage (ts_ms, open, high, low, close, volume, vwap, trades)"
    " FROM STDIN (FORMAT BINARY)"
)
_STAGE_TYPES = ["int8", "float8", "float8", "float8", "float8", "float8", "float8", "int8"]
_UPSERT = """
INSERT INTO bars AS b (symbol, timeframe, ts, open, high, low, close, volume, vwap, trades)
SELECT %(symbol)s, %(timeframe)s, 'epoch'::timestamptz + ts_ms * interval '1 millisecond',
       open, high, low, close, volume, vwap, trades
FROM bars_stage
ON CONFLICT (symbol, timeframe, ts) DO UPDATE SET
    open = EXCLUDED.open, high = EXCLUDED.high, low = EXCLUDED.low, close = EXCLUDED.close,
    volume = EXCLUDED.volume, vwap = EXCLUDED.vwap, trades = EXCLUDED.trades
WHERE (b.open, b.high, b.low, b.close, b.volume, b.vwap, b.trades)
      IS DISTINCT FROM
      (EXCLUDED.open, EXCLUDED.high, EXCLUDED.low, EXCLUDED.close,
       EXCLUDED.volume, EXCLUDED.vwap, EXCLUDED.trades)
"""
# Extend the span only when the page touches it; a page before a gap leaves it as it is (the
# next plan then fetches from the start again, which is the only way to close the gap).
_CHECKPOINT = """
INSERT INTO checkpoints AS c (symbol, timeframe, covered_from, covered_through, updated_at)
VALUES (%(symbol)s, %(timeframe)s, %(covered_from)s, %(covered_through)s, now())
ON CONFLICT (symbol, timeframe) DO UPDATE SET
    covered_from = LEAST(c.covered_from, EXCLUDED.covered_from),
    covered_through = GREATEST(c.covered_through, EXCLUDED.covered_through),
    updated_at = now()
WHERE EXCLUDED.covered_from <= c.covered_through + interval '1 millisecond'
  AND EXCLUDED.covered_through >= c.covered_from - interval '1 millisecond'
"""


@attrs.define(eq=False)
class JobState:
    """One job's progress, shared by its producer (scheduler) and the writer.

    The producer reads `write_error` to stop early; `done` is set by the writer once every
    message of the job before its JobDone has been committed (or dropped).
    """

    symbol: str
    timeframe: str
    from_ms: int
    to_ms: int
    bars_written: int = 0
    pages_written: int = 0
    pages_fetched: int = 0
    attempts: int = 0
    api_seconds: float = 0.0
    db_seconds: float = 0.0
    fetch_error: str | None = None
    write_error: str | None = None
    cancelled: bool = False
    execution_id: uuid.UUID | None = None  # the cycle's `executions` row, when there is one
    done: trio.Event = attrs.field(factory=trio.Event)

    @property
    def ok(self) -> bool:
        return self.fetch_error is None and self.write_error is None and not self.cancelled

    @property
    def error(self) -> str | None:
        return self.write_error or self.fetch_error


class Message(Protocol):
    """What the writer accepts: `apply` runs in a worker thread inside a transaction,
    `committed` back in trio after the commit. `job` is None for a message that belongs to no
    job (daemon.monitoring's execution rows)."""

    @property
    def job(self) -> JobState | None: ...

    def apply(self, cur: psycopg.Cursor, writer: Writer) -> None: ...

    def committed(self, writer: Writer, seconds: float) -> None: ...


@attrs.frozen
class PageWrite:
    """A page of bars for one job, plus the checkpoint it earns."""

    job: JobState
    bars: list[Bar]

    def apply(self, cur: psycopg.Cursor, writer: Writer) -> None:
        bars = self.bars
        first, last = bars[0].t, bars[-1].t
        for year in range(_year(min(first, last)), _year(max(first, last)) + 1):
            if year not in writer.partitions:
                cur.execute("SELECT bars_ensure_partition(%s)", (year,))
        with cur.copy(_STAGE_COPY) as copy:
            copy.set_types(_STAGE_TYPES)
            write_row = copy.write_row
            for bar in bars:
                write_row((bar.t, bar.o, bar.h, bar.l, bar.c, bar.v, bar.vw, bar.n))
        key = {"symbol": self.job.symbol, "timeframe": self.job.timeframe}
        cur.execute(_UPSERT, key)
        cur.execute(
            _CHECKPOINT,
            {
                **key,
                "covered_from": db.from_ms(self.job.from_ms),
                "covered_through": db.from_ms(max(last, first)),
            },
        )
        monitoring.record_page(cur, self.job, max(first, last))

    def committed(self, writer: Writer, seconds: float) -> None:
        first, last = self.bars[0].t, self.bars[-1].t
        writer.partitions.update(range(_year(min(first, last)), _year(max(first, last)) + 1))
        self.job.bars_written += len(self.bars)
        self.job.pages_written += 1
        self.job.db_seconds += seconds
        writer.count_page(len(self.bars), seconds)


@attrs.frozen
class JobDone:
    """The job's last message: every page before it is committed once this one is."""

    job: JobState

    def apply(self, cur: psycopg.Cursor, writer: Writer) -> None:
        del writer  # the marker orders completion after the pages; it records the result
        monitoring.record_job_done(cur, self.job)

    def committed(self, writer: Writer, seconds: float) -> None:
        self.job.db_seconds += seconds
        if not self.job.ok and not self.job.cancelled:
            writer.note_error(f"{self.job.symbol} {self.job.timeframe}: {self.job.error}")
        self.job.done.set()


def _year(ms: int) -> int:
    return time.gmtime(ms // 1000).tm_year


@attrs.frozen
class WriterStatistics:
    connected: bool
    queue_depth: int
    queue_capacity: int
    pages_written: int
    bars_written: int
    transactions: int
    write_errors: int
    reconnects: int
    last_write_seconds: float | None
    busy_since: float | None  # trio time the current write began; None when idle
    last_progress: float  # trio time of the last commit or of going idle
    last_error: str | None = None  # the last failed job or rejected write, for /status
    last_error_at: float | None = None  # its wall time (Unix seconds)


def open_writer_channel(
    capacity: int,
) -> tuple[trio.MemorySendChannel[Message], trio.MemoryReceiveChannel[Message]]:
    """The bounded channel producers use to reach the writer."""
    return trio.open_memory_channel[Message](capacity)


class Writer:
    """Owns the one writing connection; `run` consumes the channel until every sender closes."""

    def __init__(
        self,
        url: str,
        receive: trio.MemoryReceiveChannel[Message],
        *,
        on_commit: Callable[[int, float], None] | None = None,
    ) -> None:
        self._url = url
        self._receive = receive
        self._conn: psycopg.Connection | None = None
        self._limiter = trio.CapacityLimiter(1)
        # Called after each page commits with (bars, seconds): daemon.metrics sets it.
        self.on_commit = on_commit
        self.partitions: set[int] = set()
        self._pages = 0
        self._bars = 0
        self._transactions = 0
        self._errors = 0
        self._reconnects = 0
        self._ever_connected = False
        self._last_seconds: float | None = None
        self._busy_since: float | None = None
        self._last_progress = 0.0
        self._last_error: tuple[float, str] | None = None

    def statistics(self) -> WriterStatistics:
        stats = self._receive.statistics()
        return WriterStatistics(
            connected=self._conn is not None and not self._conn.closed,
            queue_depth=stats.current_buffer_used,
            queue_capacity=int(stats.max_buffer_size),
            pages_written=self._pages,
            bars_written=self._bars,
            transactions=self._transactions,
            write_errors=self._errors,
            reconnects=self._reconnects,
            last_write_seconds=self._last_seconds,
            busy_since=self._busy_since,
            last_progress=self._last_progress,
            last_error=self._last_error[1] if self._last_error else None,
            last_error_at=self._last_error[0] if self._last_error else None,
        )

    def note_error(self, text: str) -> None:
        """Remember `text` as the last error (a failed job, a rejected write)."""
        self._last_error = (time.time(), text)

    def count_page(self, bars: int, seconds: float) -> None:
        self._pages += 1
        self._bars += bars
        if self.on_commit is not None:
            self.on_commit(bars, seconds)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, report started, then write every message until the channel closes."""
        self._last_progress = trio.current_time()
        await self._ensure_connected()
        task_status.started()
        try:
            async with self._receive:
                async for message in self._receive:
                    await self._write(message)
                    self._last_progress = trio.current_time()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._close, limiter=self._limiter)

    async def _write(self, message: Message) -> None:
        job = message.job
        if isinstance(message, PageWrite) and message.job.write_error is not None:
            return  # a page after a rejected one: writing it would leave a hole behind it
        delay = db.RETRY_MIN_SECONDS
        while True:
            await self._ensure_connected()
            self._busy_since = trio.current_time()
            started = time.perf_counter()
            try:
                await trio.to_thread.run_sync(self._apply, message, limiter=self._limiter)
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                # The connection broke or the server is going away: retry the whole message.
                logger.warning("database write failed, retrying in {:.1f} s: {}", delay,
                               redact(str(exc)).strip())
                await trio.to_thread.run_sync(self._close, limiter=self._limiter)
                await trio.sleep(delay)
                delay = min(delay * 2, db.RETRY_MAX_SECONDS)
                continue
            except (psycopg.Error, OverflowError, ValueError, TypeError) as exc:
                # Rejected data (by the server, or by the COPY encoder before it was sent).
                self._errors += 1
                what = "page" if isinstance(message, PageWrite) else type(message).__name__
                error = f"database rejected the {what}: {redact(str(exc)).strip()}"
                self.note_error(error if job is None else f"{job.symbol} {job.timeframe}: {error}")
                if job is None:
                    logger.error(error)
                    return
                job.write_error = error
                logger.bind(symbol=job.symbol, timeframe=job.timeframe).error(job.write_error)
                if isinstance(message, JobDone):
                    job.done.set()  # its producer waits for this, and nothing else would set it
                return
            finally:
                self._busy_since = None
            seconds = time.perf_counter() - started
            self._transactions += 1
            self._last_seconds = seconds
            message.committed(self, seconds)
            return

    def _apply(self, message: Message) -> None:
        conn = self._conn
        assert conn is not None
        with conn.transaction(), conn.cursor() as cur:
            message.apply(cur, self)

    async def _ensure_connected(self) -> None:
        if self._conn is None or self._conn.closed:
            self._conn = await db.run_when_available(self._connect, limiter=self._limiter)

    def _connect(self) -> psycopg.Connection:
        conn = db.connect(self._url)
        try:
            conn.execute(_STAGE_DDL)
            conn.commit()
        except psycopg.Error as exc:
            conn.close()
            # Retried like an unreachable server, as before: the writer has nothing else to do.
            raise DatabaseUnavailable(f"cannot prepare the writer's stage table: {exc}") from None
        if self._ever_connected:
            self._reconnects += 1
        self._ever_connected = True
        return conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
