"""Real subprocesses for end-to-end tests: the simulator, the daemon, and the ground truth.

The daemon runs as `python -m daemon` exactly as systemd would start it; the simulator as
`python -m daemon simulate`. Both on loopback, talking real HTTP.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import psycopg

from daemon import db
from daemon.simulator.data import ground_truth
from daemon.simulator.options import parse_split
from daemon.simulator.process import control_url, simulator_process
from daemon.simulator.splits import Split
from daemon.timeframes import parse_timeframe

_logs = itertools.count()


@contextlib.contextmanager
def simulator(
    tmp: Path,
    *,
    requests_per_minute: float = 0,
    fault_rate: float = 0.0,
    latency_ms: str = "0-0",
    seed: int = 1,
    extra: tuple[str, ...] = (),
) -> Iterator[str]:
    """Run the simulator as a subprocess, its output in `tmp`; yield its base URL."""
    with simulator_process(requests_per_minute=requests_per_minute, fault_rate=fault_rate,
                           latency_ms=latency_ms, seed=seed, extra=extra,
                           log=tmp / f"simulator-{next(_logs)}.log") as url:
        yield url


def write_config(path: Path, base_url: str, body: str) -> Path:
    """A config for the simulator at `base_url`; the status server on a free port."""
    status = "" if "[status]" in body else '[status]\nlisten = "127.0.0.1:0"\n'
    path.write_text(f'[polygon]\nbase_url = "{base_url}"\napi_key = "test-key"\n{body}{status}')
    return path


def daemon_env(database_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    env["BACKFILLD_DATABASE_URL"] = database_url
    env.update(extra)
    return env


def start_daemon(config: Path, database_url: str, *args: str, log: Path | None = None,
                 **env: str) -> subprocess.Popen[bytes]:
    with open(log or os.devnull, "ab") as out:  # the child keeps its own copy of the fd
        return subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "--config", str(config), *args],
            env=daemon_env(database_url, **env), stdout=out, stderr=subprocess.STDOUT,
        )


def run_once(config: Path, database_url: str, *, log: Path | None = None, timeout: float = 120
             ) -> int:
    proc = start_daemon(config, database_url, "--once", log=log)
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


Row = tuple[int, float, float, float, float, float, float | None, int | None]


def table(database_url: str) -> dict[tuple[str, str], list[Row]]:
    """The bars table as {(symbol, timeframe): [(ts_ms, o, h, l, c, v, vwap, trades), ...]}."""
    out: dict[tuple[str, str], list[Row]] = {}
    with psycopg.connect(database_url) as conn:
        for s, tf, ts, *values in conn.execute(
            "SELECT symbol, timeframe, ts, open, high, low, close, volume, vwap, trades "
            "FROM bars ORDER BY symbol, timeframe, ts"
        ):
            out.setdefault((s, tf), []).append((db.to_ms(ts), *values))  # type: ignore[arg-type]
    return out


def truth(seed: int, symbols: list[str], timeframes: list[str], from_ms: int, to_ms: int,
          *, splits: Sequence[Split | str] = (), adjusted: bool = True,
          ) -> dict[tuple[str, str], list[Row]]:
    """What the simulator serves for the same series, in the same shape as `table`.

    `splits` as given to the simulator (Split objects or `TICKER:DATE:FROM:TO[:hidden]`), with
    `hidden` as it is *now* (once one is announced, pass it again visible).
    """
    parsed = [s if isinstance(s, Split) else parse_split(s) for s in splits]
    out: dict[tuple[str, str], list[Row]] = {}
    for s in symbols:
        for label in timeframes:
            bars = ground_truth(seed, s, parse_timeframe(label), from_ms, to_ms, splits=parsed,
                                adjusted=adjusted)
            rows = [(b["t"], float(b["o"]), float(b["h"]), float(b["l"]), float(b["c"]),
                     float(b["v"]), b.get("vw"), b.get("n")) for b in bars]
            if rows:
                out[(s, label)] = rows
    return out


def duplicates(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) - count(DISTINCT (symbol, timeframe, ts)) FROM bars"
        ).fetchone()
    return int(row[0]) if row else 0


def bar_count(database_url: str) -> int:
    """Rows in `bars` now (0 when the database cannot be reached or is not migrated yet)."""
    try:
        with psycopg.connect(database_url, connect_timeout=2) as conn:
            row = conn.execute("SELECT count(*) FROM bars").fetchone()
    except (psycopg.OperationalError, psycopg.errors.UndefinedTable):
        return 0
    return int(row[0]) if row else 0


def wait_until(condition: Callable[[], bool], what: str, *, timeout: float = 60.0,
               every: float = 0.02) -> None:
    """Poll `condition` until it holds; fail naming `what` after a generous `timeout`.

    End-to-end tests wait on what they can observe (rows, a log line, a status field), never a
    fixed sleep that a slow machine could overrun."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


# --- scripting the simulator (its options, its control endpoints, its counters) ------------


@contextlib.contextmanager
def scripted_simulator(tmp: Path, **options: Any) -> Iterator[str]:
    """`simulator`, with any SimulatorOptions knob as a keyword (see `simulate_arguments`).

    E.g. `scripted_simulator(tmp, not_entitled=["AAPL"], outages=[(5, 10)],
    defects={"MSFT": 0.01}, splits=["NVDA:2024-06-10:1:10:hidden"])`.
    """
    with simulator_process(log=tmp / f"simulator-{next(_logs)}.log", **options) as url:
        yield url


def control(base_url: str, what: str, **params: object) -> dict[str, Any]:
    """POST a simulator control endpoint (e.g. `control(url, "outage", seconds=30)`, or
    `control(url, "splits/announce", ticker="NVDA")`); its JSON answer. Raises on non-2xx."""
    reply = httpx.post(control_url(base_url, what, **params), timeout=10)
    reply.raise_for_status()
    return reply.json()  # type: ignore[no-any-return]


def simulator_stats(base_url: str) -> dict[str, Any]:
    """The simulator's /__stats counters."""
    reply = httpx.get(f"{base_url.rstrip('/')}/__stats", timeout=10)
    reply.raise_for_status()
    return reply.json()  # type: ignore[no-any-return]
