"""The scheduler: plans jobs from checkpoints and runs them, cycle after cycle, forever.

A job is `(symbol, timeframe, from, to)`. A cycle plans one job per configured series, starting
where the series' checkpoint ends (less `overlap_bars`, because the vendor revises recent bars),
and runs the symbols under `CapacityLimiter(max_concurrent_symbols)`, started with staggered
`start_soon`. The timeframes of a symbol run concurrently, so requests in flight can reach
rate x latency (the API's rate limiter, not this module, decides how fast requests go).

Stagger is a minimum spacing between symbol starts, not a sleep after each: a symbol whose slot
frees late starts at once, so staggering smooths the start without adding idle time.

After the first full cycle, top-ups run every `refresh_minutes`; a reload that adds series wakes
the scheduler, and series added mid-cycle join the running cycle (a symbol already running plans
its new timeframes when its current jobs end); a reload of `refresh_minutes` moves the pending
wake-up. On `request_stop` no symbol starts any more, and a job whose next request the closed
rate limiter refuses (`trio.ClosedResourceError`) ends as cancelled, not failed.

Each cycle is an execution (daemon.monitoring): its row is sent to the writer before its first
job and its totals after its last, through the same channel as the pages, with the requests,
429s and retries it cost counted as deltas of the client's statistics.

The scheduler's working state is its own; `statistics()` hands out frozen snapshots
(daemon.cycles) for everything that reports.

Error handling: a job's API or data failure is recorded on the job and the cycle goes on; an
ApiAuthError fails the rest of the cycle at once (every request would be refused the same way).
A cycle cut short (stop, cancellation) still sends its totals, as 'interrupted', if the writer
takes them within `FINISH_SEND_SECONDS`.
"""

from __future__ import annotations

import collections
import datetime as dt
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from functools import partial
from typing import Protocol

import attrs
import trio
from loguru import logger

from .bars import Quarantined, encode_copy_rows
from .config import Config
from .cycles import (
    CycleSnapshot,
    ExecutionStatus,
    JobSnapshot,
    SchedulerState,
    SchedulerStatistics,
    SymbolState,
)
from .db import SeriesState
from .errors import ApiError, ApiKeyRefused, DatabaseError, NotEntitled
from .jobs import FetchResult, JobOutcome, Lease, Receipt, SeriesKey
from .leases import Coordinator
from .monitoring import ExecutionFinished, ExecutionStarted, JobRow, Prune
from .planning import FetchRange, plan_series, split_range
from .polygon import ClientStatistics, Page
from .ratelimit import UNLIMITED_CEILING_PER_MINUTE
from .splits import Split, SplitsFound
from .timefmt import wall_clock
from .timeframes import Timeframe
from .writer import JobFinished, Message, PageWrite, QuarantinedSpan

__all__ = ["Job", "PageSource", "Scheduler"]

# How long an interrupted cycle waits for room in the writer's channel to record its end.
FINISH_SEND_SECONDS = 1.0
# A series the API refused (not entitled) is asked again after this long, not every cycle.
REFUSAL_RETRY_SECONDS = 86_400.0
# A failed series is retried after 1 minute, then 2, 4 ... up to refresh_minutes.
RETRY_FIRST_SECONDS = 60.0
# Splits are asked for at most this often (and at every cycle otherwise), with this many days
# of execution dates again before the last check (a split listed late is still caught).
SPLITS_EVERY_SECONDS = 300.0
SPLITS_LOOKBACK_DAYS = 7
# Monitoring rows past `[monitoring] retention_days` are pruned at most this often.
PRUNE_EVERY_SECONDS = 3600.0


class PageSource(Protocol):
    """What the scheduler needs of the API client (daemon.polygon.PolygonClient)."""

    def pages(self, symbol: str, timeframe: Timeframe, from_ms: int, to_ms: int
              ) -> AsyncIterator[Page]: ...

    def statistics(self) -> ClientStatistics: ...

    async def splits(self, since: dt.date, until: dt.date) -> list[Split]: ...


@attrs.frozen
class Job:
    """One series to bring up to date in this cycle: the ranges its plan asks for."""

    symbol: str
    timeframe: Timeframe
    ranges: tuple[FetchRange, ...]
    # The series was refused (not entitled) less than a day ago: no request this cycle.
    refused: str | None = None
    lease: Lease | None = None  # with scale-out: this instance's lease on the series

    @property
    def from_ms(self) -> int:
        return min((r.from_ms for r in self.ranges), default=0)

    @property
    def to_ms(self) -> int:
        return max((r.to_ms for r in self.ranges), default=0)


