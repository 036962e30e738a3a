"""Snapshots built by hand, for the pure reporters (STATUS=, health, views) on MockClock."""

from __future__ import annotations

import uuid
from typing import Any

import attrs

from daemon.breaker import BreakerStatistics, CircuitBreaker
from daemon.config import Config, parse_config
from daemon.cycles import (
    CycleSnapshot,
    JobSnapshot,
    SchedulerState,
    SchedulerStatistics,
    SymbolState,
)
from daemon.features import FeaturesStatistics
from daemon.jobs import JobOutcome
from daemon.leases import CoordinatorStatistics
from daemon.looplag import LoopLagStatistics
from daemon.polygon import ClientStatistics
from daemon.ratelimit import RateLimiterStatistics
from daemon.snapshot import ReloadStatistics, Snapshot
from daemon.writer import WriterStatistics

CONFIG = parse_config('[backfill]\nsymbols = ["A", "B", "C", "D"]\n', env={})


def job(symbol: str, outcome: JobOutcome | None, error: str | None = None,
        bars: int = 0) -> JobSnapshot:
    return JobSnapshot(symbol, "1d", outcome, bars, 1, 1, error)


def cycle(number: int = 3, *, started: float = 100.0, finished: float | None = None,
          symbols: dict[str, SymbolState] | None = None,
          jobs: tuple[JobSnapshot, ...] = (), auth_error: str | None = None) -> CycleSnapshot:
    return CycleSnapshot(
        number=number, trigger="schedule", execution_id=uuid.UUID(int=number),
        started_wall=1_700_000_000.0, started=started, finished=finished,
        symbols=symbols or {}, jobs=jobs, auth_error=auth_error, requests=0, rate_limited=0,
        retries=0)


def snapshot(*, now: float = 200.0, config: Config = CONFIG, cycle: CycleSnapshot | None = None,
             last_cycle: CycleSnapshot | None = None, next_cycle_at: float | None = None,
             state: SchedulerState | None = None, bars_written: int = 0,
             reload_error: str | None = None, breaker: BreakerStatistics | None = None,
             **writer: Any) -> Snapshot:
    if state is None:
        state = SchedulerState.BACKFILLING if cycle is not None else SchedulerState.WAITING
    writer_stats = WriterStatistics(
        connected=True, queue_depth=0, queue_capacity=8, pages_written=0,
        bars_written=bars_written, transactions=0, write_errors=0, reconnects=0,
        last_write_seconds=None, busy_since=None, last_progress=0.0)
    return Snapshot(
        version="test", started_at=1_700_000_000.0, wall=1_700_000_000.0 + now, now=now,
        reload=ReloadStatistics(config, 1, 1_700_000_000.0, reload_error,
                                None if reload_error is None else 1_700_000_001.0),
        api=ClientStatistics(0, 0, 0, 0, 0, 0, 0),
        limiter=RateLimiterStatistics(config.polygon.requests_per_minute,
                                      config.polygon.requests_per_minute, 0, 0, None, 0, 16),
        breaker=breaker or CircuitBreaker().statistics(),
        writer=attrs.evolve(writer_stats, **writer),
        features=FeaturesStatistics(True, 0, 0, 0, None, None, 0, 0, None, None),
        instances=CoordinatorStatistics("host:1:abc", config.instance, 0, 0, 0, 0, None, ()),
        scheduler=SchedulerStatistics(state, cycle, last_cycle, next_cycle_at, {},
                                      len(config.backfill.timeframes), 3),
        loop=LoopLagStatistics(0.001, 0.004, 10),
    )
