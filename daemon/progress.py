"""The live progress line of `backfilld run` on a terminal, drawn with rich below the log lines.

    cycle 1  ━━━━━━━━━━╸───────  jobs 12/40  bars 1,234,567  req/min 148/150  429s 0
    circuit closed  ETA 3m

Only for a person: when stderr is a terminal and not the journal
(`daemon.log.running_under_journald`); anywhere else `run` writes its plain log lines and
nothing more. While the line is up, the log sink writes through rich's stderr proxy, so log
lines keep appearing, scrolling above it; when `run` returns the line goes and logging is set
back on the real stderr.

What it shows is a pure function (`render`) of a `daemon.snapshot.Snapshot`, the cycle's
estimate and the request rate measured over the last minute; it never reaches into the parts.
The estimate is `backfilld plan`'s (daemon.plan_cli.plan_cycle), computed from the database's
coverage in a worker thread: once at start (before the first cycle has written anything: a
fresh database plans the whole backfill), then at the start of every later cycle. The ETA is
the estimate's requests not yet sent at the measured rate (the budget, before there is one).

Error handling: an estimate that cannot be computed (database unreachable) leaves the ETA out;
the progress line never fails `run`.
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TextIO, TypeVar

import attrs
import trio
from loguru import logger

from .cycles import SchedulerState
from .errors import BackfilldError
from .log import running_under_journald, setup_logging
from .snapshot import Snapshot, SnapshotSource
from .timefmt import human_age

if TYPE_CHECKING:  # rich is loaded only when a line is drawn (not under systemd, not in pipes)
    from rich.console import RenderableType
    from rich.live import Live

__all__ = ["CycleEstimate", "RateMeter", "render", "run", "should_draw"]

# Redraws per second: often enough to look live, rarely enough to cost nothing.
REFRESH_SECONDS = 0.5
# Requests per minute are measured over this much of the recent past.
RATE_WINDOW_SECONDS = 60.0
BAR_WIDTH = 20

T = TypeVar("T")


def should_draw(stream: TextIO) -> bool:
    """True when `stream` is a terminal a person watches: a TTY, and not the journal."""
    try:
        tty = bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or closed
        return False
    return tty and not running_under_journald(stream)


@attrs.frozen
class CycleEstimate:
    """`backfilld plan`'s numbers for one cycle, and the cycle's requests when it was made."""

    cycle: int
    jobs: int
    requests: int
    baseline_requests: int = 0


class RateMeter:
    """Requests per minute over the last RATE_WINDOW_SECONDS, from (time, total) samples."""

    def __init__(self, window: float = RATE_WINDOW_SECONDS) -> None:
        self._window = window
        self._samples: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, now: float, total_requests: int) -> None:
        self._samples.append((now, total_requests))
        while len(self._samples) > 2 and self._samples[1][0] <= now - self._window:
            self._samples.popleft()

    def per_minute(self) -> float | None:
        """None until two samples at least a second apart exist."""
        if len(self._samples) < 2:
            return None
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        if t1 - t0 < 1.0:
            return None
        return (n1 - n0) / (t1 - t0) * 60


def _budget(snap: Snapshot) -> str:
    limit = snap.limiter.effective_per_minute
    return "unlimited" if limit <= 0 else f"{limit:g}"


def render(snap: Snapshot, estimate: CycleEstimate | None, rate: float | None) -> str:
    """The progress line for `snap` (the text part; `renderable` adds the bar)."""
    rate_text = "-" if rate is None else f"{rate:,.0f}"
    common = (f"req/min {rate_text}/{_budget(snap)}  429s {snap.api.rate_limited_count:,}  "
              f"circuit {snap.breaker.state.value}")
    sched = snap.scheduler
    cycle = sched.cycle
    if cycle is None:
        if sched.state is SchedulerState.STOPPING:
            return f"stopping  bars {snap.writer.bars_written:,}  {common}"
        last = sched.last_cycle
        when = ("" if sched.next_cycle_at is None
                else f" in {human_age(max(0.0, sched.next_cycle_at - snap.now))}")
        summary = "" if last is None else (f"  last cycle {last.number}: {len(last.jobs)} "
                                           f"jobs, {len(last.failed)} failed")
        if last is None and sched.next_cycle_at is None:
            return f"starting  {common}"
        return f"waiting: next cycle{when}{summary}  bars {snap.writer.bars_written:,}  {common}"
    done, total = cycle.jobs_done, _total_jobs(snap, estimate)
    eta = _eta(snap, estimate, rate)
    state = "stopping" if sched.state is SchedulerState.STOPPING else f"cycle {cycle.number}"
    return (f"{state}  jobs {done}/{total}  bars {cycle.bars_written:,}  {common}"
            f"  ETA {eta}")


def _total_jobs(snap: Snapshot, estimate: CycleEstimate | None) -> int:
    cycle = snap.scheduler.cycle
    assert cycle is not None
    if estimate is not None and estimate.cycle == cycle.number:
        planned = estimate.jobs
    else:
        bf = snap.config.backfill
        planned = len(bf.symbols) * len(bf.timeframes)
    return max(planned, len(cycle.jobs))


def _eta(snap: Snapshot, estimate: CycleEstimate | None, rate: float | None) -> str:
    cycle = snap.scheduler.cycle
    if cycle is None or estimate is None or estimate.cycle != cycle.number:
        return "-"
    sent = cycle.requests - estimate.baseline_requests
    remaining = max(0, estimate.requests - sent)
    if remaining == 0:
        return "soon"
    budget = snap.limiter.effective_per_minute
    per_minute = rate if rate else (budget if budget > 0 else None)
    if not per_minute:
        return "-"
    return human_age(remaining / per_minute * 60)


def renderable(snap: Snapshot, estimate: CycleEstimate | None, rate: float | None
               ) -> RenderableType:
    """`render`'s line behind a bar of the cycle's jobs."""
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    line = Text(render(snap, estimate, rate))
    cycle = snap.scheduler.cycle
    if cycle is None:
        return line
    grid = Table.grid(padding=(0, 1))
    grid.add_row(ProgressBar(total=max(1, _total_jobs(snap, estimate)),
                             completed=cycle.jobs_done, width=BAR_WIDTH), line)
    return grid


# --- running it ----------------------------------------------------------------------------


def run(main: Callable[[], Awaitable[T]], snapshot: SnapshotSource, db_url: str, *,
        stream: TextIO | None = None) -> T:
    """`trio.run(main)`, with the progress line on `stream` (default stderr) when a person
    watches it (`should_draw`); plain `trio.run(main)` otherwise."""
    stream = stream or sys.stderr
    if not should_draw(stream):
        return trio.run(main)
    return trio.run(_with_progress, main, snapshot, db_url, stream)


async def _with_progress(main: Callable[[], Awaitable[T]], snapshot: SnapshotSource,
                         db_url: str, stream: TextIO) -> T:
    from rich.console import Console
    from rich.live import Live

    config = snapshot().config
    console = Console(file=stream)
    live = Live(console=console, auto_refresh=False, transient=True, redirect_stdout=True,
                redirect_stderr=True)
    with live:
        # sys.stderr is rich's proxy now: log lines print above the live line
        setup_logging(config.logging.level, config.logging.format, stream=sys.stderr)
        error: Exception | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_draw, live, snapshot, db_url)
                # main's error leaves as itself, not in an exception group (exit codes)
                try:
                    result = await main()
                except Exception as exc:
                    error = exc
                nursery.cancel_scope.cancel()
        finally:
            level = snapshot().config.logging
            setup_logging(level.level, level.format, stream=stream)
    if error is not None:
        raise error
    return result


async def _draw(live: Live, snapshot: SnapshotSource, db_url: str) -> None:
    """Redraw until cancelled; a failure here stops the drawing, never `run`."""
    try:
        await _redraw(live, snapshot, db_url)
    except Exception as exc:  # a bug in a reporter must not stop the daemon
        logger.warning("progress line stopped: {}: {}", type(exc).__name__, exc)


async def _redraw(live: Live, snapshot: SnapshotSource, db_url: str) -> None:
    meter = RateMeter()
    # Before the first cycle writes anything; tried again when it starts if this failed (a
    # fresh database being migrated meanwhile), then once at the start of every later cycle.
    estimate = await _estimate(snapshot(), db_url, cycle=1, baseline=0)
    planned = 0 if estimate is None else 1
    while True:
        snap = snapshot()
        cycle = snap.scheduler.cycle
        if cycle is not None and cycle.number > planned:
            planned = cycle.number
            estimate = await _estimate(snap, db_url, cycle=cycle.number,
                                       baseline=cycle.requests)
        meter.add(snap.now, snap.api.total_requests)
        live.update(renderable(snap, estimate, meter.per_minute()), refresh=True)
        await trio.sleep(REFRESH_SECONDS)


async def _estimate(snap: Snapshot, db_url: str, *, cycle: int, baseline: int
                    ) -> CycleEstimate | None:
    """The plan of the coming (or just started) cycle, from the coverage as it is now."""
    from .plan_cli import plan_cycle, read_state

    config = snap.config

    def compute() -> CycleEstimate:
        plan = plan_cycle(config, read_state(db_url))
        return CycleEstimate(cycle, plan.jobs, plan.requests, baseline)

    try:
        return await trio.to_thread.run_sync(compute, abandon_on_cancel=True)
    except BackfilldError as exc:
        logger.debug("progress line: no estimate: {}", exc)
        return None
