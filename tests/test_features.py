"""Features against a real PostgreSQL: every column compared with a plain-Python reference.

The reference below is written straight from the definitions (daemon/features.py's docstring),
with loops and no cleverness, so that the set-based SQL is checked against something that is
obviously right. Realistic bars come from the simulator's ground truth; flat and monotonic
series cover the special cases (L = 0, zero range, zero volume stddev).
"""

from __future__ import annotations

import datetime as dt
import math
import threading
import time
from collections.abc import Iterable, Sequence

import psycopg
import pytest

from daemon import db, features
from daemon.errors import DatabaseUnavailable
from daemon.features import mark_dirty, process_dirty, recompute_series
from daemon.market_calendar import et_midnight_ms
from daemon.simulator.data import ground_truth
from daemon.timeframes import parse_timeframe

Bar = tuple[int, float, float, float, float, float]  # t, open, high, low, close, volume
Row = tuple[object, ...]  # ts_ms, then the features in COLUMNS order

COLUMNS = ("log_return", "volatility_20", "sma_20", "sma_50", "ema_20", "atr_14", "rsi_14",
           "volume_z_20", "range_pos_20", "regime")
# Values that can legitimately be ~0 get an absolute tolerance too; the rest only a relative one.
NEAR_ZERO = {"log_return": 1e-12, "volatility_20": 1e-12, "volume_z_20": 1e-12,
             "range_pos_20": 1e-12}
DAY = 86_400_000
FROM_MS = et_midnight_ms(dt.date(2023, 1, 3))


# --- the reference ---------------------------------------------------------------------------


def _mean(xs: Sequence[float]) -> float:
    total = 0.0
    for x in xs:
        total += x
    return total / len(xs)


def _sample_sd(xs: Sequence[float]) -> float:
    m = _mean(xs)
    total = 0.0
    for x in xs:
        total += (x - m) ** 2
    return math.sqrt(total / (len(xs) - 1))


def reference(bars: Sequence[Bar]) -> list[Row]:
    """The features of `bars` (one series, ascending), straight from the definitions."""
    alpha = 2 / 21
    closes = [b[4] for b in bars]
    log_returns: list[float | None] = [None]
    true_ranges = [bars[0][2] - bars[0][3]] if bars else []
    changes: list[float] = []
    for i in range(1, len(bars)):
        _, _, high, low, close, _ = bars[i]
        prev = closes[i - 1]
        log_returns.append(math.log(close / prev))
        true_ranges.append(max(high - low, abs(high - prev), abs(low - prev)))
        changes.append(close - prev)
    out: list[Row] = []
    ema = 0.0
    for i, (t, _, _, _, close, volume) in enumerate(bars):
        ema = close if i == 0 else alpha * close + (1 - alpha) * ema
        sma_20 = _mean(closes[i - 19: i + 1]) if i >= 19 else None
        sma_50 = _mean(closes[i - 49: i + 1]) if i >= 49 else None
        volatility = None
        if i >= 20:  # 20 log returns: bars i-19..i, each with a previous close
            volatility = _sample_sd([r for r in log_returns[i - 19: i + 1] if r is not None])
        atr = _mean(true_ranges[i - 13: i + 1]) if i >= 13 else None
        rsi = None
        if i >= 14:  # changes[j] is bar j+1's change: the last 14 end at changes[i-1]
            last = changes[i - 14: i]
            gain = _mean([max(d, 0.0) for d in last])
            loss = _mean([max(-d, 0.0) for d in last])
            rsi = (100 - 100 / (1 + gain / loss) if loss > 0 else 100.0 if gain > 0 else 50.0)
        volume_z = range_pos = None
        if i >= 19:
            window = bars[i - 19: i + 1]
            volumes = [b[5] for b in window]
            sd = _sample_sd(volumes)
            volume_z = None if sd == 0 else (volume - _mean(volumes)) / sd
            lowest = min(b[3] for b in window)
            highest = max(b[2] for b in window)
            range_pos = None if highest == lowest else (close - lowest) / (highest - lowest)
        regime = None
        if sma_50 is not None and sma_20 is not None:
            regime = ("trend_up" if close > sma_20 > sma_50
                      else "trend_down" if close < sma_20 < sma_50 else "range")
        out.append((t, log_returns[i], volatility, sma_20, sma_50, ema, atr, rsi, volume_z,
                    range_pos, regime))
    return out


