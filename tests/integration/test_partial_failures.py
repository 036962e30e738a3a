"""Partial failures stay partial, end to end: the daemon and the simulator as subprocesses, a
real PostgreSQL, the whole table compared with the simulator's ground truth.

- a ticker the plan does not cover (403 not entitled) among good ones;
- the API down for 45 s in the middle of a backfill (the circuit breaker);
- bars with every kind of defect (quarantined, the rest kept), then corrected by the vendor.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import psycopg
import pytest

from daemon.market_calendar import et_midnight_ms
from daemon.simulator.defects import DEFECT_KINDS, defective_ts
from daemon.timeframes import parse_timeframe

from .procs import (
    bar_count,
    control,
    duplicates,
    run_once,
    scripted_simulator,
    simulator_stats,
    start_daemon,
    table,
    truth,
    wait_until,
    write_config,
)

SEED = 11
START, END = dt.date(2024, 1, 2), dt.date(2024, 2, 29)
FROM_MS = et_midnight_ms(START)
TO_MS = et_midnight_ms(END + dt.timedelta(days=1)) - 1


def backfill(symbols: list[str], timeframes: list[str], **extra: object) -> str:
    settings: dict[str, object] = {
        "symbols": symbols, "timeframes": timeframes, "start": START.isoformat(),
        "end": END.isoformat(), "stagger_seconds": 0.01, **extra}
    lines = [f"{k} = {v!r}".replace("'", '"') for k, v in settings.items()]
    return "[backfill]\n" + "\n".join(lines) + "\n"


def query(url: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchall()


def test_a_ticker_the_plan_does_not_cover_fails_alone(database: str, tmp_path: Path) -> None:
    good, denied = ["AAPL", "MSFT", "BRK.A", "X:BTCUSD"], "I:SPX"
    timeframes = ["1d", "1h", "5m"]
    with scripted_simulator(tmp_path, seed=SEED, not_entitled=[denied]) as url:
        config = write_config(tmp_path / "config.toml", url,
                              "requests_per_minute = 0\npage_limit = 5000\n"
                              + backfill([denied, *good], timeframes, max_concurrent_symbols=1))
        log = tmp_path / "daemon.log"
        assert run_once(config, database, log=log) == 1  # not everything was fetched
        first = simulator_stats(url)
        # a second cycle within the day asks nothing of the refused series
        assert run_once(config, database, log=log) == 1
        second = simulator_stats(url)
    # the denied ticker was asked once per timeframe, and only in the first run
    assert first["not_entitled"] == len(timeframes) == second["not_entitled"]
    # the good ones are complete and exact, although the denied one came first
    assert table(database) == truth(SEED, good, timeframes, FROM_MS, TO_MS)
    rows = query(database, "SELECT timeframe, status, error FROM job_results"
                 f" WHERE symbol = '{denied}' ORDER BY 1")
    assert [r[:2] for r in rows] == [(tf, "not_entitled") for tf in sorted(timeframes)
                                     for _ in range(2)]  # one row per run
    assert all("not entitled" in str(r[2]) for r in rows)
    refused = query(database, "SELECT count(*) FROM series_freshness"
                    f" WHERE symbol = '{denied}' AND refused_at IS NOT NULL")
    assert refused == [(len(timeframes),)]
    statuses = query(database, "SELECT status, jobs_not_entitled, jobs_failed FROM executions"
                     " ORDER BY started_at")
    assert statuses == [("partial", 3, 0), ("partial", 3, 0)]
    text = log.read_text()
    assert "not entitled" in text and "3 not entitled" in text


@pytest.mark.slow
def test_a_45_second_outage_mid_backfill_is_waited_out(database: str, tmp_path: Path) -> None:
    symbols, timeframes = ["AAPL", "X:BTCUSD", "BRK.B"], ["1h", "5m"]
    expected = truth(SEED, symbols, timeframes, FROM_MS, TO_MS)
    total = sum(len(v) for v in expected.values())
    with scripted_simulator(tmp_path, seed=SEED, latency_ms="5-20") as url:
        # ~90 pages at 10 requests/s: the backfill alone takes ~9 s
        config = write_config(tmp_path / "config.toml", url,
                              "requests_per_minute = 600\npage_limit = 3000\n"
                              + backfill(symbols, timeframes, overlap_bars=0)
                              # probes 5 s, then every 10 s: the test ends soon after the API
                              # is back (the default doubles to 60 s)
                              + "[retry]\nbreaker_max_probe_seconds = 10\n")
        log = tmp_path / "daemon.log"
        daemon = start_daemon(config, database, "--once", log=log)
        try:
            wait_until(lambda: 0 < bar_count(database) < total, "a partial backfill")
            control(url, "outage", seconds=45)
            before = simulator_stats(url)
            code = daemon.wait(timeout=180)
        finally:
            if daemon.poll() is None:
                daemon.kill()
        stats = simulator_stats(url)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert table(database) == expected and duplicates(database) == 0
    during = stats["outage"] - before["outage"]
    # requests in flight when it began, up to the breaker's 5 in a row, then a few probes
    # (5, 10, 20, 40 s apart): nothing like 5 attempts for every page
    print(f"requests answered 503 during the 45 s outage: {during}")
    assert 1 <= during <= 25, during
    assert "API circuit open after" in text and "API circuit closed after" in text
    assert query(database, "SELECT jobs_failed, status FROM executions") == [(0, "ok")]


def test_defective_bars_are_quarantined_the_rest_kept_and_a_correction_clears_them(
        database: str, tmp_path: Path) -> None:
    symbol, timeframes, rate = "AAPL", ["1h", "5m"], 0.1
    expected = truth(SEED, [symbol], timeframes, FROM_MS, TO_MS)
    spoilt = {tf: defective_ts(SEED, symbol, parse_timeframe(tf), FROM_MS, TO_MS, rate)
              for tf in timeframes}
    kinds = {kind for series in spoilt.values() for kind in series.values()}
    assert kinds == set(DEFECT_KINDS)  # every kind of defect is in play
    with scripted_simulator(tmp_path, seed=SEED, defects={symbol: rate}) as url:
        config = write_config(tmp_path / "config.toml", url,
                              "requests_per_minute = 0\npage_limit = 5000\n"
                              + backfill([symbol], timeframes))
        log = tmp_path / "daemon.log"
        assert run_once(config, database, log=log) == 1  # it quarantined something
        got = table(database)
        for tf in timeframes:
            good = [r for r in expected[(symbol, tf)] if r[0] not in spoilt[tf]]
            assert got[(symbol, tf)] == good, tf  # every valid bar kept, no bad one written
        held = query(database, "SELECT timeframe, t, reason FROM quarantined_bars")
        placed = {(tf, t) for tf, t, _ in held if t is not None}
        for tf in timeframes:
            # a bad bar with a usable t is quarantined at that t
            locatable = {t for t, k in spoilt[tf].items()
                         if k not in ("missing_t", "t_outside_range")}
            assert {(tf, t) for t in locatable} <= placed
        assert any(t is None for _, t, _ in held)  # the unplaceable kinds: held by page span
        # the vendor fixes its data; the next top-up asks again for the held spots only
        control(url, "defects", ticker=symbol, rate=0)
        requests_before = simulator_stats(url)["requests"]
        assert run_once(config, database, log=log) == 0
        requests = simulator_stats(url)["requests"] - requests_before
    assert table(database) == expected and duplicates(database) == 0
    assert query(database, "SELECT count(*) FROM quarantined_bars") == [(0,)]
    # the held spans, merged into ranges, plus the tail: far fewer than a full backfill
    assert requests < 2 * len(timeframes) * 10, requests
