"""One API budget for every instance: the key's token bucket kept in PostgreSQL.

`requests_per_minute` is the key's budget, however many daemons use the key. The bucket is one
row of `api_budget` per key (its SHA-256, never the key) holding a reservation pointer,
`next_slot`: taking n tokens moves it n intervals on and hands back the n send times, in one
statement under the row's lock, so instances never overlap and the database sees one
statement per batch, not per request (a batch is about half a second of requests: ~50 at the
"unlimited" 100 req/s, 1 on a free plan). The adaptive rate lives in the row too: a 429 seen by
any instance slows `effective_per_minute` for all (and a Retry-After pauses all), successes
reported with the next batch give it back step by step (the same AIMD as daemon.ratelimit).

Slot times are the database's clock (`clock_timestamp()`), turned into this process's trio
time with the database's own "now" read in the same statement, so machines with skewed clocks
still space their requests on one timeline.

An instance alone gets exactly its local behaviour: one row, one reader, the same spacing.

Error handling: the database unavailable is waited out (requests wait with it: they could not
be written anyway); any other error is raised (a bug).
"""

from __future__ import annotations

import hashlib
import math

import attrs
import psycopg
import trio

from . import db
from .config import Secret
from .errors import DatabaseError, DatabaseUnavailable
from .retrying import when_available

__all__ = ["BATCH_SECONDS", "Reservation", "SharedBudget", "key_hash"]

# A batch holds about this many seconds of tokens at the effective rate (at least one).
BATCH_SECONDS = 0.5


def key_hash(key: Secret) -> str:
    """The row's key: the API key's SHA-256 (hex)."""
    return hashlib.sha256(key.reveal().encode()).hexdigest()


@attrs.frozen
class Reservation:
    """`count` send times, `first` and then every `spacing` seconds (trio time)."""

    first: float
    spacing: float
    count: int
    effective_per_minute: float

    def times(self) -> list[float]:
        return [self.first + i * self.spacing for i in range(self.count)]


_ENSURE = """
INSERT INTO api_budget (key_hash, configured_per_minute, effective_per_minute)
VALUES (%(key)s, %(configured)s, %(configured)s)
ON CONFLICT (key_hash) DO NOTHING
"""
_RESERVE = """
WITH cur AS (
    SELECT * FROM api_budget WHERE key_hash = %(key)s FOR UPDATE
), rate AS (
    SELECT CASE
        WHEN cur.configured_per_minute <> %(configured)s THEN %(configured)s
        WHEN %(slowdowns)s > 0 THEN greatest(
            least(cur.effective_per_minute, %(configured)s) * power(%(slowdown)s, %(slowdowns)s),
            %(configured)s * %(floor)s)
        ELSE least(%(configured)s,
                   cur.effective_per_minute + %(successes)s * %(recovery)s * %(configured)s)
        END AS effective,
        CASE WHEN %(retry_after)s > 0
             THEN greatest(coalesce(cur.paused_until, '-infinity'),
                           clock_timestamp() + %(retry_after)s * interval '1 second')
             ELSE cur.paused_until END AS paused
    FROM cur
), slot AS (
    SELECT rate.effective, rate.paused,
           greatest(cur.next_slot, clock_timestamp(), coalesce(rate.paused, '-infinity'))
               AS first
    FROM cur, rate
)
UPDATE api_budget b SET
    configured_per_minute = %(configured)s,
    effective_per_minute = slot.effective,
    paused_until = slot.paused,
    next_slot = slot.first + %(count)s * (60.0 / slot.effective) * interval '1 second',
    granted = b.granted + %(count)s,
    slowdowns = b.slowdowns + %(slowdowns)s,
    updated_at = now()
FROM slot WHERE b.key_hash = %(key)s
RETURNING extract(epoch FROM slot.first - clock_timestamp()), 60.0 / slot.effective,
          slot.effective
"""


class SharedBudget:
    """The key's budget in the database (see the module docstring), on its own connection."""

    def __init__(self, url: str, key: Secret, *, slowdown: float, floor: float,
                 recovery: float) -> None:
        self._url = url
        self._key = key_hash(key)
        self._slowdown, self._floor, self._recovery = slowdown, floor, recovery
        self._conn: psycopg.Connection | None = None
        self._limiter = trio.CapacityLimiter(1)
        self.reservations = 0

    def batch(self, effective_per_minute: float, waiting: int) -> int:
        """How many tokens to take now: what is waiting, up to BATCH_SECONDS of the rate."""
        most = max(1, math.floor(effective_per_minute / 60 * BATCH_SECONDS))
        return max(1, min(waiting, most))

    async def reserve(self, count: int, *, configured_per_minute: float, slowdowns: int,
                      successes: int, retry_after: float) -> Reservation:
        """Take `count` tokens, reporting what happened since the last batch."""
        params = {"key": self._key, "configured": configured_per_minute, "count": count,
                  "slowdowns": slowdowns, "successes": successes,
                  "retry_after": retry_after, "slowdown": self._slowdown,
                  "floor": self._floor, "recovery": self._recovery}
        delay, spacing, effective = await when_available(self._reserve, params,
                                                         limiter=self._limiter)
        self.reservations += 1
        return Reservation(trio.current_time() + max(0.0, delay), spacing, count, effective)

    def _reserve(self, params: dict[str, object]) -> tuple[float, float, float]:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = db.connect(self._url, autocommit=True)
            conn = self._conn
            with conn.transaction():
                conn.execute(_ENSURE, params)
                row = conn.execute(_RESERVE, params).fetchone()
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self.close()
            raise DatabaseUnavailable(f"the shared API budget: {exc}") from None
        except psycopg.Error as exc:
            raise DatabaseError(f"the shared API budget: {exc}") from None
        assert row is not None
        return float(row[0]), float(row[1]), float(row[2])

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
