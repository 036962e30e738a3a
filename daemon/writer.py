"""The single DB writer: one task, one connection, one transaction per message (or per batch
of the pages queued when it gets to them).

Producers (one per job) send messages over a bounded trio memory channel; when the writer falls
behind, producers wait, so memory does not grow with history length. Messages are plain frozen
data (`PageWrite`, `JobFinished`, and the monitoring rows' `ExecutionStarted` /
`ExecutionFinished`); the writer decides what each means for the database. Each is applied in
its own transaction on a sync psycopg connection driven by `trio.to_thread.run_sync` with the
writer's own limiter (the default `abandon_on_cancel=False` lets a transaction finish before
cancellation lands, so a stop never leaves half a page).

A page is written as binary COPY straight into `bars` when the series holds no bar in the
page's span yet (a backfill: no conflict is possible), else as binary COPY into a temp stage and
from there `INSERT ... ON CONFLICT DO UPDATE` (idempotent on (symbol, timeframe, ts); revised
bars overwrite, unchanged ones are not rewritten); then the page's span joins the series'
coverage (an `int8multirange`), all in one transaction: a crash at any instant leaves coverage
matching the bars, and the next plan (`requested - covered`) fetches exactly what is missing.
Pages already queued behind the one at hand share its transaction (up to BATCH_MAX_PAGES /
BATCH_MAX_BARS): each page's bars still commit with its coverage, and a writer that is behind
pays BEGIN, COMMIT and the round trips once per batch. A batch the database refuses is written
again page by page, so one bad page fails its own job only.

The writer reports back through each job's `Receipt` (daemon.jobs), which it alone changes, on
the trio thread after a commit; it owns its own counters (`statistics()`).

Error handling:
- Connection lost, server restarting (psycopg's OperationalError / InterfaceError: admin
  shutdown, too many connections, disk full...): the transaction rolled back, so the message is
  retried whole on a new connection by the one retry mechanism (daemon.retrying), for as long as
  it takes; producers wait on the full channel meanwhile.
- A statement rejected for its data (DataError, IntegrityError, a value the COPY encoder
  refuses): permanent (in a batch: once the page is written again alone). The job fails
  loudly (`Receipt.write_error`), its later pages are dropped unwritten, and the writer goes
  on; the rejected span stays uncovered, so it is asked again.

Monitoring rows (daemon.monitoring) ride in the same transactions: a page's freshness with its
bars, a job's result row with its JobFinished; so does the features task's work order (the
first bar a page inserted or changed marks its series dirty from there, daemon.features).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import attrs
import psycopg
import trio
from loguru import logger
from tenacity import RetryCallState

from . import db, features, monitoring
from .bars import CopyRows, Quarantined
from .errors import DatabaseUnavailable, redact
from .jobs import FetchResult, JobOutcome, Lease, Receipt, SeriesKey
from .monitoring import ExecutionFinished, ExecutionStarted, JobRow, Prune
from .retrying import DB_MAX_SECONDS, DB_MIN_SECONDS, Backoff, retrying
from .spans import Span
from .splits import Applied, SplitsFound, apply_splits
from .timefmt import wall_clock

__all__ = [
    "WRITE_BUCKETS",
    "JobFinished",
    "Message",
    "PageWrite",
    "QuarantinedSpan",
    "Writer",
    "WriterStatistics",
    "open_writer_channel",
]

# Buckets of the write-latency histogram (seconds): ~5 ms for a small top-up page, ~300 ms for
# 50,000 bars.
WRITE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Pages queued behind the one at hand are written with it, in one transaction, up to these: a
# backfill's writer, when behind, pays BEGIN, COMMIT and the round trips once for several
# pages. Bounded so the lease rows the batch holds are not held for long (~1 s here).
BATCH_MAX_PAGES = 16
BATCH_MAX_BARS = 100_000

_STAGE_DDL = """
CREATE TEMP TABLE IF NOT EXISTS bars_stage (
    symbol text, timeframe text, ts timestamptz, open float8, high float8, low float8,
    close float8, volume float8, vwap float8, trades int8
) ON COMMIT DELETE ROWS
"""
# The same rows (daemon.bars.CopyRows) go to either: `bars` itself for a page of new bars, the
# stage for one that may overlap stored bars.
_COLUMNS = "symbol, timeframe, ts, open, high, low, close, volume, vwap, trades"
_STAGE_COPY = f"COPY bars_stage ({_COLUMNS}) FROM STDIN (FORMAT BINARY)"
_BARS_COPY = f"COPY bars ({_COLUMNS}) FROM STDIN (FORMAT BINARY)"
# The binary COPY file's signature, flags and extension length, and its end marker: the rows
# in between come encoded from the decoding thread (daemon.bars.encode_copy_rows).
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8
_COPY_TRAILER = b"\xff\xff"
# Returns the first bar the page inserted or changed (NULL: nothing changed), from which the
# series' features must be recomputed (daemon.features).
_UPSERT = f"""
WITH changed AS (
INSERT INTO bars AS b ({_COLUMNS})
SELECT {_COLUMNS} FROM bars_stage
ON CONFLICT (symbol, timeframe, ts) DO UPDATE SET
    open = EXCLUDED.open, high = EXCLUDED.high, low = EXCLUDED.low, close = EXCLUDED.close,
    volume = EXCLUDED.volume, vwap = EXCLUDED.vwap, trades = EXCLUDED.trades
WHERE (b.open, b.high, b.low, b.close, b.volume, b.vwap, b.trades)
      IS DISTINCT FROM
      (EXCLUDED.open, EXCLUDED.high, EXCLUDED.low, EXCLUDED.close,
       EXCLUDED.volume, EXCLUDED.vwap, EXCLUDED.trades)
RETURNING ts)
SELECT min(ts) FROM changed
"""
# A page whose bars start where the series holds nothing yet (a backfill, a new sub-range) is
# copied straight into `bars`: no conflict is possible, and PostgreSQL's speculative-insertion
# machinery for ON CONFLICT costs ~40 % of the write (measured: ~380,000 vs ~250,000 rows/s),
# the stage and its INSERT ... SELECT another ~20 %.
_ANY_BETWEEN = """
SELECT EXISTS (SELECT 1 FROM bars WHERE symbol = %(symbol)s AND timeframe = %(timeframe)s
               AND ts BETWEEN %(first)s AND %(last)s)