# --- helpers ---------------------------------------------------------------------------------


def truth_bars(symbol: str, timeframe: str, days: int, start: int = FROM_MS) -> list[Bar]:
    raw = ground_truth(3, symbol, parse_timeframe(timeframe), start, start + days * DAY - 1)
    return [(int(b["t"]), float(b["o"]), float(b["h"]), float(b["l"]), float(b["c"]),
             float(b["v"])) for b in raw]


def synthetic(closes: Iterable[float], *, volume: float = 1000.0, start: int = FROM_MS,
              spread: float = 0.0) -> list[Bar]:
    """Daily bars with the given closes: open = close, high/low `spread` around it."""
    return [(start + i * DAY, c, c + spread, c - spread, c, volume)
            for i, c in enumerate(closes)]


def load(conn: psycopg.Connection, symbol: str, timeframe: str, bars: Sequence[Bar]) -> None:
    """Upsert bars the way the writer does (revised values overwrite), in the caller's
    transaction."""
    years = {time.gmtime(b[0] // 1000).tm_year for b in bars}
    for year in sorted(years):
        conn.execute("SELECT bars_ensure_partition(%s)", (year,))
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO bars (symbol, timeframe, ts, open, high, low, close, volume)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (symbol, timeframe, ts) DO UPDATE SET open = EXCLUDED.open,"
            " high = EXCLUDED.high, low = EXCLUDED.low, close = EXCLUDED.close,"
            " volume = EXCLUDED.volume",
            [(symbol, timeframe, db.from_ms(t), o, h, lo, c, v) for t, o, h, lo, c, v in bars])


def write_page(url: str, symbol: str, timeframe: str, bars: Sequence[Bar]) -> None:
    """A writer's page transaction: the bars and their dirty marker commit together."""
    with psycopg.connect(url) as conn:
        load(conn, symbol, timeframe, bars)
        with conn.cursor() as cur:
            mark_dirty(cur, [(symbol, timeframe, min(b[0] for b in bars))])


def stored(url: str, symbol: str, timeframe: str) -> list[Row]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            f"SELECT ts, {', '.join(COLUMNS)} FROM features"
            " WHERE symbol = %s AND timeframe = %s ORDER BY ts", (symbol, timeframe)).fetchall()
    return [(db.to_ms(r[0]), *r[1:]) for r in rows]


def assert_matches(got: list[Row], want: list[Row]) -> None:
    assert [r[0] for r in got] == [r[0] for r in want], "one feature row per bar"
    for g, w in zip(got, want, strict=True):
        for name, a, b in zip(COLUMNS, g[1:], w[1:], strict=True):
            where = f"{name} at {dt.datetime.fromtimestamp(g[0] / 1000, dt.UTC)}: {a!r} != {b!r}"
            if a is None or b is None or isinstance(b, str):
                assert a == b, where
            else:
                assert isinstance(a, float), where
                assert math.isclose(a, b, rel_tol=1e-9, abs_tol=NEAR_ZERO.get(name, 0.0)), where


def compute(url: str, symbol: str, timeframe: str, from_ms: int | None = None, **kw: int) -> int:
    with db.connect(url, autocommit=True) as conn:
        return recompute_series(conn, symbol, timeframe, from_ms, **kw)


def run_dirty(url: str, **kw: int) -> features.FeaturesRun:
    with db.connect(url, autocommit=True) as conn:
        return process_dirty(conn, **kw)


