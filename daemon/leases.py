"""Several daemons, one database: each process registers, heartbeats, and leases its series.

PostgreSQL is the coordinator (no other service, no consensus of our own):

- `instances`: one row per process, its id unique per process (host, pid, a random suffix), so
  N processes started from one config file on one host cooperate with nothing edited. The
  heartbeat moves every `lease_seconds / 3`.
- `series_leases`: a series is worked on by the instance holding its lease. A symbol's series
  are claimed together with `SELECT ... FOR UPDATE SKIP LOCKED` (a series another claimer is
  claiming right now is skipped, not waited for), renewed with the heartbeat, released in the
  job's last transaction (with `done_at` when it ended up to date), and lapse when the holder
  stops renewing (SIGKILL, power loss, a network split): another instance then takes the lease
  over and resumes from the series' coverage.
- Fencing: every claim increments the lease's `fence`, and each page's transaction checks
  (holder, fence) under a row lock (daemon.writer): a holder paused past its lease (a
  SIGSTOP, a VM freeze) can never commit after another took the series over.

An instance alone behaves as before: it claims every series it plans.

Error handling: the database unavailable is waited out (daemon.retrying.when_available); the
keeper's renewals are retried on its next tick. A holder that cannot renew for `lease_seconds`
loses its leases to whoever claims them next; its writer's fencing then refuses its pages.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import TypeVar

import attrs
import psycopg
import trio
from loguru import logger

from . import __version__, db
from .errors import DatabaseError, DatabaseUnavailable
from .jobs import Lease, SeriesKey
from .retrying import when_available

__all__ = ["Claim", "Coordinator", "CoordinatorStatistics", "Identity", "InstanceInfo",
           "reap_local"]

T = TypeVar("T")

# A lease lapses this long after its last renewal (renewed every third of it).
DEFAULT_LEASE_SECONDS = 30.0
# Instances whose heartbeat is older than this many lease periods are shown as dead.
DEAD_AFTER_LEASES = 2


@attrs.frozen
class Identity:
    """Who this process is, among the instances sharing the database."""

    id: str
    label: str
    host: str
    pid: int

    @classmethod
    def new(cls, label: str) -> Identity:
        host = socket.gethostname()
        pid = os.getpid()
        return cls(f"{host}:{pid}:{secrets.token_hex(3)}", label, host, pid)


@attrs.frozen
class Claim:
    """What a claim got: the leases this instance now holds (timeframe -> Lease), the series
    done by another instance since `due_before` (nothing to do), and the ones another live
    instance holds now (wait for them, or leave them to it)."""

    granted: dict[str, Lease]
    done_elsewhere: frozenset[str]
    held_elsewhere: frozenset[str]


@attrs.frozen
class InstanceInfo:
    id: str
    label: str
    host: str
    pid: int
    version: str
    started_at: float  # Unix seconds
    heartbeat_at: float
    alive: bool
    leases: int
    stopped: bool = False  # it said goodbye (a clean stop), as opposed to going silent


@attrs.frozen
class CoordinatorStatistics:
    """For /status and /metrics: this instance, its leases, and every instance it saw."""

    instance_id: str
    label: str
    leases_held: int
    claims: int
    takeovers: int  # leases claimed from a holder whose lease had lapsed
    renewals: int
    last_heartbeat_at: float | None  # Unix seconds
    instances: tuple[InstanceInfo, ...]


_REGISTER = """
INSERT INTO instances (id, label, host, pid, version) VALUES (%(id)s, %(label)s, %(host)s,
    %(pid)s, %(version)s)
ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), stopped_at = NULL
"""
_HEARTBEAT = "UPDATE instances SET heartbeat_at = now() WHERE id = %(id)s"
_RENEW = """
UPDATE series_leases SET expires_at = now() + %(ttl)s * interval '1 second'
WHERE holder = %(id)s
"""
_ENSURE = """
INSERT INTO series_leases (symbol, timeframe)
SELECT %(symbol)s, tf FROM unnest(%(timeframes)s::text[]) AS tf
ON CONFLICT (symbol, timeframe) DO NOTHING
"""
# Skip what another claimer has locked this instant: it is being claimed, not ours to wait for.
_CLAIM = """
WITH free AS (
    SELECT symbol, timeframe, holder, expires_at FROM series_leases
    WHERE symbol = %(symbol)s AND timeframe = ANY(%(timeframes)s)
      AND (holder IS NULL OR holder = %(id)s OR expires_at < now())
      AND (done_at IS NULL OR done_at < %(due_before)s OR done_by = %(id)s)
    FOR UPDATE SKIP LOCKED)