"""
# Quarantine: this page's bad bars are (re)recorded; entries inside the page's span that it
# did not re-assert were answered well this time (their bars are in the page) and go.
_QUARANTINE = """
INSERT INTO quarantined_bars AS q (symbol, timeframe, span, t, raw, reason)
VALUES (%(symbol)s, %(timeframe)s, int8range(%(lo)s, %(hi)s), %(t)s, %(raw)s, %(reason)s)
ON CONFLICT (symbol, timeframe, span) DO UPDATE SET
    t = EXCLUDED.t, raw = EXCLUDED.raw, reason = EXCLUDED.reason, last_seen = now(),
    times_seen = q.times_seen + 1
"""
_UNQUARANTINE = """
DELETE FROM quarantined_bars
WHERE symbol = %(symbol)s AND timeframe = %(timeframe)s AND span && int8range(%(lo)s, %(hi)s)
  AND last_seen < now()
"""
# The page's span joins the series' coverage (a set: order and overlaps do not matter), less
# every quarantined spot in it, so the next plan asks for those again.
_COVER = """
WITH holes AS (
    SELECT coalesce(range_agg(span), '{}'::int8multirange) AS spans FROM quarantined_bars
    WHERE symbol = %(symbol)s AND timeframe = %(timeframe)s
      AND span && int8range(%(lo)s, %(hi)s))
INSERT INTO coverage AS c (symbol, timeframe, covered, updated_at)
SELECT %(symbol)s, %(timeframe)s, int8multirange(int8range(%(lo)s, %(hi)s)) - holes.spans, now()
FROM holes
ON CONFLICT (symbol, timeframe) DO UPDATE SET
    covered = (c.covered + int8multirange(int8range(%(lo)s, %(hi)s)))
              - (SELECT spans FROM holes),
    updated_at = now()