@attrs.define(eq=False)
class _JobRun:
    """The producer's half of one job (the writer's half is `receipt`)."""

    series: SeriesKey
    from_ms: int
    to_ms: int
    receipt: Receipt
    pages: int = 0
    attempts: int = 0
    api_seconds: float = 0.0
    error: str | None = None
    cancelled: bool = False
    refused: str | None = None  # the API refused the series (not entitled)
    asked: bool = True  # False: the refusal is a recent one remembered, no request was sent
    # Set only for a job that never reached the writer (its coverage could not be read).
    local_outcome: JobOutcome | None = None
    features_deferred: bool = False  # its features wait for the job's end (ranges at once)

    @property
    def outcome(self) -> JobOutcome | None:
        return self.receipt.outcome or self.local_outcome

    @property
    def done(self) -> bool:
        return self.outcome is not None

    def fetch_result(self) -> FetchResult:
        return FetchResult(self.from_ms, self.to_ms, self.pages, self.attempts,
                           self.api_seconds, self.error, self.cancelled, self.refused,
                           self.asked)

    def snapshot(self) -> JobSnapshot:
        return JobSnapshot(self.series.symbol, self.series.timeframe, self.outcome,
                           self.receipt.bars_written, self.pages, self.attempts,
                           self.receipt.write_error or self.error or self.refused,
                           self.api_seconds, self.receipt.db_seconds,
                           self.receipt.pages_written, self.receipt.bars_quarantined)

    def row(self) -> JobRow:
        outcome = self.outcome or JobOutcome.FAILED
        return JobRow(self.series.symbol, self.series.timeframe, outcome, self.from_ms,
                      self.to_ms, self.receipt.bars_written, self.pages, self.attempts,
                      self.api_seconds, self.receipt.db_seconds,
                      self.receipt.write_error or self.error)


@attrs.define(eq=False)
class _Cycle:
    number: int
    trigger: str
    started_wall: float
    started: float
    counters_at_start: tuple[int, int, int]  # the client's (requests, 429s, retries) then
    execution_id: uuid.UUID = attrs.field(factory=uuid.uuid4)
    finished: float | None = None
    symbols: dict[str, SymbolState] = attrs.field(factory=dict)
    jobs: list[_JobRun] = attrs.field(factory=list)
    auth_error: str | None = None
    only: set[SeriesKey] | None = None  # a retry cycle's series (None: all)
    counters_at_end: tuple[int, int, int] | None = None
    status: ExecutionStatus | None = None

    def snapshot(self, counters_now: tuple[int, int, int]) -> CycleSnapshot:
        now = self.counters_at_end or counters_now
        requests, limited, retries = (a - b for a, b in
                                      zip(now, self.counters_at_start, strict=True))
        return CycleSnapshot(
            number=self.number, trigger=self.trigger, execution_id=self.execution_id,
            started_wall=self.started_wall, started=self.started, finished=self.finished,
            symbols=dict(self.symbols), jobs=tuple(j.snapshot() for j in self.jobs),
            auth_error=self.auth_error, requests=requests, rate_limited=limited,
            retries=retries, status=self.status,
        )


