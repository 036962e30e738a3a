"""Derived features per bar, computed where the data lives: set-based SQL over `bars`.

One row per bar in `features` (sql/006_features.sql), keyed like `bars`. "The last N" means the
last N bars of the series in ts order, the current bar included; gaps in time are ignored.
NULL where a definition lacks its bars.

    log_return     ln(close / previous close); NULL on the first bar (and when a price is <= 0)
    volatility_20  sample stddev (n-1) of the last 20 log returns; NULL until 20 exist
    sma_20/sma_50  mean of the last 20 / 50 closes; NULL until 20 / 50 bars exist
    ema_20         alpha = 2/21, seeded with the series' first close: ema = close on the first
                   bar, then alpha * close + (1 - alpha) * previous ema
    atr_14         mean of the last 14 true ranges, max(high - low, |high - prev close|,
                   |low - prev close|), high - low on the first bar; NULL until 14 exist
    rsi_14         100 - 100 / (1 + G/L), G and L the mean gain and mean loss of the last 14
                   close-to-close changes; 100 when L = 0 < G, 50 when both are 0; NULL until 14
    volume_z_20    (volume - mean) / sample stddev of the last 20 volumes; NULL when that stddev
                   is 0 (or fewer than 20 bars)
    range_pos_20   (close - lowest low) / (highest high - lowest low) over the last 20 bars;
                   NULL when the range is 0 (or fewer than 20 bars)
    regime         trend_up when close > sma_20 > sma_50, trend_down when close < sma_20 < sma_50,
                   else range; NULL until sma_50 exists

volatility_20 is per bar, not annualised: multiply by sqrt(bars per year) for the timeframe, e.g.
sqrt(252) for 1d bars of a stock, sqrt(252 * 78) for 5m bars of its regular session,
sqrt(365 * 288) for 5m bars of a crypto pair that trades around the clock.

How it stays fresh, without ever making the writer wait:

    writer page transaction ── mark_dirty(cur, [(symbol, timeframe, first bar ms)])
        features_dirty: from_ts = LEAST(old, new), generation + 1        (one statement)
    composition root ── FeaturesTask.notify() after each commit
    FeaturesTask (own connection, own thread limiter) ── process_dirty, per dirty series:
        1. claim   (short transaction) claimed_from = LEAST(claimed_from, from_ts),
                   from_ts = 'infinity': "nothing new since the claim"
        2. compute (one transaction) recompute from claimed_from to the end; then delete the
                   marker if its generation is unchanged, else only clear the claim: what the
                   pages committed meanwhile touched is in from_ts, and only that is redone
A series dirtied by 30 pages is computed once; a pass with a single long series to compute
splits it into pieces, one per connection (_recompute). The claim is durable, so a crash
mid-computation loses nothing; and a backfill whose pages keep arriving while the task
computes recomputes each page once, not everything since the first unserved page. A
per-series advisory lock keeps two daemons sharing a database (or a `features rebuild`) from
computing one series at once.

A recomputation from bar B reads the 49 bars before B (the widest window is 50 bars) and carries
the EMA from the stored feature row of the bar just before B; if that row is missing (features
never computed there), it computes the series from scratch instead. Each statement covers at most
CHUNK_BARS bars, carrying the EMA from the previous chunk, so memory stays bounded however long
the series. Short moving frames (10 and 7 bars) are aggregated afresh for every row
(PostgreSQL's float8 aggregates have no inverse transition: that costs time, but sums never
drift), and the 14-, 20- and 50-bar figures are added up from them (a 20-bar sum is the last
10 bars' sum plus the 10 before), so every value is a deterministic function of its window and
an incremental result equals a from-scratch one bit for bit. Summed in those pieces, a mean can
differ from one summed in a single pass in its last bit (about 1e-16 relative).

Error handling: a lost connection or an unreachable server is DatabaseUnavailable (the caller
waits it out: FeaturesTask through `daemon.retrying.when_available`); any other statement
rejected while computing one series rolls back that series only (its marker stays, so it is
retried on the next pass, and FeaturesRun counts it as failed); the task logs and counts it and
goes on. """

from __future__ import annotations

import collections
import datetime as dt
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Sequence
from contextlib import ExitStack, closing, contextmanager, suppress
from functools import partial
from typing import Any

import attrs
import psycopg
import trio
from loguru import logger

from . import db
from .errors import DatabaseError, DatabaseUnavailable, redact
from .monitoring import reader
from .retrying import when_available

__all__ = [
    "CHUNK_BARS",
    "EMA_ALPHA",
    "LOOKBACK_BARS",
    "MARK_DIRTY_SQL",
    "FeaturesLag",
    "FeaturesRun",
    "FeaturesStatistics",
    "FeaturesTask",
    "mark_dirty",
    "process_dirty",
    "read_features_lag",
    "rebuild",
    "recompute_series",
]

EMA_ALPHA = 2 / 21
# Bars before the first recomputed one that the windows read: the widest window is 50 bars.
LOOKBACK_BARS = 49
# Bars per statement. The windows' work per statement is bounded by it (PostgreSQL spills a
# window's rows to disk past work_mem anyway); 200,000 keeps one statement under ~2 s on the
# 2-core reference machine, and the per-chunk overhead (49 lookback rows, one index probe) is
# far below 1 %.
CHUNK_BARS = 200_000
# A recomputation of at least this many bars is split across the pass's idle connections
# (one deep series, the only one dirty after its backfill): below it the split costs more than
# it saves.
SPLIT_MIN_BARS = 20_000
# The daemon's features connections run their server process this nice (when it is local and
# ours, daemon.db.lower_server_priority): measured under 50 status clients during a backfill,
# the two features backends took 82 % of a core and the event loop waited 2.8 s per 8 s for a
# CPU. Features are background work; bars and answers come first. `features rebuild` is not
# niced: someone is waiting for it.
SERVER_NICENESS = 10
# Session advisory locks on (class, hashtext(series)): one computation per series at a time.
# Any constant will do; it only has to be the same for every backfilld instance ("feat").
_LOCK_CLASS = 0x6665_6174
# How long to let a cancel request reach the server at shutdown.
_CANCEL_TIMEOUT_SECONDS = 2.0
# Lower and upper bounds for "from the start" / "to the end" (inside PostgreSQL's range).
_BEGINNING = dt.datetime(1, 1, 1, tzinfo=dt.UTC)
_END = dt.datetime(9999, 12, 31, tzinfo=dt.UTC)