"""


@attrs.frozen
class PageWrite:
    """A page of bars of one series, and the span it proves complete.

    Attributes:
        series: Whose bars.
        rows: The page's valid bars, encoded for the stage's binary COPY (daemon.bars.CopyRows);
            may be empty (a span with no trades is still a span whose bars are all known).
        span: `[lo, hi)` in Unix ms: every bar of the series starting in it is in this page
            (or in no answer at all). It joins the series' coverage in the page's transaction.
        receipt: The job's receipt, where the writer reports the commit.
        quarantined: The page's bad bars, each with the span it holds out of coverage.
        lease: The series' lease (daemon.leases); the page is written only while it holds.
    """

    series: SeriesKey
    rows: CopyRows
    span: Span
    receipt: Receipt
    quarantined: tuple[QuarantinedSpan, ...] = ()
    lease: Lease | None = None  # checked in the page's transaction (None: no scale-out)


@attrs.frozen
class QuarantinedSpan:
    """A quarantined bar of a page: `span` is its `[t, t+1)`, or the page's whole span when its
    place is unknown (no usable `t`)."""

    span: Span
    bar: Quarantined


@attrs.frozen
class JobFinished:
    """The job's last message: every page before it is committed once this one is."""

    series: SeriesKey
    fetch: FetchResult
    receipt: Receipt
    lease: Lease | None = None  # released in the job's transaction


Message = (PageWrite | JobFinished | ExecutionStarted | ExecutionFinished | Prune
           | SplitsFound)


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
    # The write-latency histogram: cumulative counts per WRITE_BUCKETS bound, then the sum.
    write_buckets: tuple[int, ...] = ()
    write_seconds_sum: float = 0.0
    plain_pages: int = 0  # pages inserted plainly (no bar of the series in their span yet)
    splits_applied: int = 0  # splits that rescaled (and sent for re-fetching) stored history
    lease_refusals: int = 0  # pages not written: their lease had gone to another instance


def open_writer_channel(
    capacity: int,
) -> tuple[trio.MemorySendChannel[Message], trio.MemoryReceiveChannel[Message]]:
    """The bounded channel producers use to reach the writer."""
    return trio.open_memory_channel[Message](capacity)


class _Rejected(Exception):
    """The database (or the COPY encoder) refused a message for its content: permanent."""


class _LeaseLost(Exception):
    """The page's lease is not this instance's any more: another one took the series over."""


# Fencing: the page commits only while its (holder, fence) still holds the series' lease; the
# row lock makes a takeover wait for this transaction, or this transaction see the takeover.
_FENCE = """
SELECT 1 FROM series_leases WHERE symbol = %(symbol)s AND timeframe = %(timeframe)s
  AND holder = %(holder)s AND fence = %(fence)s FOR SHARE
"""
# The job's last transaction gives the lease back (if still its own), saying whether the
# series ended up to date.
_RELEASE = """
UPDATE series_leases SET holder = NULL, expires_at = NULL,
    done_at = CASE WHEN %(done)s THEN now() ELSE done_at END,
    done_by = CASE WHEN %(done)s THEN %(holder)s ELSE done_by END
WHERE symbol = %(symbol)s AND timeframe = %(timeframe)s AND holder = %(holder)s
  AND fence = %(fence)s
"""


