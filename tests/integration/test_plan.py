"""`backfilld plan` against what `run --once` then really sends, on a fresh database: the
daemon and the simulator as subprocesses, the requests counted by the simulator.

Tickers: MSFT (liquid at this seed: 87 % of extended-hours minutes trade), SPY (thin: 38 %),
X:BTCUSD (crypto, around the clock); timeframes 1d, 1h, 15m, 5m.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from .procs import daemon_env, run_once, scripted_simulator, simulator_stats, write_config

SEED = 11
SYMBOLS, TIMEFRAMES = ["MSFT", "SPY", "X:BTCUSD"], ["1d", "1h", "15m", "5m"]
TOLERANCE = 0.15


def plan(config: Path, database: str, *args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "daemon", "plan", "--config", str(config), "--json", *args],
        env=daemon_env(database), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize(("polygon", "plan_args"), [
    # unlimited, on loopback: the API's 100 req/s ceiling x ~ms latency needs no split
    ("requests_per_minute = 0\npage_limit = 5000\n", ("--latency", "0.01")),
    # unlimited and slow (400 ms a page): deep ranges split into max_in_flight sub-ranges
    ("requests_per_minute = 0\npage_limit = 5000\n", ("--latency", "0.4")),
    # rate-limited, on loopback (latency ~ms: the scheduler does not split)
    ("requests_per_minute = 3000\npage_limit = 3000\n", ("--latency", "0.01")),
], ids=["unlimited", "unlimited-slow", "rate-limited"])
def test_plan_is_within_15_percent_of_what_run_once_sends(
        database: str, tmp_path: Path, polygon: str, plan_args: tuple[str, ...]) -> None:
    body = (polygon + "[backfill]\n"
            f"symbols = {json.dumps(SYMBOLS)}\ntimeframes = {json.dumps(TIMEFRAMES)}\n"
            'start = "2024-01-02"\nend = "2024-06-28"\nstagger_seconds = 0.01\n')
    latency = "400-400" if "0.4" in plan_args else "0-0"
    with scripted_simulator(tmp_path, seed=SEED, latency_ms=latency) as url:
        config = write_config(tmp_path / "config.toml", url, body)
        planned = plan(config, database, *plan_args)
        assert run_once(config, database, log=tmp_path / "daemon.log", timeout=300) == 0
        sent = simulator_stats(url)["requests"]
    with psycopg.connect(database) as conn:
        attempts = dict(((s, tf), n) for s, tf, n in conn.execute(
            "SELECT symbol, timeframe, attempts FROM job_results"))
    errors = {(s["symbol"], s["timeframe"]): (s["requests"], attempts[(s["symbol"],
                                                                       s["timeframe"])])
              for s in planned["series"]}
    for key, (p, a) in sorted(errors.items()):
        print(f"{key[0]:9} {key[1]:4} planned {p:4} sent {a:4} error {(p - a) / a:+.1%}")
    error = (planned["requests"] - sent) / sent
    print(f"total: planned {planned['requests']}, sent {sent}: {error:+.1%}; "
          f"upper bound {planned['upper_requests']}")
    assert sum(a for _, a in errors.values()) + 1 == sent  # + the cycle's splits check
    assert abs(error) <= TOLERANCE, (planned["requests"], sent)
    assert planned["seconds"] > 0 and planned["jobs"] == len(SYMBOLS) * len(TIMEFRAMES)