_COLUMNS = ("log_return", "volatility_20", "sma_20", "sma_50", "ema_20", "atr_14", "rsi_14",
            "volume_z_20", "range_pos_20", "regime")
_COLUMN_LIST = ", ".join(_COLUMNS)

# --- marking (the writer's side) -------------------------------------------------------------

# One statement for any number of series; GROUP BY because ON CONFLICT may touch a row once per
# statement, ORDER BY so that concurrent writers lock markers in the same order (no deadlock).
MARK_DIRTY_SQL = """
INSERT INTO features_dirty AS d (symbol, timeframe, from_ts, generation, updated_at)
SELECT symbol, timeframe, 'epoch'::timestamptz + min(from_ms) * interval '1 millisecond', 1, now()
FROM unnest(%(symbols)s::text[], %(timeframes)s::text[], %(from_ms)s::int8[])
     AS m (symbol, timeframe, from_ms)
GROUP BY symbol, timeframe
ORDER BY symbol, timeframe
ON CONFLICT (symbol, timeframe) DO UPDATE SET
    from_ts = LEAST(d.from_ts, EXCLUDED.from_ts),
    generation = d.generation + 1,
    updated_at = EXCLUDED.updated_at
"""


def mark_dirty(cur: psycopg.Cursor, rows: Iterable[tuple[str, str, int]]) -> None:
    """Mark series stale from a bar on: `rows` are (symbol, timeframe, first bar's Unix ms).

    Called by the writer inside each page's transaction, so the marker commits with the bars
    it describes. One statement whatever the number of rows; nothing when there are none.
    """
    symbols: list[str] = []
    timeframes: list[str] = []
    from_ms: list[int] = []
    for symbol, timeframe, ms in rows:
        symbols.append(symbol)
        timeframes.append(timeframe)
        from_ms.append(ms)
    if symbols:
        cur.execute(MARK_DIRTY_SQL,
                    {"symbols": symbols, "timeframes": timeframes, "from_ms": from_ms})


# --- computing one series --------------------------------------------------------------------

# The bars of [from, to) and the LOOKBACK_BARS before them (from `lookback` on), in ts order (one
# ordered index range scan, no sort: the bounds are parameters, so the planner sees how many rows
# they hold), the windows over them, and the features of the rows in [from, to). The EMA skips
# the lookback rows (FILTER) and starts from `seed` when given, else from the stored EMA of the
# bar before `from`.
_COMPUTED = """
src AS (
    SELECT ts, high, low, close, volume, lag(close) OVER (ORDER BY ts) AS prev
    FROM bars
    WHERE symbol = %(symbol)s AND timeframe = %(timeframe)s AND ts < %(to)s
      AND ts >= %(lookback)s
), steps AS (
    SELECT ts, high, low, close, volume,
           CASE WHEN close > 0 AND prev > 0 THEN ln(close / prev) END AS lr,
           CASE WHEN close > prev THEN close - prev WHEN prev IS NOT NULL THEN 0 END AS gain,
           CASE WHEN close < prev THEN prev - close WHEN prev IS NOT NULL THEN 0 END AS loss,
           CASE WHEN prev IS NULL THEN high - low
                ELSE greatest(high - low, abs(high - prev), abs(low - prev)) END AS tr
    FROM src
), w10 AS (
    -- A moving frame is re-read row by row for every output row (float8 aggregates have no
    -- inverse transition), and each frame row read costs ~0.15 us whatever the aggregates:
    -- so the frames are short (10 and 7 rows) and the 14-, 20- and 50-row figures are put
    -- together from them with lag(), which reads one row. Measured: 7.0 us a row against
    -- 9.0 us with frames of 20 and 14 rows. The 20-row spreads join two 10-row states with
    -- float8_combine (the built-in aggregates' own combine step, as in a parallel stddev_samp).
    SELECT ts, close, volume, lr, gain, loss, tr,
           -- {count, sum, squared deviations} (sql/009)
           features_stats(lr) OVER w AS lr10, features_stats(volume) OVER w AS v10,
           sum(close) OVER w AS close10, min(low) OVER w AS lo10, max(high) OVER w AS hi10
    FROM steps
    WINDOW w AS (ORDER BY ts ROWS 9 PRECEDING)
), w7 AS (
    SELECT ts, close, volume, lr, lr10, v10, close10, lo10, hi10,
           sum(tr) OVER w AS tr7, sum(gain) OVER w AS gain7, sum(loss) OVER w AS loss7
    FROM w10
    WINDOW w AS (ORDER BY ts ROWS 6 PRECEDING)
), joined AS (
    -- lag() gives NULL before the series' (or lookback's) first row, so a figure whose older
    -- part is missing is NULL, and least()/greatest() skip it; `has_N` says N bars exist.
    SELECT ts, close, volume, lr,
           float8_combine(lr10, lag(lr10, 10) OVER w) AS lr_s,
           float8_combine(v10, lag(v10, 10) OVER w) AS v_s,
           lag(close, 13) OVER w IS NOT NULL AS has_14,
           lag(close, 14) OVER w IS NOT NULL AS has_15,  -- 14 changes need 15 closes
           lag(close, 19) OVER w IS NOT NULL AS has_20,
           lag(close, 49) OVER w IS NOT NULL AS has_50,
           (tr7 + lag(tr7, 7) OVER w) / 14 AS atr,
           (gain7 + lag(gain7, 7) OVER w) / 14 AS gain,
           (loss7 + lag(loss7, 7) OVER w) / 14 AS loss,
           (close10 + lag(close10, 10) OVER w) / 20 AS sma20,
           (close10 + lag(close10, 10) OVER w + lag(close10, 20) OVER w
            + lag(close10, 30) OVER w + lag(close10, 40) OVER w) / 50 AS sma50,
           least(lo10, lag(lo10, 10) OVER w) AS lo,
           greatest(hi10, lag(hi10, 10) OVER w) AS hi,
           features_ema(close, %(alpha)s, COALESCE(%(seed)s::float8, (
               SELECT ema_20 FROM features
               WHERE symbol = %(symbol)s AND timeframe = %(timeframe)s AND ts < %(from)s
               ORDER BY ts DESC LIMIT 1)))
               FILTER (WHERE ts >= %(from)s) OVER w AS ema
    FROM w7
    WINDOW w AS (ORDER BY ts ROWS UNBOUNDED PRECEDING)
), win AS (
    SELECT ts, close, volume, lr, has_14, has_15, has_20, atr, gain, loss, sma20, lo, hi, ema,
           lr_s[1] AS n_lr, v_s[2] / 20 AS v_mean,
           CASE WHEN lr_s[1] > 1 THEN sqrt(lr_s[3] / (lr_s[1] - 1)) END AS lr_sd,
           CASE WHEN v_s[1] > 1 THEN sqrt(v_s[3] / (v_s[1] - 1)) END AS v_sd,
           CASE WHEN has_50 THEN sma50 END AS sma50
    FROM joined
), computed AS (
    SELECT ts,
           lr AS log_return,
           CASE WHEN n_lr = 20 THEN lr_sd END AS volatility_20,
           CASE WHEN has_20 THEN sma20 END AS sma_20,
           sma50 AS sma_50,
           ema AS ema_20,
           CASE WHEN has_14 THEN atr END AS atr_14,
           CASE WHEN has_15 THEN
               CASE WHEN loss > 0 THEN 100 - 100 / (1 + gain / loss)
                    WHEN gain > 0 THEN 100
                    ELSE 50 END
           END AS rsi_14,
           CASE WHEN has_20 THEN (volume - v_mean) / NULLIF(v_sd, 0) END AS volume_z_20,
           CASE WHEN has_20 THEN (close - lo) / NULLIF(hi - lo, 0) END AS range_pos_20,
           CASE WHEN sma50 IS NOT NULL THEN
               CASE WHEN close > sma20 AND sma20 > sma50 THEN 'trend_up'
                    WHEN close < sma20 AND sma20 < sma50 THEN 'trend_down'
                    ELSE 'range' END
           END AS regime
    FROM win
    WHERE ts >= %(from)s
)"""
_SELECT_COMPUTED = (f"SELECT %(symbol)s, %(timeframe)s, ts, {_COLUMN_LIST} FROM computed")
_INSERT = f"INSERT INTO features AS f (symbol, timeframe, ts, {_COLUMN_LIST})"
# Every row is new (past the newest stored feature): a plain INSERT, which measured 1.75 x
# faster than INSERT ... ON CONFLICT for new rows.
_APPEND = f"WITH {_COMPUTED}\n{_INSERT}\n{_SELECT_COMPUTED}"
# Rows up to the newest stored feature may exist: upsert them, rewriting only those whose
# features changed (a top-up's overlap, or the tail of a revision once the EMA has converged,
# writes nothing); rows past it are new.
_DIFFERS = (f"({', '.join('f.' + c for c in _COLUMNS)}) IS DISTINCT FROM "
            f"({', '.join('EXCLUDED.' + c for c in _COLUMNS)})")
