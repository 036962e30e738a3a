"""How late the event loop answers: a task that sleeps a short interval and measures how much
later than asked it woke.

Everything the daemon serves (status probes, the watchdog, heartbeats, the rate limiter's send
times) runs on the one trio thread, so CPU work left on it (a decode, a COPY encoding) shows
up here first. /metrics and /status report the last lag and the worst of the last minute.

Error handling: none needed; the task only reads the clock.
"""

from __future__ import annotations

from collections import deque

import attrs
import trio

__all__ = ["LoopLag", "LoopLagStatistics"]

INTERVAL_SECONDS = 0.25
WINDOW_SECONDS = 60.0


@attrs.frozen
class LoopLagStatistics:
    last_seconds: float  # the latest wake-up's lateness
    max_seconds: float  # the worst over the last WINDOW_SECONDS
    samples: int


class LoopLag:
    """Measures the trio loop's lateness every `interval` seconds (`run`, in the root nursery)."""

    def __init__(self, *, interval: float = INTERVAL_SECONDS, window: float = WINDOW_SECONDS
                 ) -> None:
        self._interval = interval
        self._recent: deque[tuple[float, float]] = deque()  # (woke at, lag)
        self._window = window
        self._last = 0.0
        self._samples = 0

    def statistics(self) -> LoopLagStatistics:
        worst = max((lag for _, lag in self._recent), default=0.0)
        return LoopLagStatistics(self._last, worst, self._samples)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        while True:
            asked = trio.current_time() + self._interval
            await trio.sleep_until(asked)
            woke = trio.current_time()
            self.record(woke, woke - asked)

    def record(self, woke: float, lag: float) -> None:
        self._last = max(0.0, lag)
        self._samples += 1
        self._recent.append((woke, self._last))
        while self._recent and self._recent[0][0] < woke - self._window:
            self._recent.popleft()
