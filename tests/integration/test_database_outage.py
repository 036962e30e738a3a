"""The database goes away mid-backfill and comes back: nothing is lost, nothing doubled.

The test owns its own embedded PostgreSQL (not the session's), started by a helper process so
that this process holds no handle on it, and shut down with SIGINT to the postmaster (a "fast"
shutdown: every connection is cut, as in a restart or a failover).
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from daemon.market_calendar import et_midnight_ms

from .procs import (
    bar_count,
    duplicates,
    simulator,
    start_daemon,
    table,
    truth,
    wait_until,
    write_config,
)

SEED = 11
FROM_MS = et_midnight_ms(dt.date(2024, 1, 2))
TO_MS = et_midnight_ms(dt.date(2024, 3, 1)) - 1
SYMBOLS = ["AAPL", "X:BTCUSD", "BRK.B"]
TIMEFRAMES = ["1h", "5m"]

_START = """
import sys
from daemon.embedded import embedded_postgres
with embedded_postgres(sys.argv[1], keep_running=True) as url:
    print(url, flush=True)
"""


def start_postgres(state: Path) -> str:
    done = subprocess.run([sys.executable, "-c", _START, str(state)], capture_output=True,
                          text=True, timeout=60, check=True)
    return done.stdout.strip().splitlines()[-1]


def stop_postgres(state: Path) -> None:
    pid = int((state / "pgdata" / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGINT)  # fast shutdown: connections are terminated
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise TimeoutError("PostgreSQL did not stop")


def test_database_restart_mid_backfill_loses_nothing(tmp_path: Path) -> None:
    state = tmp_path / "pg"
    url = start_postgres(state)
    try:
        with simulator(tmp_path, latency_ms="5-20", seed=SEED) as api:
            config = write_config(
                tmp_path / "config.toml", api,
                "requests_per_minute = 600\npage_limit = 3000\n"
                f"[backfill]\nsymbols = {SYMBOLS!r}\ntimeframes = {TIMEFRAMES!r}\n".replace(
                    "'", '"')
                + 'start = "2024-01-02"\nend = "2024-02-29"\nstagger_seconds = 0.01\n',
            )
            log = tmp_path / "daemon.log"
            total = sum(len(v) for v in truth(SEED, SYMBOLS, TIMEFRAMES, FROM_MS,
                                                TO_MS).values())
            daemon = start_daemon(config, url, "--once", log=log)
            # mid-backfill: some pages committed, not all (the whole run takes ~9 s)
            wait_until(lambda: 0 < bar_count(url) < total, "a partial backfill")
            stop_postgres(state)
            # the database is gone until the daemon has noticed and started waiting it out
            wait_until(lambda: "retrying in" in log.read_text(), "a retry warning")
            assert daemon.poll() is None, "the daemon must wait for the database, not exit"
            start_postgres(state)
            code = daemon.wait(timeout=120)
        text = log.read_text()
        assert code == 0, text[-3000:]
        assert "retrying" in text  # it noticed the outage and waited it out
        assert table(url) == truth(SEED, SYMBOLS, TIMEFRAMES, FROM_MS, TO_MS)
        assert duplicates(url) == 0
    finally:
        stop_postgres(state)