_MIXED = f"""WITH {_COMPUTED},
changed AS (
    {_INSERT}
    {_SELECT_COMPUTED} WHERE ts <= %(fresh_after)s
    ON CONFLICT (symbol, timeframe, ts) DO UPDATE SET
        {', '.join(f'{c} = EXCLUDED.{c}' for c in _COLUMNS)}
    WHERE {_DIFFERS}
    RETURNING 1
), added AS (
    {_INSERT}
    {_SELECT_COMPUTED} WHERE ts > %(fresh_after)s
    RETURNING 1
)
SELECT (SELECT count(*) FROM changed) + (SELECT count(*) FROM added)"""

# What a recomputation from `from` needs to know: the bar before it, the stored feature row
# before it (its EMA is the seed only if it belongs to that bar), and the newest stored feature.
_PLAN = """
SELECT
    (SELECT ts FROM bars WHERE symbol = %(symbol)s AND timeframe = %(timeframe)s
       AND ts < %(from)s ORDER BY ts DESC LIMIT 1),
    (SELECT ts FROM features WHERE symbol = %(symbol)s AND timeframe = %(timeframe)s
       AND ts < %(from)s ORDER BY ts DESC LIMIT 1),
    (SELECT max(ts) FROM features WHERE symbol = %(symbol)s AND timeframe = %(timeframe)s)
"""
# Where the chunk starting at `from` ends (the first bar after it; NULL: the series' end), and
# where its lookback starts.
_CHUNK = f"""
SELECT
    (SELECT ts FROM bars WHERE symbol = %(symbol)s AND timeframe = %(timeframe)s
       AND ts >= %(from)s ORDER BY ts OFFSET %(chunk)s LIMIT 1),
    COALESCE((SELECT min(ts) FROM (
        SELECT ts FROM bars WHERE symbol = %(symbol)s AND timeframe = %(timeframe)s
          AND ts < %(from)s ORDER BY ts DESC LIMIT {LOOKBACK_BARS}) AS lookback), %(from)s)
"""
# The EMA of the last bar before `to`, run from `from` on with the same step function over the
# same closes in the same order as the window computes it: the same bits.
_EMA_THROUGH = """
SELECT features_ema(close, %(alpha)s, %(seed)s::float8 ORDER BY ts) FROM bars
WHERE symbol = %(symbol)s AND timeframe = %(timeframe)s AND ts >= %(from)s AND ts < %(to)s
"""
_SEED = """
SELECT ema_20 FROM features WHERE symbol = %(symbol)s AND timeframe = %(timeframe)s
  AND ts < %(from)s ORDER BY ts DESC LIMIT 1
"""
_BARS_FROM = """
SELECT count(*) FROM bars WHERE symbol = %(symbol)s AND timeframe = %(timeframe)s
  AND ts >= %(from)s
"""
_NTH_BAR = """
SELECT ts FROM bars WHERE symbol = %(symbol)s AND timeframe = %(timeframe)s
  AND ts >= %(from)s ORDER BY ts OFFSET %(offset)s LIMIT 1
"""
# From scratch, stored rows are overwritten where they differ; rows of bars that are gone (only
# ever deleted by hand) go, chunk by chunk: bounded on ts, both sides are pruned to the chunk's
# partitions and read in key order, however long the series.
_DELETE_ORPHANS = """
DELETE FROM features AS f
WHERE f.symbol = %(symbol)s AND f.timeframe = %(timeframe)s
  AND f.ts >= %(from)s AND f.ts < %(to)s AND NOT EXISTS (
    SELECT FROM bars AS b WHERE b.symbol = %(symbol)s AND b.timeframe = %(timeframe)s
      AND b.ts = f.ts AND b.ts >= %(from)s AND b.ts < %(to)s)
"""
# Features are derived and their marker goes in the same transaction: a commit lost in a crash
# is computed again, so it need not wait for the WAL flush (top-up latency).
_RELAXED_COMMIT = "SET LOCAL synchronous_commit = off"
# Every year of the series (two index probes): a computation from a bar may turn into one from
# scratch. Partition years are UTC years. Through the current year, not only the newest bar's:
# the writer may commit this year's first bars between this statement and the computation.
_MISSING_PARTITIONS = """
SELECT y FROM generate_series(
    (SELECT extract(year FROM min(ts) AT TIME ZONE 'UTC')::int FROM bars
     WHERE symbol = %(symbol)s AND timeframe = %(timeframe)s),
    greatest((SELECT extract(year FROM max(ts) AT TIME ZONE 'UTC')::int FROM bars
              WHERE symbol = %(symbol)s AND timeframe = %(timeframe)s),
             extract(year FROM now() AT TIME ZONE 'UTC')::int)) AS y
WHERE to_regclass(format('features_y%%s', y)) IS NULL
"""
_PROGRESS = """
INSERT INTO features_progress AS p (symbol, timeframe, computed_through, computed_at)
SELECT %(symbol)s, %(timeframe)s, max(ts), now() FROM features
WHERE symbol = %(symbol)s AND timeframe = %(timeframe)s
HAVING max(ts) IS NOT NULL
ON CONFLICT (symbol, timeframe) DO UPDATE SET
    computed_through = EXCLUDED.computed_through, computed_at = EXCLUDED.computed_at
"""
_LOCK = "SELECT pg_advisory_lock(%(class)s, hashtext(%(symbol)s || '/' || %(timeframe)s))"
_TRY_LOCK = "SELECT pg_try_advisory_lock(%(class)s, hashtext(%(symbol)s || '/' || %(timeframe)s))"
_UNLOCK = "SELECT pg_advisory_unlock(%(class)s, hashtext(%(symbol)s || '/' || %(timeframe)s))"


