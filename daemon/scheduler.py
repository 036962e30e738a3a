"""The scheduler: plans jobs from checkpoints and runs them, cycle after cycle, forever.

A job is `(symbol, timeframe, from, to)`. A cycle plans one job per configured series, starting
where the series' checkpoint ends (less `overlap_bars`, because the vendor revises recent bars),
and runs the symbols under `CapacityLimiter(max_concurrent_symbols)`, started with staggered
`start_soon`. The timeframes of a symbol run concurrently, so requests in flight can reach
rate x latency (the API's rate limiter, not this module, decides how fast requests go).

Stagger is a minimum spacing between symbol starts, not a sleep after each: a symbol whose slot
frees late starts at once, so staggering smooths the start without adding idle time.

After the first full cycle, top-ups run every `refresh_minutes`; a reload that adds series wakes
the scheduler, and series added mid-cycle join the running cycle.

Error handling: a job's API or data failure is recorded on its JobState and the cycle goes on; an
ApiAuthError fails the rest of the cycle at once (every request would be refused the same way).
"""

from __future__ import annotations

import collections
import datetime as dt
from collections.abc import Awaitable, Callable
from contextlib import aclosing

import attrs
import trio
from loguru import logger

from . import db
from .config import Config
from .errors import ApiAuthError, ApiError, BadData, DatabaseError
from .market_calendar import et_midnight_ms
from .polygon import PolygonClient
from .timeframes import Timeframe
from .writer import JobDone, JobState, Message, PageWrite

__all__ = ["CycleProgress", "Job", "Scheduler", "plan_job"]


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
            return
        cycle = self.cycle
        if cycle is not None:
            # Series of a symbol already finished (or never queued) in this cycle run now;
            # a symbol still running or queued will pick the new timeframes up when it plans.
            for symbol in sorted({s for s, _ in added}):
                if cycle.symbols.get(symbol) in (None, "done", "failed"):
                    cycle.symbols[symbol] = "queued"
                    self._pending.append(symbol)
            self._changed.set()
        else:
            self._wake.set()

    def request_stop(self) -> None:
        """Start no new request; running jobs end after their current page."""
        self._stopping = True
        self._wake.set()
        self._changed.set()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def trigger(self) -> None:
        """Run a cycle now instead of waiting for the next scheduled one."""
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
                next_at = started + self.config.backfill.refresh_minutes * 60
                with trio.move_on_at(next_at):
                    await self._wake.wait()
                trigger = "schedule" if trio.current_time() >= next_at else "wake"
                self._wake = trio.Event()
        return self.last_cycle

    async def run_cycle(self, trigger: str) -> CycleProgress:
        self._cycle_number += 1
        cycle = CycleProgress(
            number=self._cycle_number,
            trigger=trigger,
            started_wall=_wall(),
            started=trio.current_time(),
        )
        self.cycle = cycle
        symbols = list(self.config.backfill.symbols)
        cycle.symbols = dict.fromkeys(symbols, "queued")
        self._pending = collections.deque(symbols)
        logger.info("cycle {} ({}): {} symbols x {} timeframes", cycle.number, trigger,
                    len(symbols), len(self.config.backfill.timeframes))
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
                self._last_start = trio.current_time()
                self._running += 1
                nursery.start_soon(self._symbol_task, cycle, symbol)
        cycle.finished = trio.current_time()
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
            self._changed.set()

    async def _plan_symbol(self, cycle: CycleProgress, symbol: str) -> list[Job]:
        """Plan the symbol's jobs from its current checkpoints (read just before it starts)."""
        try:
            checkpoints = await self._checkpoints(symbol)
        except DatabaseError as exc:
            state = JobState(symbol, "*", 0, 0, fetch_error=str(exc))
            state.done.set()
            cycle.jobs.append(state)
            return []
        today = self._today()
        running = {(j.symbol, j.timeframe) for j in cycle.jobs if not j.done.is_set()}
        jobs = []
        for tf in self.config.backfill.timeframes:
            if (symbol, tf.label) in running:
                continue
            job = plan_job(self.config, symbol, tf, checkpoints.get((symbol, tf.label)), today)
            if job is not None:
                jobs.append(job)
        return jobs

    def _wanted(self, job: Job) -> bool:
        bf = self.config.backfill
        return job.symbol in bf.symbols and job.timeframe in bf.timeframes

    async def _job_task(self, cycle: CycleProgress, job: Job) -> None:
        state = JobState(job.symbol, job.timeframe.label, job.from_ms, job.to_ms)
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