def dirty(url: str) -> dict[tuple[str, str], tuple[int, int, int | None]]:
    """features_dirty as {(symbol, timeframe): (from_ms or -1 for infinity, generation,
    claimed_from_ms)}."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT symbol, timeframe, NULLIF(from_ts, 'infinity'), generation, claimed_from"
            " FROM features_dirty").fetchall()
    return {(s, tf): (-1 if f is None else db.to_ms(f), g, None if c is None else db.to_ms(c))
            for s, tf, f, g, c in rows}


# --- from scratch: every column against the reference -----------------------------------------


@pytest.mark.parametrize(("symbol", "timeframe", "days"), [
    ("AAPL", "1d", 3 * 365),
    ("X:BTCUSD", "1d", 400),
    ("AAPL", "5m", 25),
    ("X:BTCUSD", "5m", 6),
    ("BRK.B", "1h", 60),
])
def test_every_column_matches_the_reference(database: str, symbol: str, timeframe: str,
                                            days: int) -> None:
    bars = truth_bars(symbol, timeframe, days)
    assert len(bars) > 200
    with psycopg.connect(database) as conn:
        load(conn, symbol, timeframe, bars)
    assert compute(database, symbol, timeframe) == len(bars)
    got = stored(database, symbol, timeframe)
    assert_matches(got, reference(bars))
    # the realistic series exercise every branch of every definition
    assert {r[10] for r in got} == {None, "trend_up", "trend_down", "range"}
    assert all(r[4] is not None for r in got[49:]) and all(r[4] is None for r in got[:49])


def test_thin_series(database: str) -> None:
    bars = truth_bars("MSFT", "1d", 45)  # about 30 trading days: no sma_50, no regime
    assert 20 < len(bars) < 50
    with psycopg.connect(database) as conn:
        load(conn, "MSFT", "1d", bars)
    compute(database, "MSFT", "1d")
    got = stored(database, "MSFT", "1d")
    assert_matches(got, reference(bars))
    assert all(r[4] is None and r[10] is None for r in got)
    assert got[19][3] is not None and got[18][3] is None  # sma_20 from the 20th bar
    assert got[20][2] is not None and got[19][2] is None  # volatility needs 21 bars
    assert got[14][7] is not None and got[13][7] is None  # rsi needs 15 bars
    assert got[13][6] is not None and got[12][6] is None  # atr needs 14


@pytest.mark.parametrize("count", [1, 2, 14, 15])
def test_first_bars(database: str, count: int) -> None:
    bars = truth_bars("AAPL", "1d", 60)[:count]
    with psycopg.connect(database) as conn:
        load(conn, "AAPL", "1d", bars)
    assert compute(database, "AAPL", "1d") == count
    got = stored(database, "AAPL", "1d")
    assert_matches(got, reference(bars))
    assert got[0][1] is None and got[0][5] == bars[0][4]  # no log return; ema = first close


def test_empty_series_writes_nothing(database: str) -> None:
    assert compute(database, "NONE", "1d") == 0
    assert compute(database, "NONE", "1d", FROM_MS) == 0
    assert features.read_features_lag(database) == {}


def test_flat_prices(database: str) -> None:
    bars = synthetic([10.0] * 60)
    with psycopg.connect(database) as conn:
        load(conn, "FLAT", "1d", bars)
    compute(database, "FLAT", "1d")
    got = stored(database, "FLAT", "1d")
    assert_matches(got, reference(bars))
    last = dict(zip(COLUMNS, got[-1][1:], strict=True))
    assert last == {"log_return": 0.0, "volatility_20": 0.0, "sma_20": 10.0, "sma_50": 10.0,
                    "ema_20": 10.0, "atr_14": 0.0, "rsi_14": 50.0, "volume_z_20": None,
                    "range_pos_20": None, "regime": "range"}


def test_monotonic_prices(database: str) -> None:
    up = synthetic([100.0 + i for i in range(60)], spread=0.5)
    down = synthetic([100.0 - i for i in range(60)], spread=0.5)
    varied = [(t, o, h, lo, c, 1000.0 + (i % 3)) for i, (t, o, h, lo, c, _) in enumerate(up)]
    with psycopg.connect(database) as conn:
        load(conn, "UP", "1d", up)
        load(conn, "DOWN", "1d", down)
        load(conn, "VARIED", "1d", varied)
    for symbol, bars in (("UP", up), ("DOWN", down), ("VARIED", varied)):
        compute(database, symbol, "1d")
        assert_matches(stored(database, symbol, "1d"), reference(bars))
    up_last, down_last = stored(database, "UP", "1d")[-1], stored(database, "DOWN", "1d")[-1]
    assert up_last[7] == 100.0 and up_last[10] == "trend_up"  # L = 0 < G
    assert down_last[7] == 0.0 and down_last[10] == "trend_down"  # G = 0 < L
    assert up_last[9] == pytest.approx(19.5 / 20)  # (close - lowest low) / range, of 20 bars
    assert up_last[8] is None  # constant volume
    assert stored(database, "VARIED", "1d")[-1][8] is not None


def test_chunks_give_the_same_bits(database: str) -> None:
    bars = truth_bars("X:BTCUSD", "1h", 40)
    with psycopg.connect(database) as conn:
        load(conn, "X:BTCUSD", "1h", bars)
    assert compute(database, "X:BTCUSD", "1h", chunk_bars=97) == len(bars)
    chunked = stored(database, "X:BTCUSD", "1h")
    assert_matches(chunked, reference(bars))
    with psycopg.connect(database) as conn:
        conn.execute("DELETE FROM features")
    assert compute(database, "X:BTCUSD", "1h") == len(bars)
    assert stored(database, "X:BTCUSD", "1h") == chunked  # exact, EMA carried across chunks


def test_years_get_partitions(database: str) -> None:
    bars = truth_bars("AAPL", "1d", 3 * 365, start=et_midnight_ms(dt.date(2019, 6, 3)))
    with psycopg.connect(database) as conn:
        load(conn, "AAPL", "1d", bars)
    compute(database, "AAPL", "1d")
    with psycopg.connect(database) as conn:
        parts = sorted(r[0] for r in conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'features'::regclass"))
    assert {"features_y2019", "features_y2020", "features_y2021", "features_y2022"} <= set(parts)
    assert len(stored(database, "AAPL", "1d")) == len(bars)


def test_progress_row(database: str) -> None:
    bars = truth_bars("AAPL", "1d", 100)
    with psycopg.connect(database) as conn:
        load(conn, "AAPL", "1d", bars)
    compute(database, "AAPL", "1d")
    lag = features.read_features_lag(database)[("AAPL", "1d")]
    assert lag.newest_feature_ms == bars[-1][0]
    assert lag.dirty_from_ms is None


def test_a_connection_inside_a_transaction_is_refused(database: str) -> None:
    with psycopg.connect(database) as conn:
        conn.execute("SELECT 1")  # opens the implicit transaction
        with pytest.raises(ValueError, match="transaction open"):
            recompute_series(conn, "AAPL", "1d", None)


# --- incremental: markers, top-ups, revisions, history extended backwards -------------------


def test_mark_dirty_keeps_the_earliest_and_counts_generations(database: str) -> None:
    with psycopg.connect(database) as conn, conn.cursor() as cur:
        mark_dirty(cur, [("A", "1d", 5000), ("B", "5m", 7000), ("A", "1d", 3000)])
        mark_dirty(cur, [])  # nothing to do: no statement
    assert dirty(database) == {("A", "1d"): (3000, 1, None), ("B", "5m"): (7000, 1, None)}
    with psycopg.connect(database) as conn, conn.cursor() as cur:
        mark_dirty(cur, [("A", "1d", 9000), ("B", "5m", 1000)])
    assert dirty(database) == {("A", "1d"): (3000, 2, None), ("B", "5m"): (1000, 2, None)}
    with psycopg.connect(database) as conn:  # rolled back with its page: no marker either
        with conn.cursor() as cur:
            mark_dirty(cur, [("C", "1d", 1)])
        conn.rollback()
    assert ("C", "1d") not in dirty(database)


def test_incremental_equals_from_scratch(database: str) -> None:
    symbol, tf = "AAPL", "5m"
    bars = truth_bars(symbol, tf, 30)
    n = len(bars)
    first, initial, tail = n // 10, n // 2, bars[n // 2:]
    # Initial backfill of a middle part, in two pages marked separately, computed once.
    write_page(database, symbol, tf, bars[first:initial - 300])
    write_page(database, symbol, tf, bars[initial - 300:initial])
    run = run_dirty(database)
    assert (run.series, run.rows, run.failed) == (1, initial - first, 0)
    assert dirty(database) == {}
    # Top-ups: a few new bars each; the second re-sends an overlap (unchanged: not rewritten).
    write_page(database, symbol, tf, tail[:5])
    assert run_dirty(database).rows == 5
    write_page(database, symbol, tf, tail[2:12])
    assert run_dirty(database).rows == 7
    write_page(database, symbol, tf, tail[12:40])
    write_page(database, symbol, tf, tail[40:])
    run = run_dirty(database)
    assert (run.series, run.rows) == (1, len(tail) - 12)
    # A bar revised in the middle: recomputed from it to the end, EMA carried from before it.
    k = initial - 100
    t, o, h, lo, c, v = bars[k]
    bars[k] = (t, o, h * 1.02, lo, c * 1.015, v * 3)
    write_page(database, symbol, tf, [bars[k]])
    run = run_dirty(database)
    assert 50 < run.rows < n - k  # the windows and the EMA's tail; not rows the EMA forgot
    # History extended backwards.
    write_page(database, symbol, tf, bars[:first])
    assert run_dirty(database).series == 1
    incremental = stored(database, symbol, tf)
    assert_matches(incremental, reference(bars))
    assert compute(database, symbol, tf) == 0  # from scratch, not one value differs
    assert stored(database, symbol, tf) == incremental
    assert dirty(database) == {}


def test_coalescing_many_pages_compute_once(database: str) -> None:
    bars = truth_bars("X:BTCUSD", "5m", 3)
    for i in range(0, 600, 20):
        write_page(database, "X:BTCUSD", "5m", bars[i:i + 20])
    assert dirty(database)[("X:BTCUSD", "5m")] == (bars[0][0], 30, None)
    run = run_dirty(database)
    assert (run.series, run.rows) == (1, 600)
    assert_matches(stored(database, "X:BTCUSD", "5m"), reference(bars[:600]))


def test_features_never_computed_before_the_marker(database: str) -> None:
    bars = truth_bars("AAPL", "1d", 300, start=et_midnight_ms(dt.date(2022, 9, 1)))
    assert time.gmtime(bars[0][0] // 1000).tm_year < time.gmtime(bars[150][0] // 1000).tm_year
    with psycopg.connect(database) as conn:
        load(conn, "AAPL", "1d", bars)
    # Dirty from the middle, but nothing was ever computed before it: no EMA to carry.
    write_page(database, "AAPL", "1d", bars[150:151])
    assert run_dirty(database).rows == len(bars)
    assert_matches(stored(database, "AAPL", "1d"), reference(bars))


def test_max_series_takes_the_oldest_first(database: str) -> None:
    for symbol in ("B", "A", "C"):
        write_page(database, symbol, "1d", synthetic([10.0, 11.0]))
    run = run_dirty(database, max_series=2)
    assert run.series == 2
    assert set(dirty(database)) == {("C", "1d")}


def test_claim_left_by_a_crash_is_computed(database: str) -> None:
    bars = truth_bars("AAPL", "1d", 200)
    write_page(database, "AAPL", "1d", bars)
    # What a process killed mid-computation leaves: claimed, nothing new since.
    with psycopg.connect(database) as conn:
        conn.execute("UPDATE features_dirty SET claimed_from = from_ts, from_ts = 'infinity'")
    assert dirty(database) == {("AAPL", "1d"): (-1, 1, bars[0][0])}
    assert features.read_features_lag(database)[("AAPL", "1d")].dirty_from_ms == bars[0][0]
    run = run_dirty(database)
    assert (run.series, run.rows) == (1, len(bars))
    assert dirty(database) == {}
    assert_matches(stored(database, "AAPL", "1d"), reference(bars))


def test_marker_bumped_during_a_computation_is_not_cleared(database: str) -> None:
    bars = truth_bars("X:BTCUSD", "1h", 30)
    write_page(database, "X:BTCUSD", "1h", bars[:500])
    blocker = psycopg.connect(database)
    # Hold the computation at its end (the progress row) until a page has come in meanwhile.
    blocker.execute("LOCK TABLE features_progress IN SHARE MODE")
    result: list[features.FeaturesRun] = []
    worker = threading.Thread(
        target=lambda: result.append(run_dirty(database)))
    worker.start()
    _wait_for_lock_wait(database)
    assert dirty(database)[("X:BTCUSD", "1h")] == (-1, 1, bars[0][0])  # claimed
    write_page(database, "X:BTCUSD", "1h", bars[500:])  # the writer is not blocked
    blocker.rollback()
    blocker.close()
    worker.join(30)
    assert result and result[0].series == 1
    # Not cleared: what the page touched is still dirty, and only that; the claim is done.
    assert dirty(database) == {("X:BTCUSD", "1h"): (bars[500][0], 2, None)}
    run = run_dirty(database)
    assert run.rows == len(bars) - 500
    assert dirty(database) == {}
    assert_matches(stored(database, "X:BTCUSD", "1h"), reference(bars))


def _wait_for_lock_wait(url: str, timeout: float = 20.0) -> None:
    """Until some backend waits for a lock (the computation we hold up)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute("SELECT count(*) FROM pg_stat_activity"
                               " WHERE wait_event_type = 'Lock' AND datname = current_database()"
                               ).fetchone()
            if row and row[0]:
                return
            time.sleep(0.02)
    raise AssertionError("no backend waited for the lock")