def recompute_series(conn: psycopg.Connection, symbol: str, timeframe: str,
                     from_ms: int | None, *, chunk_bars: int = CHUNK_BARS) -> int:
    """Recompute the features of one series from `from_ms` on (None: from scratch).

    In one transaction (the features partitions it needs are created just before, in their
    own), under the series' advisory lock (waiting for a computation in progress elsewhere).
    Dirty markers are left alone: process_dirty is what clears them. Returns the rows written
    (inserted, or updated because a value changed).

    `conn` must have no transaction open (autocommit, or idle).

    Error handling: psycopg errors are raised as DatabaseUnavailable (connection lost, server
    gone) or DatabaseError (statement rejected); the transaction is rolled back.
    """
    _require_idle(conn)
    key = _Key(symbol, timeframe)
    try:
        with _series_lock(conn, key, wait=True):
            _ensure_partitions(conn, key)
            with conn.transaction(), conn.cursor() as cur:
                return _recompute(cur, key, from_ms, chunk_bars)
    except psycopg.Error as exc:
        raise _translate(exc, f"computing features of {symbol} {timeframe}") from None


@attrs.frozen
class _Key:
    symbol: str
    timeframe: str

    def params(self, **more: object) -> dict[str, object]:
        return {"symbol": self.symbol, "timeframe": self.timeframe, **more}


def _recompute(cur: psycopg.Cursor, key: _Key, from_ms: int | None, chunk_bars: int,
               spare: Sequence[psycopg.Connection] = ()) -> int:
    """The features of `key` from `from_ms` to the end (None: from scratch), chunk by chunk,
    inside the caller's transaction; then its progress row. Returns the rows written.

    With `spare` connections (idle ones of the same pass) and at least SPLIT_MIN_BARS to
    compute, the span is cut into one piece per connection: the first is computed here, each
    other on its connection, in a transaction of its own, starting from the EMA at its first
    bar (run over the pieces before it: the same bits). Those commit before the caller's
    transaction does, so a caller that clears the dirty marker clears it only once every piece
    is in; a failed piece raises here and leaves the marker, and the series is computed again.
    """
    cur.execute(_RELAXED_COMMIT)
    start = _BEGINNING if from_ms is None else db.from_ms(from_ms)
    prev_bar, prev_feature, newest = _timestamps(cur, _PLAN, key.params(**{"from": start}))
    if prev_bar is not None and prev_feature != prev_bar:
        # No stored EMA for the bar before `from` to carry: start over.
        logger.bind(symbol=key.symbol, timeframe=key.timeframe).info(
            "features before {} were never computed: computing from scratch", start)
        start = _BEGINNING
    from_scratch = start == _BEGINNING
    cuts = _pieces(cur, key, start, 1 + len(spare)) if spare else []
    if not cuts:
        written = _compute_span(cur, key, start, None, newest, from_scratch, chunk_bars)
    else:
        written = _compute_pieces(cur, key, start, cuts, spare, newest, from_scratch,
                                  chunk_bars)
    cur.execute(_PROGRESS, key.params())
    return written


