"""What the scheduler reports: frozen snapshots of cycles and their jobs, and their states.

The scheduler keeps its working state private; everything else (status, metrics, the STATUS=
line, `run --once`) reads these frozen values from `Scheduler.statistics()`. The rules that
summarise a cycle (done, failed, ok, the execution's status) live here, once.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping

import attrs

from .jobs import JobOutcome

__all__ = [
    "CycleSnapshot",
    "ExecutionStatus",
    "JobSnapshot",
    "SchedulerState",
    "SchedulerStatistics",
    "SymbolState",
]


class SymbolState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class SchedulerState(enum.StrEnum):
    BACKFILLING = "backfilling"  # a cycle is running
    WAITING = "waiting"  # between cycles
    STOPPING = "stopping"


class ExecutionStatus(enum.StrEnum):
    """`executions.status` of a finished cycle."""

    OK = "ok"
    PARTIAL = "partial"  # everything ran, but a series was refused or bars were quarantined
    FAILED = "failed"
    INTERRUPTED = "interrupted"


@attrs.frozen
class JobSnapshot:
    """One job as of the snapshot. `outcome` is None while the job runs."""

    symbol: str
    timeframe: str
    outcome: JobOutcome | None
    bars_written: int
    pages_fetched: int
    attempts: int
    error: str | None
    api_seconds: float = 0.0
    db_seconds: float = 0.0
    pages_written: int = 0
    quarantined: int = 0

    @property
    def done(self) -> bool:
        return self.outcome is not None

    @property
    def ok(self) -> bool:
        return self.outcome is JobOutcome.OK

    @property
    def failed(self) -> bool:
        return self.outcome is JobOutcome.FAILED

    @property
    def cancelled(self) -> bool:
        return self.outcome is JobOutcome.CANCELLED

    @property
    def not_entitled(self) -> bool:
        return self.outcome is JobOutcome.NOT_ENTITLED


@attrs.frozen
class CycleSnapshot:
    """One cycle, running or finished. Times are trio times except `started_wall` (Unix).

    `requests`, `rate_limited` and `retries` are the client's counts sent during the cycle
    (so far, for a running one).
    """

    number: int
    trigger: str
    execution_id: uuid.UUID
    started_wall: float
    started: float
    finished: float | None
    symbols: Mapping[str, SymbolState]
    jobs: tuple[JobSnapshot, ...]
    auth_error: str | None
    requests: int
    rate_limited: int
    retries: int
    status: ExecutionStatus | None = None  # once finished

    @property
    def jobs_done(self) -> int:
        return sum(1 for j in self.jobs if j.done)

    @property
    def failed(self) -> list[JobSnapshot]:
        return [j for j in self.jobs if j.failed]

    @property
    def cancelled(self) -> list[JobSnapshot]:
        return [j for j in self.jobs if j.cancelled]

    @property
    def not_entitled(self) -> list[JobSnapshot]:
        return [j for j in self.jobs if j.not_entitled]

    @property
    def bars_written(self) -> int:
        return sum(j.bars_written for j in self.jobs)

    @property
    def quarantined(self) -> int:
        return sum(j.quarantined for j in self.jobs)

    @property
    def ok(self) -> bool:
        """Everything fetched and written: no failure, no refusal, nothing quarantined (what
        `run --once` exits 0 on)."""
        return (not self.failed and self.auth_error is None and not self.not_entitled
                and not self.quarantined)

    @property
    def unfinished(self) -> bool:
        return any(s in (SymbolState.QUEUED, SymbolState.RUNNING) for s in self.symbols.values())

    def execution_status(self, *, interrupted: bool) -> ExecutionStatus:
        """What `executions.status` says: interrupted when anything was cut short."""
        if interrupted or self.cancelled or self.unfinished:
            return ExecutionStatus.INTERRUPTED
        if self.failed or self.auth_error is not None:
            return ExecutionStatus.FAILED
        return ExecutionStatus.OK if self.ok else ExecutionStatus.PARTIAL


@attrs.frozen
class SchedulerStatistics:
    """The scheduler as of now.

    Attributes:
        state: backfilling / waiting / stopping.
        cycle: The running cycle, or None.
        last_cycle: The last finished cycle, or None.
        next_cycle_at: trio time the next scheduled cycle is due while waiting, else None.
        cycles_finished: Finished cycles by status (ok / failed / interrupted).
    """

    state: SchedulerState
    cycle: CycleSnapshot | None
    last_cycle: CycleSnapshot | None
    next_cycle_at: float | None
    cycles_finished: Mapping[str, int]
    timeframes: int  # configured timeframes per symbol (what a queued symbol will plan)
    symbol_slots: int  # symbols that may run at once (the CapacityLimiter's size)
