"""Splits keep adjusted history true, end to end: the daemon and the simulator as subprocesses.

Two tickers are backfilled; the simulator then announces a 10-for-1 split of one (its adjusted
history before the split changes, as the real API's does); the next cycle must leave the table
exactly as the simulator now serves both, without fetching the other ticker's history again,
with features equal to a from-scratch computation. A reverse 1-for-5 split of the same ticker
comes next, and must come out exact too.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import attrs
import psycopg

from daemon.features import rebuild
from daemon.market_calendar import et_midnight_ms, previous_trading_day
from daemon.simulator.splits import Split

from .procs import (
    control,
    duplicates,
    run_once,
    scripted_simulator,
    simulator_stats,
    table,
    truth,
    write_config,
)

SEED = 11
TIMEFRAMES = ["1d", "1h", "5m"]


def test_a_split_and_a_reverse_split_leave_the_adjusted_history_exact(
        database: str, tmp_path: Path) -> None:
    today = dt.datetime.now(dt.UTC).date()
    # recent execution dates: a split is listed around its execution date, and the daemon asks
    # for those since its last check (less a week)
    first = previous_trading_day(today - dt.timedelta(days=5))
    second = previous_trading_day(today - dt.timedelta(days=2))
    splits = [Split("NVDA", first.isoformat(), 1, 10, hidden=True),
              Split("NVDA", second.isoformat(), 5, 1, hidden=True)]
    start = today - dt.timedelta(days=20)
    # the simulator's clock stops at the end of yesterday: the truth is fixed, nothing new
    # appears between cycles but what a split changes
    from_ms, to_ms = et_midnight_ms(start), et_midnight_ms(today) - 1
    symbols = ["NVDA", "MSFT"]
    with scripted_simulator(tmp_path, seed=SEED, now=str(to_ms),
                            splits=[_arg(s) for s in splits]) as url:
        config = write_config(
            tmp_path / "config.toml", url,
            "requests_per_minute = 0\npage_limit = 5000\n[backfill]\n"
            f'symbols = ["NVDA", "MSFT"]\ntimeframes = {TIMEFRAMES!r}\n'.replace("'", '"')
            + f'start = "{start.isoformat()}"\nstagger_seconds = 0.01\n')
        log = tmp_path / "daemon.log"
        assert run_once(config, database, log=log) == 0
        assert table(database) == truth(SEED, symbols, TIMEFRAMES, from_ms, to_ms,
                                        splits=splits)

        for n in (1, 2):
            control(url, "splits/announce", ticker="NVDA")
            splits[n - 1] = attrs.evolve(splits[n - 1], hidden=False)
            before = simulator_stats(url)["requests"]
            started = time.monotonic()
            assert run_once(config, database, log=log) == 0
            took = time.monotonic() - started
            spent = _requests_of_last_execution(database)
            assert sum(spent.values()) + 1 == simulator_stats(url)["requests"] - before  # +splits
            expected = truth(SEED, symbols, TIMEFRAMES, from_ms, to_ms, splits=splits)
            assert table(database) == expected, f"after split {n}"
            assert duplicates(database) == 0
            # MSFT: the top-up's tail only (one request per timeframe); NVDA: its history again
            assert spent.get("MSFT", 0) == len(TIMEFRAMES), spent
            assert spent.get("NVDA", 0) > len(TIMEFRAMES), spent
            print(f"split {n}: {spent.get('NVDA', 0) - len(TIMEFRAMES)} requests to re-adjust "
                  f"NVDA, {took:.1f} s from the announcement to an exact series")
            # the features equal a from-scratch computation: a rebuild changes nothing
            assert rebuild(database) == 0
    with psycopg.connect(database) as conn:
        applied = conn.execute("SELECT ticker, execution_date, bars_rescaled > 0 FROM splits"
                               " WHERE applied_at IS NOT NULL ORDER BY 2").fetchall()
    assert applied == [("NVDA", first, True), ("NVDA", second, True)]
    assert "NVDA split 10-for-1 on" in log.read_text()
    assert "NVDA reverse split 1-for-5 on" in log.read_text()


def _arg(split: Split) -> str:
    hidden = ":hidden" if split.hidden else ""
    return (f"{split.ticker}:{split.execution_date}:{split.split_from:g}:{split.split_to:g}"
            f"{hidden}")


def _requests_of_last_execution(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT symbol, sum(attempts) FROM job_results WHERE execution_id ="
            " (SELECT id FROM executions ORDER BY started_at DESC LIMIT 1) GROUP BY 1").fetchall()
    return {symbol: int(n) for symbol, n in rows}
