"""The snapshot boundary: one frozen picture of the running daemon, for everything that reports.

Every part exposes `statistics()` returning a frozen value; the composition root (daemon.compose)
puts them together into a `Snapshot` on demand and hands reporters (the status endpoint, the
metrics, the systemd STATUS= line, the demo's progress line) a `Callable[[], Snapshot]`. The
reporters never see the parts themselves, so they can neither change them nor depend on how
they work, and a new part adds a field here instead of a reach into the daemon.

Times: `now` is trio time (the clock the scheduler's times are in), `wall` Unix seconds, both
read at the same instant, so `wall_of(t)` turns any trio time in the snapshot into wall time.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from .breaker import BreakerStatistics
from .config import Config
from .cycles import SchedulerStatistics
from .features import FeaturesStatistics
from .leases import CoordinatorStatistics
from .looplag import LoopLagStatistics
from .polygon import ClientStatistics
from .ratelimit import RateLimiterStatistics
from .writer import WriterStatistics

__all__ = ["ReloadStatistics", "Snapshot", "SnapshotSource"]


@attrs.frozen
class ReloadStatistics:
    """The config in force and how it got there (daemon.reload)."""

    config: Config
    generation: int
    loaded_at: float  # Unix seconds
    last_error: str | None
    last_error_at: float | None


@attrs.frozen
class Snapshot:
    """The daemon at one instant. Every field is a frozen value owned by its part."""

    version: str
    started_at: float  # process start, Unix seconds
    wall: float  # Unix seconds of the snapshot
    now: float  # trio time of the snapshot
    reload: ReloadStatistics
    api: ClientStatistics
    limiter: RateLimiterStatistics
    breaker: BreakerStatistics
    writer: WriterStatistics
    features: FeaturesStatistics
    instances: CoordinatorStatistics
    scheduler: SchedulerStatistics
    loop: LoopLagStatistics

    @property
    def config(self) -> Config:
        return self.reload.config

    def wall_of(self, trio_time: float) -> float:
        """Unix seconds of a trio time taken from this snapshot."""
        return self.wall - (self.now - trio_time)


SnapshotSource = Callable[[], Snapshot]
