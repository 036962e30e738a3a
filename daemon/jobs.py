"""Jobs: what a job is, how it ended, and the receipt the writer keeps for it.

A job brings one series `(symbol, timeframe)` up to date within one cycle. Two tasks work on
it and each owns its half: the producer (the scheduler's job task) fetches pages and knows how
the fetching went; the writer commits them and knows how the writing went. The writer reports
back through the job's `Receipt`, which only the writer changes, and only on the trio thread
after a commit (never from the worker thread inside a transaction), so nothing is written by
two tasks and nothing is read half-updated.

How a job ended is decided once, by `JobOutcome.decide`, from both halves; `job_results`,
`executions`, /status, metrics and `run --once` all read that one value.
"""

from __future__ import annotations

import enum
import uuid

import attrs
import trio

__all__ = ["FetchResult", "JobOutcome", "Lease", "Receipt", "SeriesKey"]


@attrs.frozen(order=True)
class SeriesKey:
    """One series: a ticker at one timeframe label (`"5m"`, `"1d"`)."""

    symbol: str
    timeframe: str

    def __str__(self) -> str:
        return f"{self.symbol} {self.timeframe}"


@attrs.frozen
class Lease:
    """The right to write a series (daemon.leases): the holder's instance id and the fence the
    claim got. Every page's transaction checks both, so a holder that lost it writes nothing."""

    holder: str
    fence: int


class JobOutcome(enum.Enum):
    """How a job ended. The value is what `job_results.status` stores."""

    OK = "ok"
    FAILED = "failed"
    CANCELLED = "cancelled"  # stopped by a stop or a reload that removed the series
    NOT_ENTITLED = "not_entitled"  # the API plan does not cover this series (403)

    @classmethod
    def decide(cls, *, fetch_error: str | None, write_error: str | None,
               cancelled: bool, refused: str | None = None,
               lease_lost: bool = False) -> JobOutcome:
        """The one rule. Any error fails the job, even one that was also cancelled: a page the
        database rejected is a failure whatever happened to the job afterwards. A series the
        plan refuses is not a failure of the daemon: it has its own outcome."""
        if fetch_error is not None or write_error is not None:
            return cls.FAILED
        if refused is not None:
            return cls.NOT_ENTITLED
        # another instance took the series over (its lease lapsed): the job stopped, the
        # series goes on elsewhere
        return cls.CANCELLED if cancelled or lease_lost else cls.OK


@attrs.frozen
class FetchResult:
    """The producer's half of a finished job, sent to the writer with the job's last message.

    Attributes:
        from_ms / to_ms: The range the job asked for.
        pages: Pages fetched. attempts: HTTP attempts, retries included.
        api_seconds: Wall time spent fetching (token waits and backoff included).
        error: Why fetching failed, or None. cancelled: the job stopped early on purpose.
        refused: The API's message when it refused the series (not entitled), else None.
        asked: False when the refusal is a recent one remembered, not a new request.
    """

    from_ms: int
    to_ms: int
    pages: int = 0
    attempts: int = 0
    api_seconds: float = 0.0
    error: str | None = None
    cancelled: bool = False
    refused: str | None = None
    asked: bool = True

    def outcome(self, write_error: str | None, *, lease_lost: bool = False) -> JobOutcome:
        return JobOutcome.decide(fetch_error=self.error, write_error=write_error,
                                 cancelled=self.cancelled, refused=self.refused,
                                 lease_lost=lease_lost)


@attrs.define(eq=False)
class Receipt:
    """The writer's half of one job: what it committed, and the outcome once the job is done.

    Written only by the writer (on the trio thread, after each commit); read by the job's
    producer, by the scheduler's statistics and nothing else. `finished` is set once the job's
    last message is committed, after which `outcome` is final.
    """

    execution_id: uuid.UUID | None = None
    bars_written: int = 0
    pages_written: int = 0
    bars_quarantined: int = 0
    db_seconds: float = 0.0
    write_error: str | None = None
    lease_lost: bool = False  # a page was refused: another instance holds the series now
    outcome: JobOutcome | None = None
    finished: trio.Event = attrs.field(factory=trio.Event)