UPDATE series_leases l SET holder = %(id)s, fence = l.fence + 1, acquired_at = now(),
       expires_at = now() + %(ttl)s * interval '1 second'
FROM free WHERE l.symbol = free.symbol AND l.timeframe = free.timeframe
RETURNING l.timeframe, l.fence, free.holder
"""
_OTHERS = """
SELECT timeframe, coalesce(done_at >= %(due_before)s AND done_by <> %(id)s, false)
FROM series_leases
WHERE symbol = %(symbol)s AND timeframe = ANY(%(timeframes)s)
"""
_STOPPED = """
WITH released AS (
    UPDATE series_leases SET holder = NULL, expires_at = NULL WHERE holder = %(id)s)
UPDATE instances SET stopped_at = now(), heartbeat_at = now() WHERE id = %(id)s
"""
_INSTANCES = """
SELECT i.id, i.label, i.host, i.pid, i.version, i.started_at, i.heartbeat_at,
       i.stopped_at IS NULL AND i.heartbeat_at > now() - %(dead)s * interval '1 second',
       (SELECT count(*) FROM series_leases l WHERE l.holder = i.id AND l.expires_at > now()),
       i.stopped_at IS NOT NULL
FROM instances i
WHERE i.stopped_at IS NULL OR i.stopped_at > now() - interval '1 hour'
ORDER BY i.started_at
"""
_FORGET = "DELETE FROM instances WHERE heartbeat_at < now() - interval '7 days'"


def reap_local(url: str, host: str) -> int:
    """Instances of this host whose process is gone (a SIGKILL, a crash): mark them stopped and
    free their leases now, instead of waiting for the leases to lapse. The surest liveness
    test there is for a process of one's own host; other hosts' instances lapse by time.
    Returns how many were reaped."""
    with db.connection(url, autocommit=True) as conn:
        try:
            rows = conn.execute("SELECT id, pid FROM instances WHERE host = %s"
                                " AND stopped_at IS NULL", (host,)).fetchall()
            gone = [i for i, pid in rows if pid != os.getpid() and not _alive(pid)]
            for instance_id in gone:
                conn.execute(_STOPPED, {"id": instance_id})
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"coordination: {exc}") from None
        except psycopg.Error as exc:
            raise DatabaseError(f"coordination: {exc}") from None
    return len(gone)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Coordinator:
    """This process among the others: registration, heartbeat and lease renewal (`run`, in
    the root nursery, on a connection of its own), and claims (`claim`, from the scheduler)."""

    def __init__(self, url: str, identity: Identity, *,
                 lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        self._url = url
        self.identity = identity
        self._ttl = lease_seconds
        self._limiter = trio.CapacityLimiter(1)
        self._conn: psycopg.Connection | None = None
        self._held: set[SeriesKey] = set()
        self._claims = 0
        self._takeovers = 0
        self._renewals = 0
        self._last_heartbeat: float | None = None
        self._instances: tuple[InstanceInfo, ...] = ()

    @property
    def lease_seconds(self) -> float:
        return self._ttl

    def statistics(self) -> CoordinatorStatistics:
        return CoordinatorStatistics(
            self.identity.id, self.identity.label, len(self._held), self._claims,
            self._takeovers, self._renewals, self._last_heartbeat, self._instances)

    # --- the keeper task ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Register, report started, then heartbeat and renew every `lease_seconds / 3`; on
        the way out (a stop), release every lease and mark the instance stopped."""
        await when_available(self._call, self._register, limiter=self._limiter)
        logger.info("instance {} ({}) registered; leases last {:g} s", self.identity.id,
                    self.identity.label, self._ttl)
        task_status.started()
        try:
            while True:
                await trio.sleep(self._ttl / 3)
                try:
                    await trio.to_thread.run_sync(self._call, self._tick,
                                                  limiter=self._limiter)
                except DatabaseError as exc:  # retried next tick; the lease may lapse
                    logger.warning("heartbeat and lease renewal failed: {}", exc)
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(5):
                    try:
                        await trio.to_thread.run_sync(self._call, self._stop,
                                                      limiter=self._limiter)
                    except DatabaseError as exc:
                        logger.warning("could not release the leases at stop (they lapse "
                                       "in {:g} s): {}", self._ttl, exc)
                await trio.to_thread.run_sync(self._close, limiter=self._limiter)

    # --- claims (the scheduler) -------------------------------------------------------------

    async def claim(self, symbol: str, timeframes: list[str], *, due_before: float) -> Claim:
        """Claim the series of `symbol` not done since `due_before` (Unix seconds) by anyone
        and not held by another live instance."""
        return await when_available(self._call, self._claim, symbol, timeframes, due_before,
                                    limiter=self._limiter)

    def released(self, series: SeriesKey) -> None:
        """The writer committed the job's release (trio thread): stop counting it."""
        self._held.discard(series)

    # --- the connection (worker thread) ----------------------------------------------------

    def _call(self, fn: Callable[..., T], *args: object) -> T:
        if self._conn is None or self._conn.closed:
            self._conn = db.connect(self._url, autocommit=True)
        try:
            return fn(self._conn, *args)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self._close()
            raise DatabaseUnavailable(f"coordination: {exc}") from None
        except psycopg.Error as exc:
            raise DatabaseError(f"coordination: {exc}") from None

    def _register(self, conn: psycopg.Connection) -> None:
        ident = self.identity
        conn.execute(_REGISTER, {"id": ident.id, "label": ident.label, "host": ident.host,
                                 "pid": ident.pid, "version": __version__})
        conn.execute(_FORGET)
        self._refresh(conn)

    def _tick(self, conn: psycopg.Connection) -> None:
        with conn.transaction():
            conn.execute(_HEARTBEAT, {"id": self.identity.id})
            conn.execute(_RENEW, {"id": self.identity.id, "ttl": self._ttl})
        self._renewals += 1
        self._refresh(conn)

    def _refresh(self, conn: psycopg.Connection) -> None:
        self._last_heartbeat = time.time()
        rows = conn.execute(_INSTANCES, {"dead": DEAD_AFTER_LEASES * self._ttl}).fetchall()
        self._instances = tuple(
            InstanceInfo(i, label, host, pid, version, started.timestamp(), beat.timestamp(),
                         bool(alive), int(n), bool(stopped))
            for i, label, host, pid, version, started, beat, alive, n, stopped in rows)

    def _claim(self, conn: psycopg.Connection, symbol: str, timeframes: list[str],
               due_before: float) -> Claim:
        params = {"symbol": symbol, "timeframes": timeframes, "id": self.identity.id,
                  "ttl": self._ttl, "due_before": db.from_ms(int(due_before * 1000))}
        with conn.transaction():
            conn.execute(_ENSURE, params)
            granted = {}
            for timeframe, fence, before in conn.execute(_CLAIM, params).fetchall():
                granted[timeframe] = Lease(self.identity.id, int(fence))
                if before is not None and before != self.identity.id:
                    self._takeovers += 1
                    logger.bind(symbol=symbol, timeframe=timeframe).info(
                        "{} {}: lease taken over from {} (it stopped renewing); resuming "
                        "from the coverage", symbol, timeframe, before)
            others = conn.execute(_OTHERS, params).fetchall()
        done = frozenset(tf for tf, is_done in others if is_done and tf not in granted)
        held = frozenset(tf for tf in timeframes if tf not in granted and tf not in done)
        self._claims += len(granted)
        self._held.update(SeriesKey(symbol, tf) for tf in granted)
        return Claim(granted, done, held)

    def _stop(self, conn: psycopg.Connection) -> None:
        conn.execute(_STOPPED, {"id": self.identity.id})
        self._held.clear()

    def close(self) -> None:
        """Close the connection a claim opened outside `run` (`run` closes its own)."""
        self._close()

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