class Scheduler:
    """Runs cycles; `update_config` applies a reload live, `request_stop` drains and returns."""

    def __init__(
        self,
        config: Config,
        client: PageSource,
        send: trio.MemorySendChannel[Message],
        *,
        series_state: Callable[[str], Awaitable[dict[tuple[str, str], SeriesState]]],
        today: Callable[[], dt.date] | None = None,
        splits_checked: Callable[[], Awaitable[dt.date | None]] | None = None,
        coordinator: Coordinator | None = None,
        defer_features: Callable[[SeriesKey, bool], None] | None = None,
    ) -> None:
        self._config = config
        # FeaturesTask.defer: a job walking sub-ranges at once commits them out of order.
        self._defer_features = defer_features
        self._client = client
        self._send = send
        self._series_state = series_state
        # Scale-out (daemon.leases): a series is worked on only under this instance's lease.
        self._coordinator = coordinator
        self._once = False
        # Symbols whose series another live instance holds, to look at again (run --once must
        # see every series done by someone): symbol -> (trio time, timeframes).
        self._later: dict[str, tuple[float, frozenset[str]]] = {}
        self._look_again: dict[str, frozenset[str]] = {}  # moved from _later to the queue
        # Reads up to which day splits were checked; None: no split checks (tests, tools).
        self._splits_checked = splits_checked
        self._last_splits_check = -float("inf")  # trio time
        self._splits_disabled_until = -float("inf")
        self._walkers = 0  # sub-ranges being walked right now, across all jobs
        self._today = today or _utc_today
        self._symbol_limiter = trio.CapacityLimiter(config.backfill.max_concurrent_symbols)
        self._pending: collections.deque[str] = collections.deque()
        self._changed = trio.Event()
        self._wake = trio.Event()
        self._running = 0
        self._last_start = -float("inf")
        self._stopping = False
        # Running symbols to plan again when they finish (a reload added timeframes to them).
        self._replan: set[str] = set()
        # Why the idle wait was woken; a reload that only changed refresh_minutes re-arms it.
        self._wake_reasons: set[str] = set()
        self._next_cycle_at: float | None = None  # trio time of the next scheduled cycle, idle
        self._cycle_number = 0
        self._cycle: _Cycle | None = None
        self._last_cycle: _Cycle | None = None
        self._finished: dict[str, int] = {}
        # Failed series: (consecutive failures, trio time of their retry).
        self._retries: dict[SeriesKey, tuple[int, float]] = {}
        self._last_prune = -float("inf")  # wall time monitoring rows were last pruned
        self._cycle_done = trio.Event()

    # --- what it reports ------------------------------------------------------------------

    def statistics(self) -> SchedulerStatistics:
        counters = self._client_counters()
        if self._stopping:
            state = SchedulerState.STOPPING
        elif self._cycle is not None:
            state = SchedulerState.BACKFILLING
        else:
            state = SchedulerState.WAITING
        return SchedulerStatistics(
            state=state,
            cycle=None if self._cycle is None else self._cycle.snapshot(counters),
            last_cycle=None if self._last_cycle is None else self._last_cycle.snapshot(counters),
            next_cycle_at=self._next_cycle_at,
            cycles_finished=dict(self._finished),
            timeframes=len(self._config.backfill.timeframes),
            symbol_slots=int(self._symbol_limiter.total_tokens),
        )

    async def wait_cycle_done(self, number: int) -> CycleSnapshot:
        """Wait until cycle `number` (or a later one) has finished; return the last finished."""
        while self._last_cycle is None or self._last_cycle.number < number:
            await self._cycle_done.wait()
        return self._last_cycle.snapshot(self._client_counters())

    def _client_counters(self) -> tuple[int, int, int]:
        stats = self._client.statistics()
        return (stats.total_requests, stats.rate_limited_count, stats.retries)

    # --- control --------------------------------------------------------------------------

    def update_config(self, config: Config) -> None:
        """Apply a reloaded config: concurrency at once, added series join, removed ones stop
        after their current page (checked by the page loop)."""
        old_bf = self._config.backfill
        old = {(s, t) for s in old_bf.symbols for t in old_bf.timeframes}
        self._config = config
        self._symbol_limiter.total_tokens = config.backfill.max_concurrent_symbols
        new = {(s, t) for s in config.backfill.symbols for t in config.backfill.timeframes}
        added = new - old
        if not added:
            if config.backfill.refresh_minutes != old_bf.refresh_minutes:
                self._wake_up("retime")  # the idle wait re-arms with the new interval
            return
        cycle = self._cycle
        if cycle is not None:
            # Series of a symbol already finished (or never queued) in this cycle run now; a
            # queued symbol picks the new timeframes up when it plans, a running one plans
            # again (for the new timeframes only) as soon as its current jobs end.
            for symbol in sorted({s for s, _ in added}):
                state = cycle.symbols.get(symbol)
                if state in (None, SymbolState.DONE, SymbolState.FAILED):
                    cycle.symbols[symbol] = SymbolState.QUEUED
                    self._pending.append(symbol)
                elif state is SymbolState.RUNNING:
                    self._replan.add(symbol)
            self._changed.set()
        else:
            self._wake_up("reload")

    def request_stop(self) -> None:
        """Start no new request; running jobs end after their current page."""
        self._stopping = True
        self._wake_up("stop")
        self._changed.set()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def trigger(self) -> None:
        """Run a cycle now instead of waiting for the next scheduled one."""
        self._wake_up("trigger")

    def _wake_up(self, reason: str) -> None:
        self._wake_reasons.add(reason)
        self._wake.set()

    # --- cycles ---------------------------------------------------------------------------

    async def run(self, *, once: bool = False) -> CycleSnapshot | None:
        """Run cycles until stopped (or one cycle with `once`); close the writer's channel.

        Returns the last finished cycle (None if none finished)."""
        self._once = once
        async with self._send:
            trigger = "start"
            started = trio.current_time()
            while not self._stopping:
                if trigger == "retry":
                    only = self._due_retries()
                    cycle = await self.run_cycle(trigger, only=only)
                else:
                    started = trio.current_time()
                    cycle = await self.run_cycle(trigger)
                if once:
                    return cycle
                trigger = await self._wait_next_cycle(started)
        last = self._last_cycle
        return None if last is None else last.snapshot(self._client_counters())

    async def _wait_next_cycle(self, started: float) -> str:
        """Sleep until `refresh_minutes` after `started`, a failed series' retry, or a wake;
        return the trigger ("schedule", "retry" or "wake")."""
        while True:
            self._next_cycle_at = started + self._config.backfill.refresh_minutes * 60
            retry_at = min((due for _, due in self._retries.values()), default=float("inf"))
            with trio.move_on_at(min(self._next_cycle_at, retry_at)):
                await self._wake.wait()
            reasons, self._wake_reasons = self._wake_reasons, set()
            self._wake = trio.Event()
            now = trio.current_time()
            if now >= self._next_cycle_at:
                trigger = "schedule"
            elif not reasons and now >= retry_at:
                trigger = "retry"
            elif reasons == {"retime"}:
                continue
            else:
                trigger = "wake"
            self._next_cycle_at = None
            return trigger

    async def _check_splits(self) -> None:
        """Ask for the splits executed since the last check (one market-wide request) and have
        the writer apply the new ones (daemon.splits) before any symbol is planned.

        Error handling: an API failure here is logged and the cycle goes on (the check comes
        again next cycle); a plan without reference data (403) stops checking for a day.
        """
        config = self._config
        now = trio.current_time()
        if (self._splits_checked is None or not config.polygon.adjusted
                or now - self._last_splits_check < SPLITS_EVERY_SECONDS
                or now < self._splits_disabled_until):
            return
        today = self._today()
        through = await self._splits_checked()
        since = (through - dt.timedelta(days=SPLITS_LOOKBACK_DAYS) if through is not None
                 else config.backfill.first_day(today))
        try:
            found = await self._client.splits(since, today)
        except NotEntitled as exc:
            logger.warning("splits: the API plan does not cover them ({}); adjusted history "
                           "is not checked for splits for a day", exc)
            self._splits_disabled_until = now + REFUSAL_RETRY_SECONDS
            return
        except ApiError as exc:
            logger.warning("splits: not checked this cycle: {}", exc)
            return
        self._last_splits_check = trio.current_time()
        receipt = Receipt()
        tickers = frozenset(config.backfill.symbols)
        await self._send.send(SplitsFound(tuple(found), today, through is None, tickers,
                                          receipt))
        await receipt.finished.wait()

    def _due_retries(self) -> set[SeriesKey]:
        now = trio.current_time()
        return {key for key, (_, due) in self._retries.items() if due <= now}

    def _note_outcomes(self, snapshot: CycleSnapshot) -> None:
        """A failed series is tried again on its own backoff (1, 2, 4 ... minutes, at most
        `refresh_minutes`) instead of waiting a whole refresh; a success forgets it."""
        now = trio.current_time()
        cap = self._config.backfill.refresh_minutes * 60
        for job in snapshot.jobs:
            key = SeriesKey(job.symbol, job.timeframe)
            if job.failed and job.timeframe != "*":
                failures = self._retries.get(key, (0, 0.0))[0] + 1
                wait = min(RETRY_FIRST_SECONDS * 2 ** (failures - 1), cap)
                self._retries[key] = (failures, now + wait)
            elif job.ok or job.not_entitled:
                self._retries.pop(key, None)

    async def run_cycle(self, trigger: str, *, only: set[SeriesKey] | None = None
                        ) -> CycleSnapshot:
        """One cycle over every configured series (or, for a retry, the series in `only`)."""
        self._cycle_number += 1
        cycle = _Cycle(
            number=self._cycle_number,
            trigger=trigger,
            started_wall=wall_clock(),
            started=trio.current_time(),
            counters_at_start=self._client_counters(),
        )
        self._cycle = cycle
        cycle.only = only
        symbols = [s for s in self._config.backfill.symbols
                   if only is None or any(k.symbol == s for k in only)]
        cycle.symbols = dict.fromkeys(symbols, SymbolState.QUEUED)
        self._pending = collections.deque(symbols)
        logger.info("cycle {} ({}): {} symbols x {} timeframes", cycle.number, trigger,
                    len(symbols), len(self._config.backfill.timeframes))
        instance_id = None if self._coordinator is None else self._coordinator.identity.id
        await self._send.send(ExecutionStarted(cycle.execution_id, self._config.instance,
                                               cycle.number, trigger, cycle.started_wall,
                                               instance_id))
        if only is None:
            await self._check_splits()
        if cycle.started_wall - self._last_prune >= PRUNE_EVERY_SECONDS:
            self._last_prune = cycle.started_wall
            days = self._config.monitoring.retention_days
            await self._send.send(Prune(cycle.started_wall - days * 86_400))
        try:
            await self._run_symbols(cycle)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._record_finish(cycle, interrupted=True)
            raise
        cycle.finished = trio.current_time()
        snapshot = await self._record_finish(cycle, interrupted=False)
        self._note_outcomes(snapshot)
        self._cycle = None
        self._last_cycle = cycle
        self._cycle_done.set()
        self._cycle_done = trio.Event()
        logger.info(
            "cycle {} finished in {:.1f} s: {} jobs, {} failed, {} bars written",
            cycle.number, cycle.finished - cycle.started, len(snapshot.jobs),
            len(snapshot.failed), snapshot.bars_written,
        )
        return snapshot

    async def _record_finish(self, cycle: _Cycle, *, interrupted: bool) -> CycleSnapshot:
        """Send the cycle's totals to the writer (bounded wait when interrupted)."""
        cycle.counters_at_end = self._client_counters()
        snapshot = cycle.snapshot(cycle.counters_at_end)
        status = snapshot.execution_status(interrupted=interrupted)
        cycle.status = status
        self._finished[status.value] = self._finished.get(status.value, 0) + 1
        message = ExecutionFinished(
            id=cycle.execution_id,
            status=status.value,
            finished_wall=wall_clock(),
            duration_seconds=trio.current_time() - cycle.started,
            jobs_total=len(snapshot.jobs),
            jobs_ok=sum(1 for j in snapshot.jobs if j.ok),
            jobs_failed=len(snapshot.failed),
            jobs_cancelled=len(snapshot.cancelled),
            bars_written=snapshot.bars_written,
            requests=snapshot.requests,
            rate_limited=snapshot.rate_limited,
            retries=snapshot.retries,
            error=cycle.auth_error,
            late_failures=tuple(j.row() for j in cycle.jobs if j.local_outcome is not None),
            jobs_not_entitled=len(snapshot.not_entitled),
            bars_quarantined=snapshot.quarantined,
        )
        with trio.move_on_after(FINISH_SEND_SECONDS if interrupted else float("inf")):
            try:
                await self._send.send(message)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                logger.warning("cycle {}: the writer is gone; its totals are not recorded",
                               cycle.number)
        return cycle.snapshot(cycle.counters_at_end)

    async def _run_symbols(self, cycle: _Cycle) -> None:
        self._later, self._look_again = {}, {}
        async with trio.open_nursery() as nursery:
            while not self._stopping:
                if not self._pending:
                    if self._running == 0 and not self._later:
                        break
                    # wait for a running symbol, or for one held elsewhere to look at again
                    with trio.move_on_at(min((t for t, _ in self._later.values()),
                                             default=float("inf"))):
                        await self._changed.wait()
                        self._changed = trio.Event()
                    now = trio.current_time()
                    for symbol in [s for s, (t, _) in self._later.items() if t <= now]:
                        self._look_again[symbol] = self._later.pop(symbol)[1]
                        self._pending.append(symbol)
                    continue
                symbol = self._pending.popleft()
                if symbol not in self._config.backfill.symbols:
                    cycle.symbols.pop(symbol, None)
                    continue
                await self._symbol_limiter.acquire_on_behalf_of(symbol)
                await trio.sleep_until(self._last_start + self._config.backfill.stagger_seconds)
                if self._stopping:  # the stop came while this symbol waited for its turn
                    self._symbol_limiter.release_on_behalf_of(symbol)
                    break
                self._last_start = trio.current_time()
                self._running += 1
                nursery.start_soon(self._symbol_task, cycle, symbol)

    async def _symbol_task(self, cycle: _Cycle, symbol: str) -> None:
        cycle.symbols[symbol] = SymbolState.RUNNING
        try:
            jobs = await self._plan_symbol(cycle, symbol)
            async with trio.open_nursery() as nursery:
                for job in jobs:
                    nursery.start_soon(self._job_task, cycle, job)
            outcomes = [j.outcome for j in cycle.jobs if j.series.symbol == symbol]
            good = all(o in (JobOutcome.OK, JobOutcome.CANCELLED) for o in outcomes)
            cycle.symbols[symbol] = SymbolState.DONE if good else SymbolState.FAILED
            if symbol in self._later:  # series held by another instance: looked at again
                cycle.symbols[symbol] = SymbolState.QUEUED
        finally:
            self._symbol_limiter.release_on_behalf_of(symbol)
            self._running -= 1
            if symbol in self._replan:
                self._replan.discard(symbol)
                if not self._stopping and symbol in self._config.backfill.symbols:
                    cycle.symbols[symbol] = SymbolState.QUEUED
                    self._pending.append(symbol)
            self._changed.set()

    async def _plan_symbol(self, cycle: _Cycle, symbol: str) -> list[Job]:
        """Plan the symbol's jobs from its current coverage (read just before it starts, and
        after the claim of its leases, with scale-out)."""
        labels = [tf.label for tf in self._config.backfill.timeframes
                  if (cycle.only is None or SeriesKey(symbol, tf.label) in cycle.only)]
        again = self._look_again.pop(symbol, None)
        if again is not None:
            labels = [label for label in labels if label in again]
        leases: dict[str, Lease] | None = None
        if self._coordinator is not None:
            try:
                claim = await self._coordinator.claim(symbol, labels,
                                                      due_before=self._due_before(cycle))
            except DatabaseError as exc:
                cycle.jobs.append(_JobRun(SeriesKey(symbol, "*"), 0, 0,
                                          Receipt(execution_id=cycle.execution_id),
                                          error=str(exc), local_outcome=JobOutcome.FAILED))
                return []
            leases = claim.granted
            if claim.held_elsewhere and self._once:
                # run --once: wait for the other instance to finish them (or for its lease to
                # lapse, when it died); meanwhile the cycle goes on with other symbols
                self._later[symbol] = (trio.current_time() + self._coordinator.lease_seconds
                                       / 6, claim.held_elsewhere)
            if claim.done_elsewhere or claim.held_elsewhere:
                logger.bind(symbol=symbol, timeframe="*").debug(
                    "leases: {} taken, {} done by another instance, {} held by another",
                    len(leases), len(claim.done_elsewhere), len(claim.held_elsewhere))
        try:
            states = await self._series_state(symbol)
        except DatabaseError as exc:
            cycle.jobs.append(_JobRun(SeriesKey(symbol, "*"), 0, 0,
                                      Receipt(execution_id=cycle.execution_id), error=str(exc),
                                      local_outcome=JobOutcome.FAILED))
            return []
        today = self._today()
        # A symbol planned again in the same cycle (a reload added timeframes) skips the series
        # that are running or already done there.
        skip = {j.series for j in cycle.jobs if not j.done or j.outcome is JobOutcome.OK}
        jobs = []
        for tf in self._config.backfill.timeframes:
            if tf.label not in labels or SeriesKey(symbol, tf.label) in skip:
                continue
            lease = None
            if leases is not None:
                lease = leases.get(tf.label)
                if lease is None:
                    continue  # another instance's (or done by one)
            state = states.get((symbol, tf.label)) or SeriesState()
            if (state.refused_at is not None
                    and wall_clock() - state.refused_at < REFUSAL_RETRY_SECONDS):
                jobs.append(Job(symbol, tf, (), refused=state.refused_reason or "not entitled",
                                lease=lease))
                continue
            ranges = plan_series(self._config, symbol, tf, state.covered, today)
            if ranges or lease is not None:  # a lease is given back by its job, even empty
                jobs.append(Job(symbol, tf, tuple(ranges), lease=lease))
        return jobs

    def _due_before(self, cycle: _Cycle) -> float:
        """A series another instance brought up to date since this instant needs nothing from
        us: since this cycle began (`run --once`, a start, a wake: every series must be done
        once now), or, for a scheduled cycle, within the last half refresh interval (the
        instances' cycles take turns)."""
        if self._once or cycle.trigger != "schedule":
            return cycle.started_wall  # a start, a wake, a retry: do what is asked now
        return cycle.started_wall - self._config.backfill.refresh_minutes * 30

    def _wanted(self, job: Job) -> bool:
        bf = self._config.backfill
        return job.symbol in bf.symbols and job.timeframe in bf.timeframes

    async def _job_task(self, cycle: _Cycle, job: Job) -> None:
        run = _JobRun(SeriesKey(job.symbol, job.timeframe.label), job.from_ms, job.to_ms,
                      Receipt(execution_id=cycle.execution_id))
        cycle.jobs.append(run)
        try:
            await self._run_job(cycle, job, run)
        finally:
            if run.features_deferred:
                run.features_deferred = False
                assert self._defer_features is not None
                self._defer_features(run.series, False)

    def _defer_job_features(self, run: _JobRun) -> None:
        """From now until the job ends, its pages may commit out of order."""
        if self._defer_features is not None and not run.features_deferred:
            run.features_deferred = True
            self._defer_features(run.series, True)

    async def _run_job(self, cycle: _Cycle, job: Job, run: _JobRun) -> None:
        log = logger.bind(symbol=job.symbol, timeframe=job.timeframe.label)
        async with self._send.clone() as send:
            if cycle.auth_error is not None:
                run.error = cycle.auth_error
            elif not job.ranges and job.refused is None:
                pass  # a claimed series with nothing to fetch: its lease goes back, up to date
            elif job.refused is not None:
                run.refused, run.asked = job.refused, False
                log.info("not entitled (asked again once a day): {}", job.refused)
            else:
                async with trio.open_nursery() as walkers:
                    # The first range alone until its first answer: a refused series costs
                    # one request per cycle, not one per range.
                    answered = trio.Event()
                    self._start_walker(walkers, partial(
                        self._walk_range, cycle, job, run, job.ranges[0], send, walkers,
                        answered=answered))
                    if len(job.ranges) > 1:
                        await answered.wait()
                        if run.refused is None and run.error is None:
                            self._defer_job_features(run)
                            for fetch in job.ranges[1:]:
                                self._start_walker(walkers, partial(
                                    self._walk_range, cycle, job, run, fetch, send, walkers))
            await send.send(JobFinished(run.series, run.fetch_result(), run.receipt,
                                        job.lease))
        await run.receipt.finished.wait()
        if run.outcome is JobOutcome.OK:
            log.info("job done: {} bars in {} pages", run.receipt.bars_written,
                     run.receipt.pages_written)
        elif run.outcome is JobOutcome.FAILED:
            log.error("job failed: {}", run.receipt.write_error or run.error)
        elif run.outcome is JobOutcome.NOT_ENTITLED and run.asked:
            log.warning("not entitled: the API plan does not cover this series (asked again "
                        "in a day): {}", run.refused)

    async def _walk_range(self, cycle: _Cycle, job: Job, run: _JobRun, fetch: FetchRange,
                          send: trio.MemorySendChannel[Message], walkers: trio.Nursery, *,
                          may_split: bool = True, answered: trio.Event | None = None) -> None:
        """Follow one range's `next_url`s, sending each page with the span it proves.

        After the first page of a deep range, the rest may be split into sub-ranges walked
        concurrently (each by its own `_walk_range`) when the request budget has room.
        """
        log = logger.bind(symbol=job.symbol, timeframe=job.timeframe.label)
        try:  # counted by _start_walker
            page_from = fetch.from_ms
            pages = self._client.pages(job.symbol, job.timeframe, fetch.from_ms, fetch.to_ms)
            async with aclosing(pages):  # type: ignore[type-var]
                first = True
                async for page in pages:
                    if answered is not None:
                        answered.set()
                    run.pages += 1
                    run.attempts += page.attempts
                    run.api_seconds += page.api_seconds
                    seen = [b.t for b in page.bars[-1:]] + [
                        q.t for q in page.quarantined if q.t is not None]
                    if page.last and fetch.closed:
                        hi = fetch.to_ms + 1  # the answer for a closed range is final
                    else:
                        hi = max(seen) + 1 if seen else page_from
                    held = _held_out(page.quarantined, page_from, hi, fetch.to_ms)
                    if held:
                        log.warning("{} bar(s) quarantined (asked again next top-up): t={} "
                                    "{}", len(held), held[0].bar.t, held[0].bar.reason)
                    last, any_bars = page.last, bool(page.bars)
                    message = None
                    if page.bars or held or hi > page_from:
                        rows = page.rows or encode_copy_rows(page.bars, run.series.symbol,
                                                           run.series.timeframe)[0]
                        message = PageWrite(run.series, rows, (page_from, hi), run.receipt, held,
                                            job.lease)
                    del page  # its bars as objects: only the encoded rows wait in the queue
                    if message is not None:
                        await send.send(message)
                        del message
                    page_from = max(page_from, hi)
                    if last or run.receipt.write_error is not None:
                        break
                    if run.receipt.lease_lost:
                        log.warning("lease lost: another instance took the series over")
                        break
                    if (self._stopping or not self._wanted(job) or run.error is not None
                            or run.refused is not None):
                        run.cancelled = run.cancelled or run.error is None
                        log.info("job stopped after its current page")
                        break
                    if first and may_split and any_bars:
                        rest = FetchRange(page_from, fetch.to_ms, fetch.closed)
                        parts = split_range(rest, page_from - fetch.from_ms,
                                            self._parallel_ranges())
                        if len(parts) > 1:
                            log.debug("splitting the rest into {} sub-ranges", len(parts))
                            self._defer_job_features(run)
                            for part in parts:
                                self._start_walker(walkers, partial(
                                    self._walk_range, cycle, job, run, part, send, walkers,
                                    may_split=False))
                            break
                    first = False
        except trio.ClosedResourceError:
            # The rate limiter was closed (a stop) before this range's next request: no
            # request is started after a stop, and the job ends as cancelled, not failed.
            run.cancelled = True
            log.info("job stopped before its next request")
        except NotEntitled as exc:
            run.refused = run.refused or str(exc)
        except ApiKeyRefused as exc:
            run.error = run.error or str(exc)
            cycle.auth_error = str(exc)
        except ApiError as exc:
            run.error = run.error or f"{type(exc).__name__}: {exc}"
        finally:
            self._walkers -= 1
            if answered is not None:
                answered.set()

    def _start_walker(self, walkers: trio.Nursery, walk: Callable[[], Awaitable[None]]) -> None:
        """Start a `_walk_range`, counted from now, not from when it first runs: several series
        splitting in one scheduler tick each see the walkers the others just started."""
        self._walkers += 1
        walkers.start_soon(walk)

    def _parallel_ranges(self) -> int:
        """How many sub-ranges a deep range may be split into right now.

        `[backfill] parallel_ranges`, or (0, auto) as many as it takes for the walkers running
        to keep rate x latency requests in flight, the rate being `requests_per_minute` (or,
        unlimited, the API's ~100 req/s ceiling), within the in-flight cap. A fast API needs
        no split (each sub-range costs a partial page and a page of memory); a slow one gets
        as many as the cap allows; none while the writer's queue is half full.
        """
        config = self._config
        if config.backfill.parallel_ranges:
            return config.backfill.parallel_ranges
        queue = self._send.statistics()
        if queue.current_buffer_used * 2 >= queue.max_buffer_size:
            return 1  # the writer is the bottleneck: more walkers would only wait, holding pages
        cap = config.polygon.max_in_flight
        rpm = config.polygon.requests_per_minute or UNLIMITED_CEILING_PER_MINUTE
        latency = self._client.statistics().mean_latency or 1.0
        needed = min(cap, math.ceil(rpm / 60 * latency * 1.25))
        # all walkers together, not each series, stay within the cap: every walker may hold a
        # page waiting for the writer, so this also bounds memory
        spare = needed - self._walkers
        return max(1, spare + 1)


def _held_out(quarantined: tuple[Quarantined, ...], lo: int, hi: int, to_ms: int
              ) -> tuple[QuarantinedSpan, ...]:
    """Where each quarantined bar of a page `[lo, hi)` is held out of coverage: its own
    `[t, t+1)`, or (its place unknown) the page's span, or when that is empty, the rest of the
    range (uncovered anyway)."""
    page = (lo, hi) if hi > lo else (lo, to_ms + 1)
    return tuple(QuarantinedSpan((q.t, q.t + 1) if q.t is not None and lo <= q.t < hi else page,
                                 q) for q in quarantined)


def _utc_today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()
