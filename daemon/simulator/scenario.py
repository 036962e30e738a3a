"""The scripted conditions of one simulator run: outages, defect rates, splits.

They start from `SimulatorOptions` and change at run time through the control endpoints
(daemon.simulator.control), so a test can make the API fail, spoil or re-adjust its data at a
moment it observes. Times are trio's clock (`trio.current_time()`), so MockClock drives them.

Error handling: mutators raise ValueError for a request that makes no sense (a negative
duration, a rate outside [0, 1], a split clashing with one registered); the control endpoints
turn that into a 400.
"""

from __future__ import annotations

import attrs

from .options import SimulatorOptions
from .splits import NO_ADJUSTMENT, Adjustment, Split, adjustment

__all__ = ["Scenario"]


class Scenario:
    """Mutable run-time state; one per Simulator, touched only from its trio loop."""

    def __init__(self, options: SimulatorOptions, started_at: float) -> None:
        self.started_at = started_at
        # Half-open [start, end) windows on trio's clock.
        self._outages = [(started_at + start, started_at + start + duration)
                         for start, duration in options.outages]
        self._rates = dict(options.defects)
        self._splits = list(options.splits)
        self._adjustments: dict[tuple[str, bool], Adjustment] = {}

    # --- outages ------------------------------------------------------------------------

    def in_outage(self, now: float) -> bool:
        return any(start <= now < end for start, end in self._outages)

    def start_outage(self, now: float, seconds: float) -> None:
        """An outage over `[now, now + seconds)`; `seconds == 0` ends every outage now."""
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0: {seconds}")
        if seconds == 0:
            self._outages = [(s, min(e, now)) for s, e in self._outages if s < now]
        else:
            self._outages.append((now, now + seconds))

    def outages(self) -> list[tuple[float, float]]:
        """The windows, in seconds after the simulator started."""
        return [(s - self.started_at, e - self.started_at) for s, e in self._outages]

    # --- defects ------------------------------------------------------------------------

    def defect_rate(self, ticker: str) -> float:
        return self._rates.get(ticker, 0.0)

    def set_defect_rate(self, ticker: str, rate: float) -> None:
        if not 0 <= rate <= 1:
            raise ValueError(f"rate must be from 0 to 1: {rate}")
        self._rates[ticker] = rate

    def defect_rates(self) -> dict[str, float]:
        return dict(self._rates)

    # --- splits -------------------------------------------------------------------------

    def splits(self) -> list[Split]:
        """Every registered split, hidden ones included, in registration order."""
        return list(self._splits)

    def adjustment(self, ticker: str, *, adjusted: bool) -> Adjustment:
        """The factors `ticker`'s bars get now (memoized until the splits change)."""
        key = (ticker, adjusted)
        found = self._adjustments.get(key)
        if found is None:
            found = self._adjustments[key] = (
                adjustment(self._splits, ticker, adjusted=adjusted) if self._splits
                else NO_ADJUSTMENT)
        return found

    def register_split(self, split: Split) -> None:
        if any(s.ticker == split.ticker and s.execution_date == split.execution_date
               for s in self._splits):
            raise ValueError(f"{split.ticker} already has a split on {split.execution_date}")
        self._splits.append(split)
        self._adjustments.clear()

    def announce(self, ticker: str, *, every: bool = False) -> list[Split]:
        """Make `ticker`'s earliest hidden split visible (all of them with `every`).

        Returns the splits announced (empty when none was hidden).
        """
        hidden = sorted((i for i, s in enumerate(self._splits)
                         if s.ticker == ticker and s.hidden),
                        key=lambda i: self._splits[i].execution_date)
        chosen = hidden if every else hidden[:1]
        for i in chosen:
            self._splits[i] = attrs.evolve(self._splits[i], hidden=False)
        if chosen:
            self._adjustments.clear()
        return [self._splits[i] for i in chosen]
