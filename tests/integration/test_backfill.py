"""End to end: the daemon as a subprocess, the simulator as a subprocess, a real PostgreSQL.

The whole `bars` table is compared with the simulator's ground truth: same keys, same values,
no duplicates, tickers with `:` and `.` included.
"""

from __future__ import annotations

import datetime as dt
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

from daemon import db
from daemon.market_calendar import et_midnight_ms

from .procs import (
    bar_count,
    duplicates,
    run_once,
    simulator,
    start_daemon,
    table,
    truth,
    wait_until,
    write_config,
)

SEED = 11
SYMBOLS = ["AAPL", "BRK.A", "X:BTCUSD", "I:SPX"]
TIMEFRAMES = ["1d", "1h", "15m", "5m"]
START, END = dt.date(2024, 1, 2), dt.date(2024, 2, 29)
FROM_MS = et_midnight_ms(START)
TO_MS = et_midnight_ms(END + dt.timedelta(days=1)) - 1


def backfill_section(**overrides: object) -> str:
    settings = {
        "symbols": SYMBOLS, "timeframes": TIMEFRAMES, "start": START.isoformat(),
        "end": END.isoformat(), "stagger_seconds": 0.01, "max_concurrent_symbols": 3,
        **overrides,
    }
    lines = [f"{k} = {v!r}".replace("'", '"') for k, v in settings.items()]
    return "[backfill]\n" + "\n".join(lines) + "\n"


FAST_RETRY = "[retry]\nattempts = 8\nmin_seconds = 0.05\nmax_seconds = 1\n"


def test_once_with_faults_and_rate_limit_equals_ground_truth(
    database: str, tmp_path: Path
) -> None:
    # The daemon is told it may send 3x what the simulator allows (counted over a 2 s window):
    # 429s must happen and be absorbed; one response in ten is a fault of some kind.
    with simulator(tmp_path, requests_per_minute=1200, fault_rate=0.1, latency_ms="5-30",
                   seed=SEED, extra=("--window-seconds", "2")) as url:
        config = write_config(
            tmp_path / "config.toml", url,
            "requests_per_minute = 3600\npage_limit = 5000\n" + backfill_section() + FAST_RETRY,
        )
        log = tmp_path / "daemon.log"
        code = run_once(config, database, log=log)
        stats = _sim_stats(url)
    assert code == 0, log.read_text()[-3000:]
    expected = truth(SEED, SYMBOLS, TIMEFRAMES, FROM_MS, TO_MS)
    got = table(database)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == expected[key], key
    assert duplicates(database) == 0
    assert stats["faults_total"] > 0 and stats["rate_limited"] > 0
    coverage = db.read_coverage(database)
    for key, rows in expected.items():
        # one span from the first day through (at least) the newest bar
        [(lo, hi)] = coverage[key]
        assert lo == FROM_MS and rows[-1][0] < hi <= TO_MS + 1, key


def test_second_run_is_a_top_up_not_a_refetch(database: str, tmp_path: Path) -> None:
    with simulator(tmp_path, seed=SEED) as url:
        config = write_config(
            tmp_path / "config.toml", url,
            "page_limit = 5000\n" + backfill_section(symbols=["BRK.A"]) + FAST_RETRY,
        )
        assert run_once(config, database) == 0
        first = _sim_stats(url)["requests"]
        assert run_once(config, database) == 0
        second = _sim_stats(url)["requests"] - first
    # the top-up asks for the overlap window only: one page per timeframe, and the cycle's one
    # market-wide splits check
    assert second == len(TIMEFRAMES) + 1
    assert first > 3 * len(TIMEFRAMES)
    assert table(database) == truth(SEED, ["BRK.A"], TIMEFRAMES, FROM_MS, TO_MS)


def test_bad_key_exits_1_with_reason(database: str, tmp_path: Path) -> None:
    with simulator(tmp_path, extra=("--api-key", "the-right-key")) as url:
        config = write_config(tmp_path / "config.toml", url, backfill_section())
        log = tmp_path / "daemon.log"
        assert run_once(config, database, log=log) == 1
    text = log.read_text()
    assert "NOT_AUTHORIZED" in text or "401" in text
    assert "test-key" not in text  # the key never reaches the logs