class Writer:
    """Owns the one writing connection; `run` consumes the channel until every sender closes.

    Args:
        url: The database.
        receive: The channel's receiving end.
        on_commit: Called (on the trio thread) after each committed page: the composition root
            wires listeners here (the features task's wake-up).
        instance_id: This process's id (daemon.leases), recorded with each job's result.
        on_release: Called with a series once its job's lease release is committed.
        idle_transaction_seconds: The server ends this connection's transaction when the writer
            sits inside one this long (a frozen process holding a lease row's lock would
            otherwise keep every other instance from taking its series over).
    """

    def __init__(
        self,
        url: str,
        receive: trio.MemoryReceiveChannel[Message],
        *,
        on_commit: Callable[[], None] | None = None,
        instance_id: str | None = None,
        on_release: Callable[[SeriesKey], None] | None = None,
        idle_transaction_seconds: float | None = None,
    ) -> None:
        self._url = url
        self._receive = receive
        self._on_commit = on_commit
        self._instance_id = instance_id
        self._on_release = on_release
        self._idle_ms = None if idle_transaction_seconds is None else max(
            1, round(idle_transaction_seconds * 1000))
        self._lease_refusals = 0
        self._conn: psycopg.Connection | None = None
        self._limiter = trio.CapacityLimiter(1)
        self._partitions: set[int] = set()
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
        self._buckets = [0] * len(WRITE_BUCKETS)
        self._plain_pages = 0  # pages inserted without ON CONFLICT (nothing there yet)
        self._applied: list[Applied] = []  # splits the current transaction applied
        self._splits_applied = 0
        self._seconds_sum = 0.0

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
            write_buckets=tuple(self._buckets),
            write_seconds_sum=self._seconds_sum,
            plain_pages=self._plain_pages,
            splits_applied=self._splits_applied,
            lease_refusals=self._lease_refusals,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, report started, then write every message until the channel closes."""
        self._last_progress = trio.current_time()
        await self._retrying(self._ensure_connected)
        task_status.started()
        try:
            async with self._receive:
                held: Message | None = None  # taken from the channel, not yet handled
                while True:
                    if held is not None:
                        message, held = held, None
                    else:
                        try:
                            message = await self._receive.receive()
                        except trio.EndOfChannel:
                            break
                    if isinstance(message, PageWrite):
                        batch, held = self._take_batch(message)
                        await self._handle_pages(batch)
                    else:
                        await self._handle(message)
                    self._last_progress = trio.current_time()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._close, limiter=self._limiter)

    # --- one message, or a batch of pages -------------------------------------------------

    def _take_batch(self, first: PageWrite) -> tuple[list[PageWrite], Message | None]:
        """`first` and the pages queued right behind it, to be written in one transaction; and
        the message that ended the batch, if one was taken (it is handled next). Never waits:
        a lone page is written at once. A batch ends before a message that is not a page and
        before a page overlapping one already in it (its overlap probe and quarantine clean-up
        must see that page committed)."""
        batch, bars = [first], first.rows.count
        while len(batch) < BATCH_MAX_PAGES and bars < BATCH_MAX_BARS:
            try:
                message = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            if not isinstance(message, PageWrite) or any(
                    page.series == message.series and _overlap(page.span, message.span)
                    for page in batch):
                return batch, message
            batch.append(message)
            bars += message.rows.count
        return batch, None

    async def _handle_pages(self, batch: list[PageWrite]) -> None:
        """Write `batch` in one transaction; when the database refuses it (one page's data, or
        one lost lease), nothing of it was written: each page is then written on its own, so
        the good ones land and the refused one fails its job alone."""
        pages = [page for page in batch if not _skipped(page)]
        if len(pages) <= 1:
            for page in pages:
                await self._handle(page)
            return
        self._busy_since = trio.current_time()
        try:
            seconds = await self._retrying(self._transaction, pages, None)
        except (_Rejected, _LeaseLost):
            for page in pages:
                await self._handle(page)
            return
        finally:
            self._busy_since = None
        self._transactions += 1
        self._last_seconds = seconds
        weight = sum(page.rows.count + 1 for page in pages)
        for page in pages:  # each page is charged its share of the transaction, by bars
            self._committed(page, seconds * (page.rows.count + 1) / weight, None)

    async def _handle(self, message: Message) -> None:
        if isinstance(message, PageWrite) and _skipped(message):
            return  # a page after a rejected one: writing it would leave a hole behind it
        outcome = None
        if isinstance(message, JobFinished):
            outcome = message.fetch.outcome(message.receipt.write_error,
                                            lease_lost=message.receipt.lease_lost)
        self._busy_since = trio.current_time()
        try:
            seconds = await self._retrying(self._transaction, message, outcome)
        except _Rejected as exc:
            self._reject(message, str(exc))
            return
        except _LeaseLost as exc:
            assert isinstance(message, PageWrite)
            message.receipt.lease_lost = True
            self._lease_refusals += 1
            logger.bind(symbol=message.series.symbol, timeframe=message.series.timeframe
                        ).warning("{}: another instance took the series over; this page and "
                                  "the job's later ones are not written", exc)
            return
        finally:
            self._busy_since = None
        self._transactions += 1
        self._last_seconds = seconds
        self._committed(message, seconds, outcome)

    async def _retrying(self, fn: Callable[..., float | None], *args: object) -> float:
        """Run `fn(*args)` in the writer's thread until it does not raise DatabaseUnavailable:
        reconnecting is part of each attempt, so an outage has one backoff schedule, not two."""
        backoff = Backoff(DB_MIN_SECONDS, DB_MAX_SECONDS)

        def wait(state: RetryCallState) -> float:
            return backoff(state.attempt_number)

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            logger.warning("database write failed, retrying in {:.1f} s: {}",
                           state.upcoming_sleep or 0.0, exc)

        def unavailable(exc: BaseException) -> bool:
            return isinstance(exc, DatabaseUnavailable)

        async for attempt in retrying(wait=wait, before_sleep=before_sleep,
                                      retry_on=unavailable):
            with attempt:
                result = await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
                return result or 0.0
        raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover

    def _transaction(self, message: Message | list[PageWrite],
                     outcome: JobOutcome | None) -> float:
        """Apply `message` (or a batch of pages) in one transaction (worker thread); return its
        duration.

        Error handling: raises DatabaseUnavailable (connection closed, retried), _LeaseLost, or
        _Rejected (permanent, with the redacted reason).
        """
        self._ensure_connected()
        conn = self._conn
        assert conn is not None
        started = time.perf_counter()
        pages = message if isinstance(message, list) else (
            [message] if isinstance(message, PageWrite) else [])
        try:
            # Before the pages' transaction, not in it: waiting there for the table's lock
            # would hold the lease row (and so lease renewal) meanwhile.
            years = {year for page in pages if page.rows.count for year in _years(page.rows)}
            if not years <= self._partitions:
                db.ensure_partitions(conn, "bars", years - self._partitions)
                self._partitions |= years
            if pages:
                self._write_pages(conn, pages)
            else:
                assert not isinstance(message, list)
                with conn.transaction(), conn.cursor() as cur:
                    self._apply(cur, message, outcome)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            # The connection broke or the server is going away: retry the whole message.
            self._close()
            raise DatabaseUnavailable(redact(str(exc)).strip()) from None
        except _LeaseLost:
            raise
        except (psycopg.Error, OverflowError, ValueError, TypeError) as exc:
            what = (f"{len(pages)} pages" if len(pages) > 1 else "page" if pages
                    else type(message).__name__)
            raise _Rejected(f"database rejected the {what}: {redact(str(exc)).strip()}") from None
        return time.perf_counter() - started

    def _apply(self, cur: psycopg.Cursor, message: Message, outcome: JobOutcome | None) -> None:
        if isinstance(message, JobFinished):
            assert outcome is not None
            monitoring.record_job(cur, self._job_row(message, outcome),
                                  message.receipt.execution_id, self._instance_id)
            if message.lease is not None:
                cur.execute(_RELEASE, {
                    "symbol": message.series.symbol, "timeframe": message.series.timeframe,
                    "holder": message.lease.holder, "fence": message.lease.fence,
                    "done": outcome in (JobOutcome.OK, JobOutcome.NOT_ENTITLED)})
        elif isinstance(message, ExecutionStarted):
            monitoring.record_execution_started(cur, message)
        elif isinstance(message, Prune):
            monitoring.prune(cur, message)
        elif isinstance(message, SplitsFound):
            self._applied = apply_splits(cur, message)
        else:
            assert isinstance(message, ExecutionFinished), "pages go through _write_pages"
            monitoring.record_execution_finished(cur, message)

    def _write_pages(self, conn: psycopg.Connection, pages: list[PageWrite]) -> None:
        """The pages in one transaction, in 2 + n round trips (more for overlapping pages):
        BEGIN with every lease and overlap check; each page's COPY; every page's freshness,
        features marker, quarantine and coverage statements with the COMMIT. Pipelined
        (psycopg's pipeline mode): on a busy 2-core box each round trip waits for the server
        process to be scheduled. A page alone took 9 round trips once, 3 now; the pages queued
        behind it share the rest (daemon's e2e profile: BEGIN, COMMIT and the small statements
        were ~17 % of the writer's time at one page a transaction).
        """
        try:
            with contextlib.ExitStack() as cursors:
                def cursor() -> psycopg.Cursor:
                    return cursors.enter_context(conn.cursor())
                plain = self._pages_statements(conn, cursor, pages)
        except BaseException:
            if not conn.closed:
                conn.rollback()
            raise
        self._plain_pages += plain

    @staticmethod
    def _pages_statements(conn: psycopg.Connection, cursor: Callable[[], psycopg.Cursor],
                          pages: list[PageWrite]) -> int:
        """Returns how many pages were copied straight into `bars`. `cursor()` gives a new
        cursor (closed with the transaction): a pipeline keeps only each cursor's last result,
        so every fence and probe has its own."""
        for page in pages:
            if page.rows.count and page.rows.series != (page.series.symbol,
                                                        page.series.timeframe):
                raise _Rejected(f"the page's rows are of {'/'.join(page.rows.series)}, "
                                f"not of {page.series}")  # a bug upstream: write nothing
        cur = cursor()
        leases = list(dict.fromkeys([(page.series, page.lease) for page in pages
                                     if page.lease is not None]))
        fences = [cursor() for _ in leases]
        probes = [cursor() for _ in pages]
        with conn.pipeline():  # BEGIN goes first, implicitly
            for (series, lease), fence in zip(leases, fences, strict=True):
                fence.execute(_FENCE, {**_key(series), "holder": lease.holder,
                                       "fence": lease.fence})
            for page, probe in zip(pages, probes, strict=True):
                if page.rows.count:
                    first, last = _ends(page.rows)
                    probe.execute(_ANY_BETWEEN, {**_key(page.series), "first": db.from_ms(first),
                                                 "last": db.from_ms(last)})
        for (series, lease), fence in zip(leases, fences, strict=True):
            if fence.fetchone() is None:
                raise _LeaseLost(f"{series}: the lease is lost (fence {lease.fence})")
        plain_pages = 0
        staged = False  # the stage holds an earlier page's rows (it empties at COMMIT only)
        changed: list[tuple[str, str, int]] = []
        for page, probe in zip(pages, probes, strict=True):
            rows = page.rows
            if not rows.count:
                continue
            taken = probe.fetchone()
            plain = taken is not None and not taken[0]
            if not plain and staged:
                cur.execute("TRUNCATE bars_stage")
            with cur.copy(_BARS_COPY if plain else _STAGE_COPY) as copy:
                copy.write(_COPY_HEADER)
                copy.write(rows.payload)
                copy.write(_COPY_TRAILER)
            if plain:
                plain_pages += 1
                changed.append((page.series.symbol, page.series.timeframe, _ends(rows)[0]))
            else:
                staged = True
                row = cur.execute(_UPSERT).fetchone()
                if row is not None and row[0] is not None:
                    changed.append((page.series.symbol, page.series.timeframe,
                                    db.to_ms(row[0])))
        with conn.pipeline():
            features.mark_dirty(cur, changed)
            for page in pages:
                key = _key(page.series)
                if page.rows.count:
                    monitoring.record_page(cur, page.series, _ends(page.rows)[1])
                if page.quarantined:
                    cur.executemany(_QUARANTINE, [
                        {**key, "lo": q.span[0], "hi": q.span[1], "t": q.bar.t,
                         "raw": q.bar.raw, "reason": q.bar.reason} for q in page.quarantined])
                lo, hi = page.span
                if lo < hi:
                    cur.execute(_UNQUARANTINE, {**key, "lo": lo, "hi": hi})
                    cur.execute(_COVER, {**key, "lo": lo, "hi": hi})
            conn.commit()
        return plain_pages

    @staticmethod
    def _job_row(message: JobFinished, outcome: JobOutcome) -> JobRow:
        fetch, receipt = message.fetch, message.receipt
        return JobRow(
            message.series.symbol, message.series.timeframe, outcome, fetch.from_ms, fetch.to_ms,
            receipt.bars_written, fetch.pages, fetch.attempts, fetch.api_seconds,
            receipt.db_seconds, receipt.write_error or fetch.error,
            quarantined=receipt.bars_quarantined, refused=fetch.refused, asked=fetch.asked)

    # --- after the transaction (trio thread) -----------------------------------------------

    def _committed(self, message: Message, seconds: float, outcome: JobOutcome | None) -> None:
        if isinstance(message, PageWrite):
            rows = message.rows
            receipt = message.receipt
            receipt.bars_written += rows.count
            receipt.pages_written += 1
            receipt.bars_quarantined += len(message.quarantined)
            receipt.db_seconds += seconds
            self._pages += 1
            self._bars += rows.count
            self._observe(seconds)
            if self._on_commit is not None:
                self._on_commit()
        elif isinstance(message, SplitsFound):
            for applied in self._applied:
                self._splits_applied += 1
                counts = ", ".join(f"{n} {tf}" for tf, n in sorted(applied.bars.items()))
                logger.bind(symbol=applied.split.ticker, timeframe="*").warning(
                    "{}: rescaled the bars before it ({}) and re-fetching that history so "
                    "the adjusted series is exactly what the API serves now",
                    applied.split, counts or "none stored")
            self._applied = []
            self._finish(message.receipt, JobOutcome.OK)
        elif isinstance(message, JobFinished):
            message.receipt.db_seconds += seconds
            if message.lease is not None and self._on_release is not None:
                self._on_release(message.series)
            if outcome is JobOutcome.FAILED:
                error = message.receipt.write_error or message.fetch.error
                self._note_error(f"{message.series}: {error}")
            self._finish(message.receipt, outcome)

    def _reject(self, message: Message, error: str) -> None:
        self._errors += 1
        if isinstance(message, SplitsFound):
            self._applied = []
            self._note_error(error)
            logger.error(error)
            self._finish(message.receipt, JobOutcome.FAILED)
        elif isinstance(message, PageWrite | JobFinished):
            receipt = message.receipt
            receipt.write_error = receipt.write_error or error
            self._note_error(f"{message.series}: {error}")
            logger.bind(symbol=message.series.symbol,
                        timeframe=message.series.timeframe).error(error)
            if isinstance(message, JobFinished):
                # its producer waits for this, and nothing else would release it
                self._finish(receipt, JobOutcome.FAILED)
        else:
            self._note_error(error)
            logger.error(error)

    @staticmethod
    def _finish(receipt: Receipt, outcome: JobOutcome | None) -> None:
        receipt.outcome = outcome
        receipt.finished.set()

    def _note_error(self, text: str) -> None:
        self._last_error = (wall_clock(), text)

    def _observe(self, seconds: float) -> None:
        self._seconds_sum += seconds
        for i, bound in enumerate(WRITE_BUCKETS):
            if seconds <= bound:
                self._buckets[i] += 1

    # --- the connection (worker thread) ----------------------------------------------------

    def _ensure_connected(self) -> None:
        if self._conn is not None and not self._conn.closed:
            return
        conn = db.connect(self._url)  # DatabaseUnavailable when the server is not there
        try:
            if self._idle_ms is not None:
                conn.execute(f"SET idle_in_transaction_session_timeout = {self._idle_ms:d}")
            conn.execute(_STAGE_DDL)
            conn.commit()
        except psycopg.Error as exc:
            conn.close()
            # Waited out like an unreachable server: the writer has nothing else to do.
            raise DatabaseUnavailable(f"cannot prepare the writer's stage table: {exc}") from None
        if self._ever_connected:
            self._reconnects += 1
        self._ever_connected = True
        self._conn = conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _key(series: SeriesKey) -> dict[str, str]:
    return {"symbol": series.symbol, "timeframe": series.timeframe}


def _ends(rows: CopyRows) -> tuple[int, int]:
    """The first and last bar's t of a page, whichever its order."""
    return min(rows.first_t, rows.last_t), max(rows.first_t, rows.last_t)


def _overlap(a: Span, b: Span) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _skipped(page: PageWrite) -> bool:
    """A page of a job that already failed or lost its lease: writing it would leave a hole
    behind it."""
    return page.receipt.write_error is not None or page.receipt.lease_lost


def _years(rows: CopyRows) -> range:
    lo, hi = _ends(rows)
    return range(time.gmtime(lo // 1000).tm_year, time.gmtime(hi // 1000).tm_year + 1)