def test_rejected_series_keeps_its_marker_and_the_pass_goes_on(database: str) -> None:
    write_page(database, "GOOD", "1d", synthetic([10.0, 11.0, 12.0]))
    write_page(database, "BAD", "1d", synthetic([10.0, 11.0, 12.0]))
    with psycopg.connect(database) as conn:  # a permanent, data-dependent rejection
        conn.execute("ALTER TABLE features ADD CONSTRAINT no_bad"
                     " CHECK (symbol <> 'BAD' OR ema_20 < 0)")
    run = run_dirty(database)
    assert (run.series, run.failed) == (1, 1)
    assert run.last_error is not None and "no_bad" in run.last_error
    assert set(dirty(database)) == {("BAD", "1d")}
    assert stored(database, "BAD", "1d") == []
    assert len(stored(database, "GOOD", "1d")) == 3


def test_two_connections_compute_two_series_at_once(database: str) -> None:
    slow, fast = synthetic([10.0, 11.0, 12.0]), synthetic([20.0, 19.0])
    write_page(database, "SLOW", "1d", slow)  # marked first: a lone connection takes it first
    write_page(database, "FAST", "1d", fast)
    blocker = psycopg.connect(database)
    # SLOW's claim (an UPDATE of its marker) waits for this row lock
    blocker.execute("SELECT FROM features_dirty WHERE symbol = 'SLOW' FOR UPDATE")
    result: list[features.FeaturesRun] = []
    with (db.connect(database, autocommit=True) as one,
          db.connect(database, autocommit=True) as two):
        worker = threading.Thread(target=lambda: result.append(process_dirty([one, two])))
        worker.start()
        try:
            _wait_for_lock_wait(database)
            deadline = time.monotonic() + 20
            while len(stored(database, "FAST", "1d")) < len(fast):  # computed meanwhile
                assert time.monotonic() < deadline, "FAST waited behind SLOW"
                time.sleep(0.02)
            assert worker.is_alive() and stored(database, "SLOW", "1d") == []
        finally:
            blocker.rollback()
            blocker.close()
            worker.join(30)
    assert result and (result[0].series, result[0].rows) == (2, len(slow) + len(fast))
    assert_matches(stored(database, "SLOW", "1d"), reference(slow))
    assert_matches(stored(database, "FAST", "1d"), reference(fast))
    assert dirty(database) == {}