def test_sigkill_at_random_moments_then_resume_is_exact(database: str, tmp_path: Path) -> None:
    rng = random.Random(20241122)
    symbols = ["AAPL", "X:BTCUSD", "BRK.B"]
    total = sum(len(v) for v in truth(SEED, symbols, ["1h", "5m"], FROM_MS, TO_MS).values())
    with simulator(tmp_path, latency_ms="5-20", seed=SEED) as url:
        # ~90 pages at 10 requests/s: a full backfill takes ~9 s, each life ~1-2 s of it
        config = write_config(
            tmp_path / "config.toml", url,
            "requests_per_minute = 600\npage_limit = 3000\n"
            + backfill_section(symbols=symbols, timeframes=["1h", "5m"], overlap_bars=0)
            + FAST_RETRY,
        )
        counts = _killed_lives(config, database, tmp_path / "daemon.log", rng, 6)
        assert run_once(config, database, log=tmp_path / "daemon.log") == 0
    # every kill landed mid-backfill, and progress survived each of them
    assert all(0 < c < total for c in counts), counts
    assert counts == sorted(counts) and len(set(counts)) == 6
    # each restart closed the cycle its killed predecessor left running
    with psycopg.connect(database) as conn:
        statuses = dict(conn.execute(
            "SELECT status, count(*) FROM executions GROUP BY status").fetchall())
    assert statuses.get("running", 0) == 0 and statuses.get("interrupted", 0) >= 5, statuses
    assert statuses.get("ok") == 1
    assert table(database) == truth(SEED, symbols, ["1h", "5m"], FROM_MS, TO_MS)
    assert duplicates(database) == 0


def test_sigkill_during_a_chunked_backfill_leaves_no_gap_and_no_duplicate(
        database: str, tmp_path: Path) -> None:
    """Each life dies while several sub-ranges of one series are in flight: coverage is then a
    set of intervals with holes between them, and the next life plans and fetches exactly the
    holes."""
    rng = random.Random(20261207)
    symbols, timeframes = ["X:BTCUSD", "AAPL"], ["5m"]
    total = sum(len(v) for v in truth(SEED, symbols, timeframes, FROM_MS, TO_MS).values())
    holes_seen = 0
    with simulator(tmp_path, latency_ms="40-80", seed=SEED) as url:
        # ~16 pages a series at 1,000 bars a page, walked as 4 sub-ranges at once
        config = write_config(
            tmp_path / "config.toml", url,
            "requests_per_minute = 600\npage_limit = 1000\n"
            + backfill_section(symbols=symbols, timeframes=timeframes, overlap_bars=0,
                               parallel_ranges=4)
            + FAST_RETRY + '[logging]\nlevel = "debug"\n',
        )
        log = tmp_path / "daemon.log"

        def count_holes() -> None:
            nonlocal holes_seen
            holes_seen += sum(len(spans) - 1 for spans in db.read_coverage(database).values())

        counts = _killed_lives(config, database, log, rng, 4, after_each=count_holes)
        assert run_once(config, database, log=log) == 0
    assert "splitting the rest into 4 sub-ranges" in log.read_text()
    # the kills left holes between sub-ranges (what makes this the chunked case)
    assert holes_seen > 0
    assert all(0 < c < total for c in counts), counts
    assert table(database) == truth(SEED, symbols, timeframes, FROM_MS, TO_MS)
    assert duplicates(database) == 0
    coverage = db.read_coverage(database)
    assert all(len(spans) == 1 and spans[0][0] == FROM_MS for spans in coverage.values()), coverage


def _killed_lives(config: Path, database: str, log: Path, rng: random.Random, lives: int, *,
                  after_each: Callable[[], None] = lambda: None) -> list[int]:
    """Start `run --once` `lives` times; each life commits something new, then is SIGKILLed
    at a random instant soon after. The bar count after each kill (`after_each` runs there)."""
    counts = []
    for _ in range(lives):
        before = bar_count(database)
        proc = start_daemon(config, database, "--once", log=log)
        wait_until(lambda before=before: bar_count(database) > before, "new rows")
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        counts.append(bar_count(database))
        after_each()
    return counts


def _sim_stats(url: str) -> dict[str, int]:
    import httpx

    return httpx.get(f"{url}/__stats", timeout=5).json()
