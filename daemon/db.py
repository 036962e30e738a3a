"""PostgreSQL access outside the writer: connecting, migrations, reading coverage.

Everything here is synchronous psycopg 3, called from trio through `trio.to_thread.run_sync`:
psycopg's AsyncConnection needs an asyncio loop, and a sync connection in a thread measured
faster (~5,800 round trips/s) than AsyncConnection under trio-asyncio (~3,500/s).

Migrations are `sql/NNN_name.sql`, applied in order, each in its own transaction, recorded with a
checksum in `schema_migrations`. An advisory lock makes concurrent starts (several daemons on one
database) apply each migration once. A migration whose file changed after it was applied is an
error: the schema on disk and in the database must not silently diverge.

Error handling: psycopg errors become DatabaseError with the URL's password redacted; a server
that cannot be reached is DatabaseUnavailable, which callers wait out with
`daemon.retrying.when_available`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from importlib import resources
from pathlib import Path

import attrs
import psycopg
from psycopg.types.multirange import Multirange

from .errors import DatabaseError, DatabaseUnavailable
from .spans import EMPTY, Spans, spans

__all__ = [
    "Migration",
    "apply_migrations",
    "connect",
    "ensure_partitions",
    "ensure_history_partitions",
    "lower_server_priority",
    "from_ms",
    "load_migrations",
    "pending_migrations",
    "SeriesState",
    "read_coverage",
    "read_series_state",
    "spans_of",
    "to_ms",
]

CONNECT_TIMEOUT_SECONDS = 10
# Any constant will do; it only has to be the same for every backfilld instance.
_MIGRATION_LOCK_KEY = 0x6261_636B_6669_6C6C  # "backfill"
_MIGRATION_FILE = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")
# Creating a partition locks its parent table ACCESS EXCLUSIVE. Queued behind a long reader (a
# features computation reads `bars` for seconds), that request would stall every later reader
# and writer of the table, the writer's page transactions and, through their lease row locks,
# lease renewal. So each creation waits at most this long, in a transaction of its own, and
# tries again after a pause in which the others go on.
PARTITION_LOCK_TIMEOUT_MS = 200
PARTITION_RETRY_MAX_SECONDS = 2.0
_PARTITIONED = ("bars", "features")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MS = dt.timedelta(milliseconds=1)


def to_ms(ts: dt.datetime) -> int:
    """Exact Unix ms of a timestamptz (no float rounding)."""
    return (ts - _EPOCH) // _MS


def from_ms(ms: int) -> dt.datetime:
    """Exact timestamptz for Unix ms."""
    return _EPOCH + dt.timedelta(milliseconds=ms)


def connect(url: str, *, autocommit: bool = False) -> psycopg.Connection:
    """Open a connection; raise DatabaseUnavailable (password redacted) when the server is not
    there."""
    try:
        return psycopg.connect(
            url,
            autocommit=autocommit,
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
            application_name="backfilld",
        )
    except psycopg.Error as exc:
        raise DatabaseUnavailable(f"cannot connect to PostgreSQL: {exc}") from None


def lower_server_priority(conn: psycopg.Connection, niceness: int) -> bool:
    """Run this connection's server process at `niceness` (at least), when it is a PostgreSQL
    backend on this machine that we may renice: the embedded server, or a local one of our
    user reached over its Unix socket. For background work (the features): on a box it shares
    with the writer and the status endpoint, it takes the CPU they leave, not theirs. Returns
    whether it did; a TCP connection (maybe another machine: its pid means nothing here), a
    server of another user, or no /proc is left alone.
    """
    if not (conn.info.host or "").startswith("/"):
        return False
    pid = conn.info.backend_pid
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            if not cmdline.read().startswith(b"postgres"):
                return False
        if os.getpriority(os.PRIO_PROCESS, pid) < niceness:
            os.setpriority(os.PRIO_PROCESS, pid, niceness)
    except OSError:
        return False
    # Each backend is a session leader (setsid), so with autogroup scheduling (Linux's default
    # outside a cgroup with a CPU controller) it is a group of its own, weighed against the
    # whole daemon: its process niceness counts only inside that group. The group's does.
    with suppress(OSError, ValueError):
        with open(f"/proc/{pid}/autogroup", "r+") as group:
            current = int(group.read().split("nice")[1])
            if current < niceness:
                group.write(str(niceness))
    return True


@contextmanager
def connection(url: str, *, autocommit: bool = False) -> Iterator[psycopg.Connection]:
    conn = connect(url, autocommit=autocommit)
    try:
        yield conn
    finally:
        conn.close()


@attrs.frozen
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def _sql_dir() -> Path:
    """The `sql/` folder: next to the package in a checkout, or installed as `daemon.sql`."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "sql").is_dir():
        return checkout / "sql"
    return Path(str(resources.files("daemon.sql")))


