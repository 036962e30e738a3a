"""`backfilld verify` end to end: the daemon and the simulator as subprocesses, a real
PostgreSQL, rows changed behind the daemon's back, found, repaired to the ground truth.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg

from daemon.market_calendar import et_midnight_ms

from .procs import (
    control,
    daemon_env,
    run_once,
    scripted_simulator,
    simulator_stats,
    table,
    truth,
    write_config,
)

SEED = 11
START, END = dt.date(2024, 1, 2), dt.date(2024, 2, 29)
FROM_MS = et_midnight_ms(START)
TO_MS = et_midnight_ms(END + dt.timedelta(days=1)) - 1
SYMBOLS, TIMEFRAMES = ["AAPL", "X:BTCUSD"], ["1d", "1h"]


def backfill() -> str:
    return ("requests_per_minute = 0\npage_limit = 5000\n[backfill]\n"
            f'symbols = {json.dumps(SYMBOLS)}\ntimeframes = {json.dumps(TIMEFRAMES)}\n'
            f'start = "{START}"\nend = "{END}"\nstagger_seconds = 0.01\n')


def verify(config: Path, database: str, *args: str) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-m", "daemon", "verify", "--config", str(config), "--json", *args],
        env=daemon_env(database), capture_output=True, text=True, timeout=120)
    assert proc.stdout, proc.stderr[-3000:]
    return proc.returncode, json.loads(proc.stdout)


def series(report: dict[str, Any], symbol: str, timeframe: str) -> dict[str, Any]:
    return next(s for s in report["series"]
                if (s["symbol"], s["timeframe"]) == (symbol, timeframe))


def execute(url: str, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        cur = conn.execute(sql, params or None)
        return cur.fetchall() if cur.description else []


def ts(ms: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(milliseconds=ms)


def test_verify_finds_exactly_what_was_changed_and_repair_restores_the_truth(
        database: str, tmp_path: Path) -> None:
    expected = truth(SEED, SYMBOLS, TIMEFRAMES, FROM_MS, TO_MS)
    aapl_1h, btc_1d, aapl_1d = (expected[("AAPL", "1h")], expected[("X:BTCUSD", "1d")],
                                expected[("AAPL", "1d")])
    changed, deleted = aapl_1h[100], [aapl_1h[200][0], btc_1d[10][0]]
    # an extra row inside AAPL 1d's coverage: a Saturday, when no daily bar exists
    saturday = et_midnight_ms(dt.date(2024, 2, 3))
    assert saturday not in {r[0] for r in aapl_1d}
    with scripted_simulator(tmp_path, seed=SEED) as url:
        config = write_config(tmp_path / "config.toml", url, backfill())
        assert run_once(config, database, log=tmp_path / "daemon.log") == 0
        assert table(database) == expected
        code, clean = verify(config, database)
        assert code == 0 and clean["ok"], clean
        assert clean["totals"] == {"missing": 0, "extra": 0, "differs": 0, "revisions": 0,
                                   "quarantined": 0}

        # behind the daemon's back
        execute(database, "UPDATE bars SET close = close + 0.5, high = high + 0.5"
                " WHERE symbol = 'AAPL' AND timeframe = '1h' AND ts = %s", ts(changed[0]))
        execute(database, "DELETE FROM bars WHERE (symbol, timeframe, ts) IN"
                " (('AAPL', '1h', %s), ('X:BTCUSD', '1d', %s))", ts(deleted[0]), ts(deleted[1]))
        execute(database, "INSERT INTO bars (symbol, timeframe, ts, open, high, low, close,"
                " volume) VALUES ('AAPL', '1d', %s, 10, 11, 9, 10, 100)", ts(saturday))

        before = simulator_stats(url)["requests"]
        code, found = verify(config, database)
        full_requests = simulator_stats(url)["requests"] - before
        assert code == 1 and not found["ok"]
        assert found["totals"] == {"missing": 2, "extra": 1, "differs": 1, "revisions": 0,
                                   "quarantined": 0}
        assert found["requests"] == full_requests
        hourly = series(found, "AAPL", "1h")
        assert (hourly["missing"], hourly["differs"], hourly["extra"]) == (1, 1, 0)
        kinds = {(e["change"], e["t"]) for e in hourly["examples"]}
        assert kinds == {("differs", changed[0]), ("missing", deleted[0])}
        assert series(found, "X:BTCUSD", "1d")["missing"] == 1
        extra = series(found, "AAPL", "1d")
        assert extra["extra"] == 1 and extra["examples"][0]["t"] == saturday

        code, repaired = verify(config, database, "--repair")
        assert code == 0 and repaired["ok"], repaired
        assert table(database) == expected
        code, again = verify(config, database)
        assert code == 0 and again["ok"]

        # --sample asks for a share of the page-sized ranges: one request each
        before = simulator_stats(url)["requests"]
        code, sampled = verify(config, database, "--sample", "0.25", "--seed", "3")
        sample_requests = simulator_stats(url)["requests"] - before
    assert code == 0 and sampled["seed"] == 3
    assert sample_requests == sampled["units"] == round(0.25 * sampled["units_total"])
    assert sample_requests < full_requests, (sample_requests, full_requests)
    # the repaired series' features were recomputed from the repaired bars
    assert execute(database, "SELECT count(*) FROM features_dirty") == [(0,)]
    for symbol, timeframe in [("AAPL", "1h"), ("X:BTCUSD", "1d"), ("AAPL", "1d")]:
        assert execute(database, "SELECT count(*) FROM features WHERE symbol = %s AND"
                       " timeframe = %s", symbol, timeframe) == [
            (len(expected[(symbol, timeframe)]),)]
    (log_return,), = execute(database, "SELECT log_return FROM features WHERE symbol = 'AAPL'"
                             " AND timeframe = '1h' AND ts = %s", ts(changed[0]))
    assert math.isclose(log_return, math.log(changed[4] / aapl_1h[99][4]), rel_tol=1e-12)


def test_a_change_in_the_last_fetched_session_is_a_revision_not_corruption(
        database: str, tmp_path: Path) -> None:
    expected = truth(SEED, SYMBOLS, TIMEFRAMES, FROM_MS, TO_MS)
    session = dt.date(2024, 2, 29)
    hourly = [r for r in expected[("X:BTCUSD", "1h")]
              if et_midnight_ms(session) <= r[0] < et_midnight_ms(session + dt.timedelta(1))]
    with scripted_simulator(tmp_path, seed=SEED) as url:
        config = write_config(tmp_path / "config.toml", url, backfill())
        assert run_once(config, database) == 0
        # as if the daemon had last fetched X:BTCUSD 1h on the evening of its last session
        fetched = ts(et_midnight_ms(session) + 20 * 3_600_000)
        execute(database, "UPDATE series_freshness SET last_success_at = %s"
                " WHERE symbol = 'X:BTCUSD' AND timeframe = '1h'", fetched)
        execute(database, "UPDATE bars SET volume = volume + 1 WHERE symbol = 'X:BTCUSD'"
                " AND timeframe = '1h' AND ts = %s", ts(hourly[5][0]))
        code, found = verify(config, database)
        assert code == 0 and found["ok"]  # a revision does not fail verify
        assert found["totals"]["revisions"] == 1 and found["totals"]["differs"] == 0
        one = series(found, "X:BTCUSD", "1h")
        assert one["examples"][0]["revision"] and one["examples"][0]["t"] == hourly[5][0]
        # the same change a day earlier than the session is corruption
        execute(database, "UPDATE bars SET volume = volume + 1 WHERE symbol = 'X:BTCUSD'"
                " AND timeframe = '1h' AND ts = %s", ts(hourly[5][0] - 86_400_000))
        code, found = verify(config, database, "--timeframe", "1h", "--symbol", "X:BTCUSD")
        assert code == 1 and found["totals"]["differs"] == 1
        assert [s["symbol"] for s in found["series"]] == ["X:BTCUSD"]
        # repair writes the vendor's version of both
        code, _ = verify(config, database, "--repair")
        assert code == 0
    assert table(database) == expected


def test_bars_the_api_now_serves_wrong_are_quarantined_not_missing(
        database: str, tmp_path: Path) -> None:
    expected = truth(SEED, SYMBOLS, TIMEFRAMES, FROM_MS, TO_MS)
    with scripted_simulator(tmp_path, seed=SEED) as url:
        config = write_config(tmp_path / "config.toml", url, backfill())
        assert run_once(config, database) == 0
        control(url, "defects", ticker="AAPL", rate=0.05)  # the vendor breaks its answers
        code, found = verify(config, database)
        assert code == 0 and found["ok"], found  # nothing stored is known to be wrong
        totals = found["totals"]
        assert totals["quarantined"] > 0
        assert (totals["missing"], totals["extra"], totals["differs"]) == (0, 0, 0)
        code, _ = verify(config, database, "--repair")  # leaves the stored rows alone
        assert code == 0
    assert table(database) == expected
