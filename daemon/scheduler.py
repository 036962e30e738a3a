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

Error handling: a job's API or data failure is recorded on its JobState and the cycle goes on; an
ApiAuthError fails the rest of the cycle at once (every request would be refused the same way).
A cycle cut short (stop, cancellation) still sends its totals, as 'interrupted', if the writer
takes them within `FINISH_SEND_SECONDS`.
"""

from __future__ import annotations

import collections
import datetime as dt
import uuid
from collections.abc import Awaitable, Callable
from contextlib import aclosing

import attrs
import trio
from loguru import logger

from . import db
from .config import Config
from .errors import ApiAuthError, ApiError, BadData, DatabaseError
from .market_calendar import et_midnight_ms
from .monitoring import ExecutionFinished, ExecutionStarted, JobRow
from .polygon import PolygonClient
from .timeframes import Timeframe
from .writer import JobDone, JobState, Message, PageWrite

__all__ = ["CycleProgress", "Job", "Scheduler", "plan_job"]

# How long an interrupted cycle waits for room in the writer's channel to record its end.
FINISH_SEND_SECONDS = 1.0


@attrs.frozen
class Job:
    symbol: str
    timeframe: Timeframe
    from_ms: int
    to_ms: int


def plan_job(
    config: Config,
    symbol: str,
    timeframe: Timeframe,
    checkpoint: db.Checkpoint | None,
    today: dt.date,
) -> Job | None:
    """The job that brings one series up to date, or None when there is nothing to ask for.

    No checkpoint, or one that starts after the configured start (history was extended
    backwards): fetch everything from the start. Otherwise resume after the covered span, less
    `overlap_bars` bars to pick up the vendor's late revisions.
    """
    bf = config.backfill
    start_ms = et_midnight_ms(bf.first_day(today))
    end_ms = et_midnight_ms(bf.last_day(today) + dt.timedelta(days=1)) - 1
    if checkpoint is None or checkpoint.covered_from_ms > start_ms:
        from_ms = start_ms
    else:
        overlap = bf.overlap_bars * timeframe.approx_ms
        from_ms = max(start_ms, checkpoint.covered_through_ms + 1 - overlap)
    if from_ms > end_ms:
        return None
    return Job(symbol, timeframe, from_ms, end_ms)


@attrs.define
class CycleProgress:
    """What the current (or last) cycle is doing; read by /status and `run --once`."""

    number: int
    trigger: str
    started_wall: float
    started: float
    finished: float | None = None
    symbols: dict[str, str] = attrs.field(factory=dict)  # queued / running / done / failed
    jobs: list[JobState] = attrs.field(factory=list)
    auth_error: str | None = None
    execution_id: uuid.UUID = attrs.field(factory=uuid.uuid4)
    # The client's (requests, 429s, retries) when the cycle started; the cycle's own counts
    # are the differences (one cycle runs at a time).
    counters_at_start: tuple[int, int, int] = (0, 0, 0)
    requests: int = 0
    rate_limited: int = 0
    retries: int = 0

    @property
    def jobs_done(self) -> int:
        return sum(1 for j in self.jobs if j.done.is_set())

    @property
    def failed(self) -> list[JobState]:
        return [j for j in self.jobs if j.done.is_set() and not j.ok and not j.cancelled]

    @property
    def ok(self) -> bool:
        return not self.failed and self.auth_error is None


class Scheduler:
    """Runs cycles; `update_config` applies a reload live, `request_stop` drains and returns."""

    def __init__(
        self,
        config: Config,
        client: PolygonClient,
        send: trio.MemorySendChannel[Message],
        *,
        checkpoints: Callable[[str], Awaitable[dict[tuple[str, str], db.Checkpoint]]],
        today: Callable[[], dt.date] = lambda: dt.datetime.now(dt.UTC).date(),
    ) -> None:
        self.config = config
        self._client = client
        self._send = send
        self._checkpoints = checkpoints
        self._today = today
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
        self.next_cycle_at: float | None = None  # trio time of the next scheduled cycle, idle
        self._cycle_number = 0
        self.cycle: CycleProgress | None = None
        self.last_cycle: CycleProgress | None = None
        self.on_cycle_done: list[Callable[[CycleProgress], None]] = []

    # --- control --------------------------------------------------------------------------

    def update_config(self, config: Config) -> None:
        """Apply a reloaded config: concurrency at once, added series join, removed ones stop
        after their current page (checked by the page loop)."""
        old_bf = self.config.backfill
        old = {(s, t) for s in old_bf.symbols for t in old_bf.timeframes}
        self.config = config
        self._symbol_limiter.total_tokens = config.backfill.max_concurrent_symbols
        new = {(s, t) for s in config.backfill.symbols for t in config.backfill.timeframes}
        added = new - old
        if not added:
            if config.backfill.refresh_minutes != old_bf.refresh_minutes:
                self._wake_up("retime")  # the idle wait re-arms with the new interval
            return
        cycle = self.cycle
        if cycle is not None:
            # Series of a symbol already finished (or never queued) in this cycle run now; a
            # queued symbol picks the new timeframes up when it plans, a running one plans
            # again (for the new timeframes only) as soon as its current jobs end.
            for symbol in sorted({s for s, _ in added}):
                if cycle.symbols.get(symbol) in (None, "done", "failed"):
                    cycle.symbols[symbol] = "queued"
                    self._pending.append(symbol)
                elif cycle.symbols.get(symbol) == "running":
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

    async def run(self, *, once: bool = False) -> CycleProgress | None:
        """Run cycles until stopped (or one cycle with `once`); close the writer's channel."""
        async with self._send:
            trigger = "start"
            while not self._stopping:
                started = trio.current_time()
                cycle = await self.run_cycle(trigger)
                if once:
                    return cycle
                trigger = await self._wait_next_cycle(started)
        return self.last_cycle

    async def _wait_next_cycle(self, started: float) -> str:
        """Sleep until `refresh_minutes` after `started`, or a wake; return the trigger."""
        while True:
            self.next_cycle_at = started + self.config.backfill.refresh_minutes * 60
            with trio.move_on_at(self.next_cycle_at):
                await self._wake.wait()
            reasons, self._wake_reasons = self._wake_reasons, set()
            self._wake = trio.Event()
            if trio.current_time() >= self.next_cycle_at:
                trigger = "schedule"
            elif reasons == {"retime"}:
                continue
            else:
                trigger = "wake"
            self.next_cycle_at = None
            return trigger

    async def run_cycle(self, trigger: str) -> CycleProgress:
        self._cycle_number += 1
        cycle = CycleProgress(
            number=self._cycle_number,
            trigger=trigger,
            started_wall=_wall(),
            started=trio.current_time(),
            counters_at_start=self.client_counters(),
        )
        self.cycle = cycle
        symbols = list(self.config.backfill.symbols)
        cycle.symbols = dict.fromkeys(symbols, "queued")
        self._pending = collections.deque(symbols)
        logger.info("cycle {} ({}): {} symbols x {} timeframes", cycle.number, trigger,
                    len(symbols), len(self.config.backfill.timeframes))
        await self._send.send(ExecutionStarted(cycle.execution_id, self.config.instance,
                                               cycle.number, trigger, cycle.started_wall))
        try:
            await self._run_symbols(cycle)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._record_finish(cycle, interrupted=True)
            raise
        cycle.finished = trio.current_time()
        await self._record_finish(cycle, interrupted=False)
        self.cycle = None
        self.last_cycle = cycle
        failed = cycle.failed
        logger.info(
            "cycle {} finished in {:.1f} s: {} jobs, {} failed, {} bars written",
            cycle.number, cycle.finished - cycle.started, len(cycle.jobs), len(failed),
            sum(j.bars_written for j in cycle.jobs),
        )
        for callback in self.on_cycle_done:
            callback(cycle)
        return cycle

    def client_counters(self) -> tuple[int, int, int]:
        """The client's (total_requests, rate_limited_count, retries) so far."""
        stats = self._client.statistics()
        return (stats.total_requests, stats.rate_limited_count, stats.retries)

    async def _record_finish(self, cycle: CycleProgress, *, interrupted: bool) -> None:
        """Send the cycle's totals to the writer (bounded wait when interrupted)."""
        requests, rate_limited, retries = self.client_counters()
        at_start = cycle.counters_at_start
        cycle.requests = requests - at_start[0]
        cycle.rate_limited = rate_limited - at_start[1]
        cycle.retries = retries - at_start[2]
        cancelled = [j for j in cycle.jobs if j.cancelled and j.error is None]
        failed = cycle.failed
        unfinished = any(state in ("queued", "running") for state in cycle.symbols.values())
        if interrupted or cancelled or unfinished:
            status = "interrupted"
        else:
            status = "ok" if cycle.ok else "failed"
        message = ExecutionFinished(
            id=cycle.execution_id,
            status=status,
            finished_wall=_wall(),
            duration_seconds=trio.current_time() - cycle.started,
            jobs_total=len(cycle.jobs),
            jobs_ok=sum(1 for j in cycle.jobs if j.ok),
            jobs_failed=len(failed),
            jobs_cancelled=len(cancelled),
            bars_written=sum(j.bars_written for j in cycle.jobs),
            requests=cycle.requests,
            rate_limited=cycle.rate_limited,
            retries=cycle.retries,
            error=cycle.auth_error,
            late_failures=tuple(JobRow.of(j) for j in failed),
        )
        with trio.move_on_after(FINISH_SEND_SECONDS if interrupted else float("inf")):
            try:
                await self._send.send(message)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                logger.warning("cycle {}: the writer is gone; its totals are not recorded",
                               cycle.number)

    async def _run_symbols(self, cycle: CycleProgress) -> None:
        async with trio.open_nursery() as nursery:
            while not self._stopping:
                if not self._pending:
                    if self._running == 0:
                        break
                    await self._changed.wait()
                    self._changed = trio.Event()
                    continue
                symbol = self._pending.popleft()
                if symbol not in self.config.backfill.symbols:
                    cycle.symbols.pop(symbol, None)
                    continue
                await self._symbol_limiter.acquire_on_behalf_of(symbol)
                await trio.sleep_until(self._last_start + self.config.backfill.stagger_seconds)
                if self._stopping:  # the stop came while this symbol waited for its turn
                    self._symbol_limiter.release_on_behalf_of(symbol)
                    break
                self._last_start = trio.current_time()
                self._running += 1
                nursery.start_soon(self._symbol_task, cycle, symbol)

    async def _symbol_task(self, cycle: CycleProgress, symbol: str) -> None:
        cycle.symbols[symbol] = "running"
        try:
            jobs = await self._plan_symbol(cycle, symbol)
            async with trio.open_nursery() as nursery:
                for job in jobs:
                    nursery.start_soon(self._job_task, cycle, job)
            states = [j for j in cycle.jobs if j.symbol == symbol]
            cycle.symbols[symbol] = "done" if all(s.ok or s.cancelled for s in states) else "failed"
        finally:
            self._symbol_limiter.release_on_behalf_of(symbol)
            self._running -= 1
            if symbol in self._replan:
                self._replan.discard(symbol)
                if not self._stopping and symbol in self.config.backfill.symbols:
                    cycle.symbols[symbol] = "queued"
                    self._pending.append(symbol)
            self._changed.set()

    async def _plan_symbol(self, cycle: CycleProgress, symbol: str) -> list[Job]:
        """Plan the symbol's jobs from its current checkpoints (read just before it starts)."""
        try:
            checkpoints = await self._checkpoints(symbol)
        except DatabaseError as exc:
            state = JobState(symbol, "*", 0, 0, fetch_error=str(exc),
                             execution_id=cycle.execution_id)
            state.done.set()
            cycle.jobs.append(state)
            return []
        today = self._today()
        # A symbol planned again in the same cycle (a reload added timeframes) skips the series
        # that are running or already done there.
        skip = {(j.symbol, j.timeframe) for j in cycle.jobs if not j.done.is_set() or j.ok}
        jobs = []
        for tf in self.config.backfill.timeframes:
            if (symbol, tf.label) in skip:
                continue
            job = plan_job(self.config, symbol, tf, checkpoints.get((symbol, tf.label)), today)
            if job is not None:
                jobs.append(job)
        return jobs

    def _wanted(self, job: Job) -> bool:
        bf = self.config.backfill
        return job.symbol in bf.symbols and job.timeframe in bf.timeframes

    async def _job_task(self, cycle: CycleProgress, job: Job) -> None:
        state = JobState(job.symbol, job.timeframe.label, job.from_ms, job.to_ms,
                         execution_id=cycle.execution_id)
        cycle.jobs.append(state)
        log = logger.bind(symbol=job.symbol, timeframe=job.timeframe.label)
        async with self._send.clone() as send:
            try:
                if cycle.auth_error is not None:
                    raise ApiAuthError(cycle.auth_error)
                pages = self._client.pages(job.symbol, job.timeframe, job.from_ms, job.to_ms)
                async with aclosing(pages):
                    async for page in pages:
                        state.pages_fetched += 1
                        state.attempts += page.attempts
                        state.api_seconds += page.api_seconds
                        if page.bars:
                            await send.send(PageWrite(state, page.bars))
                        if page.last:
                            break
                        if state.write_error is not None:
                            break
                        if self._stopping or not self._wanted(job):
                            state.cancelled = True
                            log.info("job stopped after its current page")
                            break
            except trio.ClosedResourceError:
                # The rate limiter was closed (a stop) before this job's next request: no
                # request is started after a stop, and the job ends as cancelled, not failed.
                state.cancelled = True
                log.info("job stopped before its next request")
            except ApiAuthError as exc:
                state.fetch_error = str(exc)
                cycle.auth_error = str(exc)
            except (ApiError, BadData) as exc:
                state.fetch_error = f"{type(exc).__name__}: {exc}"
            await send.send(JobDone(state))
        await state.done.wait()
        if state.ok:
            log.info("job done: {} bars in {} pages", state.bars_written, state.pages_written)
        elif not state.cancelled:
            log.error("job failed: {}", state.error)


def _wall() -> float:
    return dt.datetime.now(dt.UTC).timestamp()