def load_migrations(directory: Path | None = None) -> list[Migration]:
    directory = directory or _sql_dir()
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_FILE.match(path.name)
        if match is None:
            raise DatabaseError(f"{path}: migration files are named NNN_name.sql")
        found.append(Migration(int(match.group(1)), match.group(2), path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise DatabaseError(f"{directory}: two migrations share a number")
    return found


_CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


def _applied(conn: psycopg.Connection) -> dict[int, str]:
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return {}
    return dict(conn.execute("SELECT version, checksum FROM schema_migrations").fetchall())


def _check_applied(applied: dict[int, str], migrations: list[Migration]) -> list[Migration]:
    known = {m.version: m for m in migrations}
    for version, checksum in applied.items():
        if version in known and known[version].checksum != checksum:
            m = known[version]
            raise DatabaseError(
                f"migration {m.version:03d}_{m.name}.sql changed after it was applied; "
                "add a new migration instead of editing an applied one"
            )
    return [m for m in migrations if m.version not in applied]


def pending_migrations(conn: psycopg.Connection, migrations: list[Migration]) -> list[Migration]:
    """Migrations not yet applied (read-only; used by readiness checks)."""
    try:
        return _check_applied(_applied(conn), migrations)
    except psycopg.Error as exc:
        raise DatabaseError(f"cannot read schema_migrations: {exc}") from None


def apply_migrations(url: str, migrations: list[Migration] | None = None) -> list[str]:
    """Apply pending migrations in order; return the names applied (empty when up to date)."""
    migrations = load_migrations() if migrations is None else migrations
    done: list[str] = []
    with connection(url, autocommit=True) as conn:
        try:
            conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK_KEY,))
            conn.execute(_CREATE_MIGRATIONS_TABLE)
            for m in _check_applied(_applied(conn), migrations):
                with conn.transaction():
                    conn.execute(m.sql.encode())
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum)"
                        " VALUES (%s, %s, %s)",
                        (m.version, m.name, m.checksum),
                    )
                done.append(f"{m.version:03d}_{m.name}")
            conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK_KEY,))
        except psycopg.OperationalError as exc:  # each migration is one transaction: retry is safe
            raise DatabaseUnavailable(f"migration interrupted: {exc}") from None
        except psycopg.Error as exc:
            raise DatabaseError(f"migration failed: {exc}") from None
    return done


def ensure_partitions(conn: psycopg.Connection, table: str, years: Iterable[int], *,
                      wait: bool = True) -> None:
    """The year partitions of `table` (bars or features) for `years`, each created in its own
    short transaction that never queues long for the table's lock (see
    PARTITION_LOCK_TIMEOUT_MS): a lock not granted in time is asked for again after a pause,
    until it is (`wait=False`: the years not granted in time are skipped, for whoever needs
    them to create). `conn` must have no transaction open.

    Error handling: psycopg errors other than the lock timeout propagate (the caller's own
    translation applies: the writer retries an unavailable database, rejects anything else).
    """
    if table not in _PARTITIONED:
        raise ValueError(f"not a partitioned table: {table!r}")
    for year in sorted(set(years)):
        pause = 0.05
        while True:
            try:
                with conn.transaction():
                    conn.execute(f"SET LOCAL lock_timeout = {PARTITION_LOCK_TIMEOUT_MS}")
                    conn.execute(f"SELECT {table}_ensure_partition(%s)", (year,))
                break
            except psycopg.errors.LockNotAvailable:
                if not wait:
                    break
                time.sleep(pause)
                pause = min(PARTITION_RETRY_MAX_SECONDS, pause * 2)


def ensure_history_partitions(url: str, first_year: int, last_year: int) -> None:
    """Both tables' partitions for every year of the configured history, created at start, so
    that a backfill never creates one while features are being computed (a reload that moves
    the history back, or a new year, creates its own as the writer meets it). Best effort: a
    table locked by someone else does not hold up the start; the writer creates what is
    missing then.

    Error handling: DatabaseUnavailable when the server cannot be reached, DatabaseError for
    anything else.
    """
    try:
        with connection(url, autocommit=True) as conn:
            for table in _PARTITIONED:
                ensure_partitions(conn, table, range(first_year, last_year + 1), wait=False)
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"cannot create partitions: {exc}") from None
    except psycopg.Error as exc:
        raise DatabaseError(f"cannot create partitions: {exc}") from None


@attrs.frozen
class SeriesState:
    """What planning needs to know of a series: what is covered, and a recent refusal."""

    covered: Spans = EMPTY
    refused_at: float | None = None  # Unix seconds of the last 403 "not entitled"
    refused_reason: str | None = None


_SERIES_STATE = """
SELECT coalesce(c.symbol, f.symbol), coalesce(c.timeframe, f.timeframe), c.covered,
       f.refused_at, f.refused_reason
FROM coverage c
FULL JOIN (SELECT * FROM series_freshness WHERE refused_at IS NOT NULL) f
    ON f.symbol = c.symbol AND f.timeframe = c.timeframe
WHERE %(symbol)s::text IS NULL OR coalesce(c.symbol, f.symbol) = %(symbol)s
"""


def read_series_state(url: str, symbol: str | None = None
                      ) -> dict[tuple[str, str], SeriesState]:
    """Coverage and refusals (of one symbol, or all) keyed by (symbol, timeframe label)."""
    with connection(url, autocommit=True) as conn:
        try:
            rows = conn.execute(_SERIES_STATE, {"symbol": symbol}).fetchall()
        except psycopg.OperationalError as exc:  # the server went away mid-query
            raise DatabaseUnavailable(f"cannot read coverage: {exc}") from None
        except psycopg.Error as exc:
            raise DatabaseError(f"cannot read coverage: {exc}") from None
    return {(s, tf): SeriesState(spans_of(covered),
                                 None if refused is None else refused.timestamp(), reason)
            for s, tf, covered, refused, reason in rows}


def read_coverage(url: str, symbol: str | None = None) -> dict[tuple[str, str], Spans]:
    """Coverage (of one symbol, or all) keyed by (symbol, timeframe label)."""
    return {key: state.covered for key, state in read_series_state(url, symbol).items()
            if state.covered}


def spans_of(multirange: Multirange[int] | None) -> Spans:
    """An `int8multirange` as read by psycopg, as Spans (half-open, normalised)."""
    if not multirange:
        return EMPTY
    out = []
    for r in multirange:
        assert r.lower is not None and r.upper is not None, "coverage is always bounded"
        lo = r.lower if r.lower_inc else r.lower + 1
        hi = r.upper + 1 if r.upper_inc else r.upper
        out.append((lo, hi))
    return spans(out)