def _pieces(cur: psycopg.Cursor, key: _Key, start: dt.datetime, count: int
            ) -> list[dt.datetime]:
    """Where to cut the bars from `start` on into `count` equal pieces ([] when they are too
    few to be worth it)."""
    bars = int(_first(cur, _BARS_FROM, key.params(**{"from": start})) or 0)
    if count < 2 or bars < SPLIT_MIN_BARS:
        return []
    size = -(-bars // count)
    return [cut for n in range(1, count) if (cut := _first(
        cur, _NTH_BAR, key.params(**{"from": start, "offset": n * size}))) is not None]


def _compute_pieces(cur: psycopg.Cursor, key: _Key, start: dt.datetime,
                    cuts: list[dt.datetime], spare: Sequence[psycopg.Connection],
                    newest: dt.datetime | None, from_scratch: bool, chunk_bars: int) -> int:
    """[start, cuts[0]) on `cur`, each later piece on a spare connection (one thread each);
    the spare connections' transactions are committed when this returns. Returns the rows
    written by all."""
    seed = _first(cur, _SEED, key.params(**{"from": start}))
    bounds: list[dt.datetime | None] = [*cuts, None]
    written: list[int] = []

    def helper(conn: psycopg.Connection, begin: dt.datetime, end: dt.datetime | None) -> None:
        with conn.transaction(), conn.cursor() as hcur:
            hcur.execute(_RELAXED_COMMIT)
            piece_seed = _first(hcur, _EMA_THROUGH, key.params(
                alpha=EMA_ALPHA, seed=seed, **{"from": start, "to": begin}))
            written.append(_compute_span(hcur, key, begin, end, newest, from_scratch,
                                         chunk_bars, seed=piece_seed))

    def own() -> None:
        written.append(_compute_span(cur, key, start, cuts[0], newest, from_scratch,
                                     chunk_bars))

    pieces = [(f"features-piece-{n}", partial(helper, conn, cuts[n - 2], bounds[n - 1]))
              for n, conn in enumerate(spare[:len(cuts)], 2)]
    _in_threads(own, pieces, [])
    return sum(written)


def _compute_span(cur: psycopg.Cursor, key: _Key, start: dt.datetime, stop: dt.datetime | None,
                  newest: dt.datetime | None, from_scratch: bool, chunk_bars: int, *,
                  seed: float | None = None) -> int:
    """Rows [start, stop) (stop None: to the end), chunk by chunk; the first chunk's EMA starts
    from `seed` when given, every later one from the row before it, stored by this transaction.
    Returns the rows written."""
    written = 0
    while True:
        end, lookback = _timestamps(cur, _CHUNK, key.params(**{"from": start,
                                                                "chunk": chunk_bars}))
        if stop is not None and (end is None or end > stop):
            end = stop
        params = key.params(**{"from": start, "to": end or _END, "lookback": lookback,
                               "alpha": EMA_ALPHA, "fresh_after": newest or _BEGINNING,
                               "seed": seed})
        seed = None
        if from_scratch and newest is not None:
            cur.execute(_DELETE_ORPHANS, params)
        if newest is None or newest < start:
            cur.execute(_APPEND, params)
            written += cur.rowcount
        else:
            row = cur.execute(_MIXED, params).fetchone()
            written += int(row[0]) if row else 0
        if end is None or end == stop:
            return written
        start = end


def _first(cur: psycopg.Cursor, query: str, params: dict[str, object]) -> Any:
    """The first column of the first row of a query (None when there is none)."""
    row = cur.execute(query, params).fetchone()
    return None if row is None else row[0]


def _timestamps(cur: psycopg.Cursor, query: str, params: dict[str, object]
                ) -> list[dt.datetime | None]:
    """The first row of a query whose columns are timestamps; [] when there is none."""
    row = cur.execute(query, params).fetchone()
    return list(row) if row is not None else []


def _ensure_partitions(conn: psycopg.Connection, key: _Key) -> None:
    """The features partitions for the years of the series' bars.

    Outside the computation's transaction: creating a partition locks the whole `features`
    table, which must not last as long as a computation (db.ensure_partitions: one short
    transaction per year, never queued long behind a reader).
    """
    missing = [int(y) for (y,) in conn.execute(_MISSING_PARTITIONS, key.params()).fetchall()]
    if missing:
        db.ensure_partitions(conn, "features", missing)


@contextmanager
def _series_lock(conn: psycopg.Connection, key: _Key, *, wait: bool) -> Iterator[bool]:
    """Hold the series' advisory lock (session level: it spans several transactions); yield
    whether it was obtained (always, with `wait`)."""
    params = key.params(**{"class": _LOCK_CLASS})
    row = conn.execute(_LOCK if wait else _TRY_LOCK, params).fetchone()
    held = wait or bool(row and row[0])
    try:
        yield held
    finally:
        if held:
            with suppress(psycopg.Error):  # a broken connection has released it already
                conn.execute(_UNLOCK, params)


def _require_idle(conn: psycopg.Connection) -> None:
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise ValueError("the connection has a transaction open; features computations "
                         "manage their own transactions")


def _translate(exc: psycopg.Error, doing: str) -> DatabaseError:
    """psycopg's error as ours: the server or the connection gone, or a statement rejected."""
    text = redact(str(exc)).strip()
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return DatabaseUnavailable(f"{doing}: {text}")
    return DatabaseError(f"{doing}: {text}")


# --- the dirty markers: claim, compute, clear ------------------------------------------------

_DIRTY_SERIES = """
SELECT symbol, timeframe FROM features_dirty ORDER BY updated_at, symbol, timeframe LIMIT %s
"""
# The claim: what is dirty now moves to claimed_from; from_ts = 'infinity' means nothing came
# since. `from` is NULL when the claim covers nothing ('infinity': a claim already served).
_CLAIM = """
UPDATE features_dirty
SET claimed_from = LEAST(claimed_from, from_ts), from_ts = 'infinity'
WHERE symbol = %(symbol)s AND timeframe = %(timeframe)s
RETURNING generation, NULLIF(claimed_from, 'infinity')
"""
# The end of a computation, in its transaction: the marker goes if nothing touched it since the
# claim (same generation); else only the claim goes, and from_ts says what is dirty again.
_CLEAR = """
DELETE FROM features_dirty
WHERE symbol = %(symbol)s AND timeframe = %(timeframe)s AND generation = %(generation)s
"""
_UNCLAIM = """
UPDATE features_dirty SET claimed_from = NULL
WHERE symbol = %(symbol)s AND timeframe = %(timeframe)s
"""


@attrs.frozen
class FeaturesRun:
    """What one process_dirty pass did.

    Attributes:
        series: Series computed (their markers cleared, or re-dirtied meanwhile).
        rows: Feature rows written (inserted, or updated because a value changed).
        seconds: Wall time of the pass.
        failed: Series whose computation was rejected; their markers stay for the next pass.
        last_error: Why the last of those failed.
        stopped: True when `should_stop` ended the pass early.
    """

    series: int
    rows: int
    seconds: float
    failed: int = 0
    last_error: str | None = None
    stopped: bool = False


def process_dirty(conn: psycopg.Connection | Sequence[psycopg.Connection], *,
                  max_series: int | None = None,
                  should_stop: Callable[[], bool] | None = None,
                  chunk_bars: int = CHUNK_BARS,
                  skip: Collection[tuple[str, str]] = ()) -> FeaturesRun:
    """Recompute every dirty series (the oldest marked first, at most `max_series`).

    Each series: claim its marker, recompute from the claimed instant in one transaction that
    also clears the marker, or only the claim if a page touched the series meanwhile (its
    generation changed). A series another process is computing (advisory lock held) is left
    for a later pass, and so is every (symbol, timeframe) in `skip` (FeaturesTask.defer).
    `should_stop` is asked between series; True ends the pass, and a query cancelled by the
    caller (Connection.cancel_safe) while it is True ends it too, its claim kept for the next
    pass.

    Given several connections, they compute different series at once (each takes the next
    series when it is free; one thread per connection beyond the first): each uses a server
    core of its own. Every connection must have no transaction open (autocommit, or idle).

    Error handling: DatabaseUnavailable (connection lost) ends the pass and is raised, as is
    DatabaseError when the markers cannot be read; a computation rejected for one series is
    logged and counted in `failed`, and the pass goes on with the next.
    """
    conns = [conn] if isinstance(conn, psycopg.Connection) else list(conn)
    for each in conns:
        _require_idle(each)
    stop = should_stop or (lambda: False)
    started = time.perf_counter()
    lock = threading.Lock()
    series = rows = failed = 0
    last_error: str | None = None
    try:
        keys = [_Key(s, tf) for s, tf in
                conns[0].execute(_DIRTY_SERIES, (max_series,)).fetchall() if (s, tf) not in skip]
    except psycopg.Error as exc:
        raise _translate(exc, "reading features_dirty") from None

    def compute(conn: psycopg.Connection, key: _Key,
                spare: Sequence[psycopg.Connection]) -> None:
        nonlocal series, rows, failed, last_error
        doing = f"computing features of {key.symbol} {key.timeframe}"
        try:
            written = _process_series(conn, key, chunk_bars=chunk_bars, spare=spare)
        except psycopg.errors.QueryCanceled:
            if stop():
                return  # our own cancel: the pass ends, the claim stays
            raise DatabaseUnavailable(f"{doing}: query cancelled") from None
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise _translate(exc, doing) from None
        except psycopg.Error as exc:
            error = str(_translate(exc, doing))
            logger.bind(symbol=key.symbol, timeframe=key.timeframe).error(error)
            with lock:
                failed, last_error = failed + 1, error
            return
        if written is not None:
            with lock:
                series, rows = series + 1, rows + written

    _share_out(conns, keys, compute, stop)
    return FeaturesRun(series=series, rows=rows, seconds=time.perf_counter() - started,
                       failed=failed, last_error=last_error, stopped=stop())


def _share_out(conns: Sequence[psycopg.Connection], keys: Sequence[_Key],
               compute: Callable[[psycopg.Connection, _Key, Sequence[psycopg.Connection]], None],
               stop: Callable[[], bool] = lambda: False) -> None:
    """`compute(conn, key, spare)` for every key until `stop()`, each connection taking the next
    key when it is free: one thread per connection beyond the first, which runs on the caller's
    thread. The first exception stops the others after their current key and is raised.

    One key and several connections (a deep backfill just ended, a rebuild of one series): the
    first connection computes it with the others as `spare`, each computing a piece of it
    (_recompute); else every key is computed with no spare."""
    if len(keys) == 1 and len(conns) > 1:
        compute(conns[0], keys[0], conns[1:])
        return
    todo = iter(keys)
    lock = threading.Lock()
    failures: list[BaseException] = []

    def work(conn: psycopg.Connection) -> None:
        while True:
            with lock:
                key = None if failures or stop() else next(todo, None)
            if key is None:
                return
            try:
                compute(conn, key, ())
            except BaseException as exc:  # re-raised on the caller's thread
                with lock:
                    failures.append(exc)
                return

    others = [(f"features-{n}", partial(work, conn)) for n, conn in enumerate(conns[1:], 2)]
    _in_threads(partial(work, conns[0]), others, failures)


def _in_threads(own: Callable[[], None], others: Iterable[tuple[str, Callable[[], None]]],
                failures: list[BaseException]) -> None:
    """`own` on the caller's thread, each of `others` on a thread of that name; returns once
    all are done. An exception of `own` is raised as it is; one of the others is appended to
    `failures` (where the others may look for it) and the first there is raised."""

    def guarded(fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as exc:  # re-raised on the caller's thread
            failures.append(exc)

    threads = [threading.Thread(target=guarded, args=(fn,), name=name) for name, fn in others]
    for thread in threads:
        thread.start()
    try:
        own()
    finally:
        for thread in threads:
            thread.join()
    if failures:
        raise failures[0]


@attrs.frozen
class _Claim:
    generation: int  # the marker's generation when claimed
    from_ms: int | None  # recompute from here; None: nothing to recompute (claim served)


def _claim(conn: psycopg.Connection, key: _Key) -> _Claim | None:
    """Claim the series' marker in a short transaction of its own; None when it has none."""
    with conn.transaction():
        conn.execute(_RELAXED_COMMIT)  # lost in a crash, the claim is simply not there
        row = conn.execute(_CLAIM, key.params()).fetchone()
    if row is None:
        return None
    generation, claimed = row
    return _Claim(int(generation), None if claimed is None else db.to_ms(claimed))


def _process_series(conn: psycopg.Connection, key: _Key, *, chunk_bars: int,
                    from_scratch: bool = False, wait: bool = False,
                    spare: Sequence[psycopg.Connection] = ()) -> int | None:
    """Claim, compute and clear one series (from its claim, or from scratch); the rows written,
    or None when there was nothing to do (no marker, or another process holds the series).
    `spare` connections compute pieces of a long span (_recompute)."""
    with _series_lock(conn, key, wait=wait) as held:
        if not held:
            return None
        claim = _claim(conn, key)
        if claim is None and not from_scratch:
            return None  # served by another process since it was listed
        from_ms = None if from_scratch or claim is None else claim.from_ms
        compute = from_scratch or from_ms is not None
        for attempt in (1, 2):
            if compute:
                _ensure_partitions(conn, key)
            try:
                with conn.transaction(), conn.cursor() as cur:
                    written = (_recompute(cur, key, from_ms, chunk_bars, spare)
                               if compute else 0)
                    if claim is not None:
                        cur.execute(_CLEAR, key.params(generation=claim.generation))
                        if cur.rowcount == 0:  # touched since the claim: keep what is dirty
                            cur.execute(_UNCLAIM, key.params())
            except psycopg.errors.CheckViolation:
                # bars of a year without a features partition were committed meanwhile (a
                # history moved backwards): ensure again, once
                if attempt == 2:
                    raise
                continue
            return written
        raise AssertionError("unreachable")  # pragma: no cover


# --- rebuild: every series from scratch ------------------------------------------------------

# The distinct series of `bars` by skipping through its primary key (one index descent per
# series and partition), not by reading every bar.
_SERIES = """
WITH RECURSIVE series AS (
    (SELECT symbol, timeframe FROM bars ORDER BY symbol, timeframe LIMIT 1)
    UNION ALL
    SELECT next.symbol, next.timeframe FROM series, LATERAL (
        SELECT symbol, timeframe FROM bars
        WHERE (symbol, timeframe) > (series.symbol, series.timeframe)
        ORDER BY symbol, timeframe LIMIT 1) AS next
)
SELECT symbol, timeframe FROM series
WHERE (%(symbol)s::text IS NULL OR symbol = %(symbol)s)
  AND (%(timeframe)s::text IS NULL OR timeframe = %(timeframe)s)
"""


def rebuild(url: str, *, symbol: str | None = None, timeframe: str | None = None,
            progress: Callable[[int, int], None] | None = None, jobs: int = 1,
            chunk_bars: int = CHUNK_BARS) -> int:
    """Recompute the features of every series with bars (or of one symbol / timeframe) from
    scratch, series by series, each in one transaction of chunked statements (bounded memory
    on both sides), rewriting only the rows that differ. A series' dirty marker is claimed and
    cleared like process_dirty does; a series being computed elsewhere is waited for. Returns
    the rows written.

    `jobs` connections compute different series at once: each uses one server core (two on
    the 2-core reference machine measured 1.45 x one).

    `progress(done, total)` is called with series counts: once before the first, then after
    each series (from the worker threads when `jobs` > 1, one call at a time).

    Error handling: raises DatabaseUnavailable or DatabaseError; the series in progress is
    rolled back, the workers stop after their current series, and those done stay rebuilt.
    """
    with _translated("rebuilding features"), ExitStack() as stack:
        first = stack.enter_context(closing(db.connect(url, autocommit=True)))
        series = [_Key(s, tf) for s, tf in first.execute(
            _SERIES, {"symbol": symbol, "timeframe": timeframe}).fetchall()]
        # One series: every connection computes a piece of it; else each its own series.
        wanted = jobs if len(series) == 1 else min(jobs, len(series))
        conns = [first] + [stack.enter_context(closing(db.connect(url, autocommit=True)))
                           for _ in range(1, wanted)]
        total = len(series)
        lock = threading.Lock()
        done = rows = 0
        if progress is not None:
            progress(0, total)

        def compute(conn: psycopg.Connection, key: _Key,
                    spare: Sequence[psycopg.Connection]) -> None:
            nonlocal done, rows
            written = _process_series(conn, key, chunk_bars=chunk_bars,
                                      from_scratch=True, wait=True, spare=spare) or 0
            with lock:
                done, rows = done + 1, rows + written
                if progress is not None:
                    progress(done, total)

        _share_out(conns, series, compute)
    return rows


@contextmanager
def _translated(doing: str) -> Iterator[None]:
    try:
        yield
    except psycopg.Error as exc:
        raise _translate(exc, doing) from None


# --- lag, for the staleness endpoint ---------------------------------------------------------

_LAG = """
SELECT symbol, timeframe, f.last_bar_ts, p.computed_through,
       NULLIF(LEAST(d.from_ts, d.claimed_from), 'infinity')
FROM series_freshness AS f
FULL JOIN features_progress AS p USING (symbol, timeframe)
FULL JOIN features_dirty AS d USING (symbol, timeframe)
"""


@attrs.frozen
class FeaturesLag:
    """How far one series' features trail its bars, in Unix ms.

    Attributes:
        newest_bar_ms: Start of the newest bar committed (series_freshness); None: none yet.
        newest_feature_ms: ts of the newest feature row; None: never computed.
        dirty_from_ms: Features are stale from this bar on (pages committed, or a computation
            claimed and not finished); None when they are up to date with every commit.
    """

    newest_bar_ms: int | None
    newest_feature_ms: int | None
    dirty_from_ms: int | None


def read_features_lag(url: str) -> dict[tuple[str, str], FeaturesLag]:
    """Every series' FeaturesLag, keyed by (symbol, timeframe): one query over three tables of
    one row per series (never `bars` or `features`), on its own short-lived connection with
    the status readers' timeouts.

    Error handling: raises DatabaseError (password redacted) and nothing else from psycopg.
    """
    with reader(url) as conn:
        rows = conn.execute(_LAG).fetchall()
    return {(s, tf): FeaturesLag(_ms(bar), _ms(feature), _ms(dirty))
            for s, tf, bar, feature, dirty in rows}


def _ms(ts: dt.datetime | None) -> int | None:
    return None if ts is None else db.to_ms(ts)


# --- the daemon's task -----------------------------------------------------------------------


@attrs.frozen
class FeaturesStatistics:
    """A snapshot of the features task, for /status and /metrics.

    Attributes:
        connected: Its connection is open.
        runs: Passes finished (each a process_dirty over every dirty series).
        series_computed: Series computed, over all passes.
        rows_written: Feature rows written, over all passes.
        last_run_seconds: Duration of the last pass; None before the first.
        last_latency_seconds: From the first notify a pass served (a writer commit) to the end
            of that pass: how long committed bars waited for their features.
        pending: notify() calls no finished pass has served yet.
        errors: Failed passes plus series whose computation was rejected.
        last_error: The last of those failures.
        last_error_at: Its wall time (Unix seconds).
    """

    connected: bool
    runs: int
    series_computed: int
    rows_written: int
    last_run_seconds: float | None
    last_latency_seconds: float | None
    pending: int
    errors: int
    last_error: str | None
    last_error_at: float | None


class FeaturesTask:
    """Keeps features fresh: a pass over the dirty markers after each burst of commits, and
    every `poll_seconds` anyway (markers committed by another daemon, or left by a crash).

    `notify()` (sync, from trio: the composition root calls it after each writer commit) wakes
    the task; it sleeps `coalesce_seconds` more so a burst of pages makes one pass, then runs
    process_dirty on its own `connections` (different series at once, one server core each)
    from a worker thread (its own CapacityLimiter(1)). A pass also runs at start, for markers
    committed while the daemon was down.

    `defer(series, True)` holds a series' computation back while its backfill commits ranges
    out of order (the scheduler walks a deep series' sub-ranges at once): computed after each
    page, every page of an early range would recompute the features of every later range
    committed before it, quadratic in the series' length. Its markers still commit with its
    pages, so what a crash interrupts is computed at the next start; `defer(series, False)`
    computes it once, from the first bar those pages touched.

    `run_pass` replaces the database pass (connecting included) by any async function; it
    exists for timing tests under MockClock, where a worker thread would let the clock jump.

    Error handling: an unreachable database is waited out by daemon.retrying.when_available (the
    project's one retry loop; the pass is retried whole, which is safe: every step is its own
    transaction and idempotent). Any other DatabaseError fails the pass, is logged and counted
    (statistics().errors, last_error) and the task goes on; so does a series rejected inside a
    pass. Cancelled during a pass (shutdown), it cancels the running query
    (Connection.cancel_safe) and stops between series; what was claimed stays claimed and is
    computed on the next start.
    """

    def __init__(self, url: str, *, connections: int = 1, coalesce_seconds: float = 0.2,
                 poll_seconds: float = 30.0,
                 run_pass: Callable[[], Awaitable[FeaturesRun]] | None = None) -> None:
        self._url = url
        self._connections = max(1, connections)
        self._coalesce_seconds = coalesce_seconds
        self._poll_seconds = poll_seconds
        self._owns_connection = run_pass is None
        self._run_pass = run_pass or self._database_pass
        self._limiter = trio.CapacityLimiter(1)
        self._conns: list[psycopg.Connection] = []
        self._wake = trio.Event()
        self._pending = 0
        self._pending_since: float | None = None  # trio time of the first unserved notify
        self._runs = 0
        self._series = 0
        self._rows = 0
        self._errors = 0
        self._last_run_seconds: float | None = None
        self._last_latency: float | None = None
        self._last_error: tuple[float, str] | None = None
        self._passed = trio.Event()  # set (and replaced) after each pass
        self._deferred: collections.Counter[tuple[str, str]] = collections.Counter()
        self._coalescing = trio.CancelScope()  # the wait for more commits, cut short by
        self._hurry = False  # wait_caught_up

    def defer(self, series: tuple[str, str], deferred: bool) -> None:
        """Hold back (True) or release (False) the computation of one (symbol, timeframe);
        holds nest. Call from trio."""
        if deferred:
            self._deferred[series] += 1
            return
        self._deferred[series] -= 1
        if self._deferred[series] <= 0:
            del self._deferred[series]
            self.notify()

    def notify(self) -> None:
        """Bars were committed: compute their features soon. Call from trio."""
        self._pending += 1
        if self._pending_since is None:
            self._pending_since = trio.current_time()
        self._wake.set()

    async def wait_caught_up(self) -> None:
        """Wait until a finished pass has served every notify so far (`run --once` exits with
        features as fresh as its bars); no more commits are coming to coalesce with, so a
        pass waiting out `coalesce_seconds` starts now."""
        while self._pending:
            self._hurry = True
            self._coalescing.cancel()
            await self._passed.wait()

    def statistics(self) -> FeaturesStatistics:
        return FeaturesStatistics(
            connected=bool(self._conns) and not any(conn.closed for conn in self._conns),
            runs=self._runs,
            series_computed=self._series,
            rows_written=self._rows,
            last_run_seconds=self._last_run_seconds,
            last_latency_seconds=self._last_latency,
            pending=self._pending,
            errors=self._errors,
            last_error=self._last_error[1] if self._last_error else None,
            last_error_at=self._last_error[0] if self._last_error else None,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect (waiting for the database), report started, then serve passes forever."""
        try:
            if self._owns_connection:
                await when_available(self._connect, limiter=self._limiter)
            task_status.started()
            await self._serve_pass()
            while True:
                await self._wait_for_work()
                await self._serve_pass()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._close, limiter=self._limiter)

    async def _wait_for_work(self) -> None:
        """Until a notify (then `coalesce_seconds` more) or `poll_seconds` without one."""
        notified = False
        with trio.move_on_after(self._poll_seconds):
            await self._wake.wait()
            notified = True
        if notified and not self._hurry:
            with self._coalescing:
                await trio.sleep(self._coalesce_seconds)
            self._coalescing = trio.CancelScope()

    async def _serve_pass(self) -> None:
        # No checkpoint between here and the pass's start: every notify before this line is
        # served by this pass (its commit is visible to it), every later one wakes the next.
        self._wake = trio.Event()
        served, since = self._pending, self._pending_since
        self._pending_since = None  # the next notify is the first this pass does not serve
        started = trio.current_time()
        try:
            result = await self._run_pass()
        except DatabaseError as exc:
            self._passed.set()
            self._passed = trio.Event()
            self._errors += 1
            self._note_error(str(exc))
            logger.error("features pass failed: {}", exc)
            if since is not None:  # not served: the markers are still there
                self._pending_since = since
            return
        now = trio.current_time()
        self._pending -= served
        self._passed.set()
        self._passed = trio.Event()
        self._runs += 1
        self._series += result.series
        self._rows += result.rows
        self._last_run_seconds = now - started
        if since is not None:
            self._last_latency = now - since
        if result.failed:
            self._errors += result.failed
            self._note_error(result.last_error or "a series failed")
        if result.series:
            logger.debug("features: {} series, {} rows in {:.3f} s", result.series, result.rows,
                         result.seconds)

    def _note_error(self, text: str) -> None:
        self._last_error = (time.time(), text)

    async def _database_pass(self) -> FeaturesRun:
        """process_dirty in a worker thread, the database's outages waited out, beside a
        watcher that stops it if the task is cancelled meanwhile."""
        stop = threading.Event()
        skip = frozenset(self._deferred)
        failure: DatabaseError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._stop_pass_when_cancelled, stop, nursery.cancel_scope)
            try:
                result = await when_available(self._pass_in_thread, stop, skip,
                                              limiter=self._limiter)
            except DatabaseError as exc:  # raised past the nursery, not as an ExceptionGroup
                failure = exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return result

    async def _stop_pass_when_cancelled(self, stop: threading.Event,
                                        done: trio.CancelScope) -> None:
        """Sleeps through the pass; when the task is cancelled first (a cancel from outside,
        not `done`), tells the pass to stop and cancels its running query, so that a shutdown
        does not wait for a long computation to end."""
        try:
            await trio.sleep_forever()
        finally:
            if not done.cancel_called:
                stop.set()
                conns = [conn for conn in self._conns if not conn.closed]
                if conns:
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(self._cancel_queries, conns)

    @staticmethod
    def _cancel_queries(conns: list[psycopg.Connection]) -> None:
        for conn in conns:
            with suppress(psycopg.Error):
                conn.cancel_safe(timeout=_CANCEL_TIMEOUT_SECONDS)

    def _pass_in_thread(self, stop: threading.Event,
                        skip: frozenset[tuple[str, str]]) -> FeaturesRun:
        if len(self._conns) < self._connections or any(conn.closed for conn in self._conns):
            self._connect()
        try:
            return process_dirty(self._conns, should_stop=stop.is_set, skip=skip)
        except DatabaseUnavailable:
            self._close()
            if stop.is_set():  # our own cancel request, at shutdown
                return FeaturesRun(series=0, rows=0, seconds=0.0, stopped=True)
            raise

    def _connect(self) -> None:
        self._close()
        try:
            while len(self._conns) < self._connections:
                conn = db.connect(self._url, autocommit=True)
                self._conns.append(conn)
                db.lower_server_priority(conn, SERVER_NICENESS)
        except BaseException:
            self._close()
            raise

    def _close(self) -> None:
        conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