def _record_pieces(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every span computed from now on: (the computing thread's name, its first bar's ms)."""
    spans: list[tuple[str, int]] = []
    real = features._compute_span

    def recording(cur: psycopg.Cursor, key: object, start: dt.datetime, *args: object,
                  **kwargs: object) -> int:
        spans.append((threading.current_thread().name, db.to_ms(start)))
        return real(cur, key, start, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(features, "_compute_span", recording)
    return spans


def test_one_series_is_split_across_the_connections_with_the_same_bits(
        database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(features, "SPLIT_MIN_BARS", 100)
    bars = truth_bars("X:BTCUSD", "1h", 40)  # 960 bars: 3 pieces of 320, chunks of 97
    write_page(database, "X:BTCUSD", "1h", bars)
    spans = _record_pieces(monkeypatch)
    with (db.connect(database, autocommit=True) as one,
          db.connect(database, autocommit=True) as two,
          db.connect(database, autocommit=True) as three):
        run = process_dirty([one, two, three], chunk_bars=97)
        assert (run.series, run.rows, run.failed) == (1, len(bars), 0)
        assert sorted(spans) == sorted([
            (threading.current_thread().name, bars[0][0]),
            ("features-piece-2", bars[320][0]), ("features-piece-3", bars[640][0])])
        split = stored(database, "X:BTCUSD", "1h")
        assert dirty(database) == {}
        assert_matches(split, reference(bars))

        # A revision in the first piece: recomputed from there, split again.
        revised = list(bars)
        t, o, h, lo, c, v = revised[100]
        revised[100] = (t, o, h * 1.01, lo, c * 1.01, v)
        write_page(database, "X:BTCUSD", "1h", revised[100:101])
        spans.clear()
        run = process_dirty([one, two, three], chunk_bars=97)
        assert run.series == 1 and len(spans) == 3 and dirty(database) == {}
        incremental = stored(database, "X:BTCUSD", "1h")

    with psycopg.connect(database) as conn:
        conn.execute("DELETE FROM features")
    assert compute(database, "X:BTCUSD", "1h") == len(bars)  # one connection, one piece
    assert stored(database, "X:BTCUSD", "1h") == incremental  # the same bits
    assert_matches(incremental, reference(revised))
    features.rebuild(database, jobs=3)  # one series: split too
    assert stored(database, "X:BTCUSD", "1h") == incremental


def test_a_failed_piece_keeps_the_marker(database: str, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    monkeypatch.setattr(features, "SPLIT_MIN_BARS", 100)
    bars = truth_bars("AAPL", "1h", 30)
    write_page(database, "AAPL", "1h", bars)
    real = features._compute_span

    def failing(cur: psycopg.Cursor, *args: object, **kwargs: object) -> int:
        if threading.current_thread().name.startswith("features-piece"):
            raise psycopg.errors.DivisionByZero("a piece fails")
        return real(cur, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(features, "_compute_span", failing)
    with (db.connect(database, autocommit=True) as one,
          db.connect(database, autocommit=True) as two):
        run = process_dirty([one, two])
        assert (run.series, run.failed) == (0, 1) and "a piece fails" in (run.last_error or "")
        assert ("AAPL", "1h") in dirty(database)  # the marker stays: computed again later
        assert stored(database, "AAPL", "1h") == []  # the first piece rolled back with it
        monkeypatch.setattr(features, "_compute_span", real)
        run = process_dirty([one, two])
    assert (run.series, run.failed) == (1, 0) and dirty(database) == {}
    assert_matches(stored(database, "AAPL", "1h"), reference(bars))


def test_a_lost_connection_of_several_ends_the_pass(database: str) -> None:
    write_page(database, "A", "1d", synthetic([10.0, 11.0]))
    write_page(database, "B", "1d", synthetic([10.0, 12.0]))
    with (db.connect(database, autocommit=True) as one,
          db.connect(database, autocommit=True) as two):
        pid = two.info.backend_pid
        with psycopg.connect(database, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(DatabaseUnavailable):
            process_dirty([one, two])
    run_dirty(database)  # the next pass computes what that one left
    assert dirty(database) == {}
    assert [len(stored(database, s, "1d")) for s in ("A", "B")] == [2, 2]


def test_another_process_on_the_series_is_skipped(database: str) -> None:
    write_page(database, "A", "1d", synthetic([10.0, 11.0]))
    with psycopg.connect(database, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s, hashtext('A/1d'))", (features._LOCK_CLASS,))
        run = run_dirty(database)
        assert run.series == 0
        assert set(dirty(database)) == {("A", "1d")}
    assert run_dirty(database).series == 1


# --- existing data, rebuild, lag ---------------------------------------------------------------


def test_migration_marks_existing_series(empty_database: str) -> None:
    migrations = db.load_migrations()
    db.apply_migrations(empty_database, [m for m in migrations if m.version < 6])
    bars = truth_bars("AAPL", "1d", 120)
    with psycopg.connect(empty_database) as conn:
        load(conn, "AAPL", "1d", bars)
        conn.execute("INSERT INTO coverage (symbol, timeframe, covered)"
                     " VALUES ('AAPL', '1d', int8multirange(int8range(%s, %s)))",
                     (bars[0][0], bars[-1][0] + 1))
    db.apply_migrations(empty_database)
    assert dirty(empty_database) == {("AAPL", "1d"): (bars[0][0], 1, None)}
    assert run_dirty(empty_database).rows == len(bars)
    assert_matches(stored(empty_database, "AAPL", "1d"), reference(bars))


def test_rebuild(database: str) -> None:
    daily, hourly = truth_bars("AAPL", "1d", 200), truth_bars("AAPL", "1h", 20)
    other = truth_bars("MSFT", "1d", 200)
    with psycopg.connect(database) as conn:
        conn.execute("SELECT features_ensure_partition(2023)")
        load(conn, "AAPL", "1d", daily)
        load(conn, "AAPL", "1h", hourly)
        load(conn, "MSFT", "1d", other)
        conn.execute("INSERT INTO features (symbol, timeframe, ts, ema_20)"
                     " VALUES ('AAPL', '1d', %s, 0)", (db.from_ms(daily[0][0] - DAY),))
    write_page(database, "AAPL", "1d", daily[-1:])
    calls: list[tuple[int, int]] = []
    rows = features.rebuild(database, symbol="AAPL", progress=lambda *a: calls.append(a),
                            chunk_bars=50)
    assert rows == len(daily) + len(hourly)
    assert calls == [(0, 2), (1, 2), (2, 2)]
    assert_matches(stored(database, "AAPL", "1d"), reference(daily))  # the stray row is gone
    assert_matches(stored(database, "AAPL", "1h"), reference(hourly))
    assert stored(database, "MSFT", "1d") == []
    assert dirty(database) == {}  # the marker was served
    # AAPL 1d is as it should be: nothing of it is rewritten
    assert features.rebuild(database, timeframe="1d") == len(other)
    assert features.rebuild(database) == 0
    with psycopg.connect(database) as conn:
        conn.execute("TRUNCATE features")
    calls.clear()
    assert features.rebuild(database, jobs=2, progress=lambda *a: calls.append(a)) == (
        len(daily) + len(hourly) + len(other))
    assert calls == [(0, 3), (1, 3), (2, 3), (3, 3)]  # one call at a time, counting up
    assert_matches(stored(database, "MSFT", "1d"), reference(other))


def test_read_features_lag(database: str) -> None:
    bars = truth_bars("AAPL", "1d", 100)
    write_page(database, "AAPL", "1d", bars[:60])
    with psycopg.connect(database) as conn:
        conn.execute("INSERT INTO series_freshness (symbol, timeframe, last_bar_ts)"
                     " VALUES ('AAPL', '1d', %s), ('NEW', '5m', NULL)",
                     (db.from_ms(bars[59][0]),))
    lag = features.read_features_lag(database)
    assert lag == {
        ("AAPL", "1d"): features.FeaturesLag(bars[59][0], None, bars[0][0]),
        ("NEW", "5m"): features.FeaturesLag(None, None, None),
    }
    run_dirty(database)
    write_page(database, "AAPL", "1d", bars[60:])
    with psycopg.connect(database) as conn:
        conn.execute("UPDATE series_freshness SET last_bar_ts = %s", (db.from_ms(bars[-1][0]),))
    assert features.read_features_lag(database)[("AAPL", "1d")] == features.FeaturesLag(
        bars[-1][0], bars[59][0], bars[60][0])
    run_dirty(database)
    assert features.read_features_lag(database)[("AAPL", "1d")] == features.FeaturesLag(
        bars[-1][0], bars[-1][0], None)
