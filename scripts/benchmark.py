#!/usr/bin/env python3
"""Speed targets, measured: every figure beside its reference from the same run; asserts nothing.

    uv run python scripts/benchmark.py [--quick] [--json PATH] [--only NAME[,NAME]]
                                       [--keep-logs DIR]

One embedded PostgreSQL (in a temporary directory, removed afterwards) serves every figure; the
daemon runs as `python -m daemon run --config C --once` (a child process, as systemd starts
it) against the simulator (`python -m daemon simulate`, another child). Figures (`--only`
names):

  deep      one deep series (SPY 5m, 8 years, 400 ms a page, unlimited rate): wall with
            automatic parallel ranges / wall with parallel_ranges = 1 (the sequential next_url
            walk). 36 pages would need a `limit` of 53,627 (the simulator counts 1,930,555 base
            minutes), above the API's 50,000: the largest is used, 39 pages. The auto run is
            killed after 10 x the sequential wall (then its figure is a lower bound).
  e2e       12 symbols x 5m x 2 years (~1.1 M bars), no latency, unlimited rate: the daemon's
            bars/s (features always run: there is no switch) / a bare binary COPY of the same
            rows into a plain table with the same primary key
  rss       peak RSS of `run --once` (the child's VmHWM, sampled every 20 ms) for 4 years /
            1 year of 5m + 1h history of 2 symbols
  demo      `backfilld demo` wall / its request bound (requests sent / the demo's rate)
  fixed     `python -m daemon --help` (median of 5) and a `run --once` with nothing to do
  status    scripts/loadtest.py --clients 50 --seconds 10 during a backfill: p50/p99
  features  `backfilld features rebuild` rows/s over the e2e data / the writer's bars/s there
  scaleout  1, 2 and 3 daemon processes from one config on one database: bars/s (on 2 cores
            this shows the coordination overhead, not a speed-up)
  decode    decode + validate one 50,000-bar page; the writer's rows/s (new and conflicting)

On stderr: a line of JSON per figure as it finishes, then the table (figure | measured |
reference | ratio | target | met?). On stdout (and in --json PATH): the whole result as one
JSON object (machine, load averages, figures, each with the command and config it used).
The whole run takes about 3 minutes on 2 cores. `--quick` shrinks every universe; its figures
are for smoke, not for the README.
Exit status 0 whatever the figures say; a figure that could not be measured is reported with
its error and the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import psycopg
import trio
from psycopg import conninfo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon import db  # noqa: E402
from daemon.bars import (  # noqa: E402
    AggsResponse,
    Bar,
    CopyRows,
    check_bars,
    decode_page,
    encode_copy_rows,
)
from daemon.embedded import embedded_postgres  # noqa: E402
from daemon.features import FeaturesTask  # noqa: E402
from daemon.jobs import FetchResult, JobOutcome, Receipt, SeriesKey  # noqa: E402
from daemon.log import setup_logging  # noqa: E402
from daemon.market_calendar import et_midnight_ms  # noqa: E402
from daemon.simulator.data import ground_truth, page_with_count  # noqa: E402
from daemon.simulator.process import simulator_process  # noqa: E402
from daemon.timeframes import parse_timeframe  # noqa: E402
from daemon.writer import JobFinished, PageWrite, Writer, open_writer_channel  # noqa: E402

PAGE = 50_000  # bars in the decode and writer benches' page (the API's largest)
RUN_TIMEOUT = 600.0  # seconds a `run --once` may take before it is killed (and reported)
SEED = 7
E2E_SYMBOLS = ("AAPL", "MSFT", "NVDA", "AMZN", "GOOGL", "META", "TSLA", "JPM", "V", "UNH",
               "XOM", "JNJ")
# Fixed dates (not "today"): the same bars, pages and figures on every run.
LAST_DAY = dt.date(2025, 12, 31)
DEEP_PAGES = 36
DEEP_LATENCY_MS = 400
MAX_PAGE_LIMIT = 50_000  # the API's largest `limit`
MIB = 1024 * 1024
CYCLE_LINE = re.compile(r"cycle 1 finished in ([\d.]+) s: (\d+) jobs, (\d+) failed, (\d+) bars")
REBUILD_LINE = re.compile(r"features rebuilt: ([\d,]+) series, ([\d,]+) rows in ([\d.]+) s")


# --- a figure's rows ----------------------------------------------------------------------


def row(label: str, measured: float | None, reference: float | None = None, *, unit: str = "",
        ref_label: str = "", target: tuple[str, float] | None = None, on: str = "ratio"
        ) -> dict[str, Any]:
    """One line of the table. `target` is (operator, bound) applied to the ratio (`on="ratio"`,
    measured / reference) or to the measured value itself (`on="measured"`)."""
    ratio = (measured / reference if measured is not None and reference else None)
    value = ratio if on == "ratio" else measured
    met = None
    if target is not None and value is not None:
        op, bound = target
        met = {"<=": value <= bound, "<": value < bound, ">=": value >= bound}[op]
    return {
        "figure": label, "measured": _round(measured), "reference": _round(reference),
        "reference_is": ref_label, "unit": unit, "ratio": _round(ratio, 3),
        "target": f"{on} {target[0]} {target[1]:g}" if target else "", "met": met,
    }


def _round(value: float | None, digits: int = 3) -> float | None:
    if value is None:
        return None
    return round(value, digits) if abs(value) < 1000 else round(value)


# --- the machine, the database, the processes ---------------------------------------------


def machine(server_url: str | None) -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        ram = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    pg = None
    if server_url:
        with psycopg.connect(server_url) as conn:
            pg = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
    return {"cores": os.cpu_count(), "cpu": cpu or platform.machine(),
            "ram_gib": round(ram / 1024**3, 1), "python": platform.python_version(),
            "postgresql": pg, "platform": platform.platform()}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class Bench:
    """The shared embedded PostgreSQL and a scratch directory; fresh databases on demand."""

    def __init__(self, server_url: str, tmp: Path, quick: bool) -> None:
        self.server_url = server_url
        self.tmp = tmp
        self.quick = quick
        self.cache: dict[str, Any] = {}  # what one figure leaves for another (the e2e data)

    def database(self, name: str) -> str:
        with psycopg.connect(self.server_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {name}")
        return conninfo.make_conninfo(self.server_url, dbname=name)

    def config(self, name: str, sim_url: str, body: str) -> tuple[Path, str]:
        """Write a daemon config for the simulator at `sim_url`; its path and text."""
        text = (f'[polygon]\nbase_url = "{sim_url}"\napi_key = "bench-key"\n{body}'
                '[status]\nlisten = "127.0.0.1:0"\n'
                f'[logging]\nlevel = "info"\n')
        path = self.tmp / f"{name}.toml"
        path.write_text(text)
        return path, text.replace(sim_url, "http://127.0.0.1:PORT")


# Not inherited by the children: an installed daemon runs with its bytecode cached (what
# PYTHONDONTWRITEBYTECODE, set on some CI and build machines, forbids: every start would then
# compile every module again, ~0.4 s of `run`'s start here).
_NOT_INHERITED = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "PYTHONDONTWRITEBYTECODE")


def child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}


def daemon_env(database_url: str) -> dict[str, str]:
    env = child_env()
    env["BACKFILLD_DATABASE_URL"] = database_url
    return env


class Child:
    """A `python -m daemon ...` child; `reap()` waits with os.wait4 for its own rusage."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path | None) -> None:
        self.log = log
        with open(log or os.devnull, "ab") as out:
            self.started = time.perf_counter()
            self.proc = subprocess.Popen([sys.executable, "-m", "daemon", *args], env=env,
                                         stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        self.ended: float | None = None
        self.returncode: int | None = None
        self.maxrss_bytes = 0  # the child's own high-water mark (VmHWM), see _watch_hwm
        self.wait4_maxrss_bytes = 0
        self.killed = False
        self._watcher = threading.Thread(target=self._watch_hwm, daemon=True)
        self._watcher.start()

    def _watch_hwm(self) -> None:
        """Sample /proc/PID/status VmHWM (monotonic) until the child is gone.

        Why not only wait4's ru_maxrss: Python spawns children with vfork, and Linux records
        the pre-exec (the parent's) memory high-water mark in the child's maxrss, so every
        child of a benchmark holding 1 M rows in memory reported 878 MiB. VmHWM belongs to
        the child's own post-exec address space; sampled every 20 ms, it misses at most the
        growth of the child's last 20 ms.
        """
        status = Path(f"/proc/{self.proc.pid}/status")
        while True:
            try:
                text = status.read_text()
            except OSError:
                return
            match = re.search(r"^VmHWM:\s+(\d+) kB", text, re.M)
            if match is None:  # a zombie: its memory is gone
                return
            self.maxrss_bytes = max(self.maxrss_bytes, int(match.group(1)) * 1024)
            time.sleep(0.02)

    def reap(self, timeout: float = RUN_TIMEOUT) -> Child:
        """Wait for the child (killed after `timeout` seconds: then `killed` is set)."""

        def kill() -> None:
            self.killed = True
            self.proc.kill()

        killer = threading.Timer(timeout, kill)
        killer.start()
        try:
            _, status, usage = os.wait4(self.proc.pid, 0)
        finally:
            killer.cancel()
        self.ended = time.perf_counter()
        self.returncode = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.returncode  # reaped here, not by Popen
        self.wait4_maxrss_bytes = usage.ru_maxrss * 1024  # KiB on Linux
        self._watcher.join(timeout=5)
        return self

    @property
    def wall(self) -> float:
        assert self.ended is not None
        return self.ended - self.started

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log else ""


def run_once(bench: Bench, config: Path, db_url: str, name: str, *,
             timeout: float = RUN_TIMEOUT) -> Child:
    """`run --once`; RuntimeError when it fails (a kill after `timeout` is returned, flagged)."""
    child = Child(["run", "--config", str(config), "--once"], daemon_env(db_url),
                  bench.tmp / f"{name}.log").reap(timeout)
    if child.returncode != 0 and not child.killed:
        tail = child.output()[-1500:]
        raise RuntimeError(f"run --once ({name}) exited {child.returncode}:\n{tail}")
    return child


def cycle_line(child: Child) -> dict[str, float]:
    """The "cycle 1 finished in X s: J jobs, F failed, N bars written" line of a run's log."""
    match = CYCLE_LINE.search(child.output())
    if match is None:
        return {}
    seconds, jobs, failed, bars = match.groups()
    stamps = [_clock(line) for line in child.output().splitlines()]
    known = [t for t in stamps if t is not None]
    ends = [_clock(line) for line in child.output().splitlines() if CYCLE_LINE.search(line)]
    out = {"cycle_seconds": float(seconds), "jobs": int(jobs), "failed": int(failed),
           "bars_written": int(bars)}
    if known and ends and ends[0] is not None:
        # from the cycle's end to the last log line: the features drain and the shutdown
        out["after_cycle_s"] = round((known[-1] - ends[0]) % 86_400, 2)
    return out


def _clock(line: str) -> float | None:
    """Seconds since midnight of a text log line's `HH:MM:SS.mmm` prefix."""
    match = re.match(r"^(\d\d):(\d\d):(\d\d\.\d+) ", line)
    if match is None:
        return None
    h, m, sec = match.groups()
    return int(h) * 3600 + int(m) * 60 + float(sec)


def aggs_requests(sim_url: str) -> int:
    stats = httpx.get(f"{sim_url}/__stats", timeout=10).json()
    return int(stats["requests_by_path"]["aggs"])


def bar_count(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        return int(conn.execute("SELECT count(*) FROM bars").fetchone()[0])  # type: ignore[index]


def backfill_body(symbols: tuple[str, ...] | list[str], timeframes: list[str], first: dt.date,
                  last: dt.date, *, extra_polygon: str = "", extra_backfill: str = "",
                  extra: str = "") -> str:
    names = ", ".join(f'"{s}"' for s in symbols)
    frames = ", ".join(f'"{t}"' for t in timeframes)
    return (f"requests_per_minute = 0\nmax_in_flight = 16\n{extra_polygon}"
            f"[backfill]\nsymbols = [{names}]\ntimeframes = [{frames}]\n"
            f'start = "{first.isoformat()}"\nend = "{last.isoformat()}"\n'
            f"stagger_seconds = 0.01\n{extra_backfill}"
            "[retry]\nmin_seconds = 0.1\nmax_seconds = 5\n" + extra)


def years_before(last: dt.date, years: float) -> dt.date:
    return last - dt.timedelta(days=round(365.25 * years) - 1)


# --- 1. deep series -------------------------------------------------------------------------


def fig_deep(bench: Bench) -> dict[str, Any]:
    first = years_before(LAST_DAY, 2 if bench.quick else 8)
    # The base aggregates the simulator counts for the whole series (a 5m bar costs its session
    # minutes): 36 pages would need a `limit` above the API's 50,000, so the largest is used.
    _, _, aggregates = page_with_count(SEED, "SPY", parse_timeframe("5m"), et_midnight_ms(first),
                                       et_midnight_ms(LAST_DAY + dt.timedelta(days=1)) - 1,
                                       2**62)
    wanted_limit = math.ceil(aggregates / (9 if bench.quick else DEEP_PAGES))
    page_limit = min(MAX_PAGE_LIMIT, wanted_limit)
    walls: dict[int, float] = {}
    requests: dict[int, int] = {}
    killed: dict[int, bool] = {}
    cycles: dict[int, dict[str, float]] = {}
    configs: dict[str, str] = {}
    latency = f"{DEEP_LATENCY_MS}-{DEEP_LATENCY_MS}"
    with simulator_process(latency_ms=latency, seed=SEED,
                           log=bench.tmp / "deep-sim.log") as sim:
        for ranges in (1, 0):  # sequential first: the reference
            url = bench.database(f"deep_{ranges}")
            body = backfill_body(["SPY"], ["5m"], first, LAST_DAY,
                                 extra_polygon=f"page_limit = {page_limit}\n",
                                 extra_backfill=f"parallel_ranges = {ranges}\n")
            path, text = bench.config(f"deep-{ranges}", sim, body)
            configs[f"parallel_ranges = {ranges}"] = text
            before = aggs_requests(sim)
            # auto gets 10 x what the sequential walk took, then is killed (a lower bound)
            limit = max(60.0, 10 * walls[1]) if ranges == 0 else RUN_TIMEOUT
            child = run_once(bench, path, url, f"deep-{ranges}", timeout=limit)
            walls[ranges], killed[ranges] = child.wall, child.killed
            requests[ranges] = aggs_requests(sim) - before
            cycles[ranges] = cycle_line(child)
    return {
        "rows": [row("deep series: wall auto / parallel_ranges=1"
                     + (" (auto KILLED at its timeout: a lower bound)" if killed[0] else ""),
                     walls[0], walls[1],
                     unit="s", ref_label="sequential next_url walk", target=("<=", 0.40)),
                 row("deep series: cycle auto / cycle sequential (log lines)",
                     cycles[0].get("cycle_seconds"), cycles[1].get("cycle_seconds"), unit="s",
                     ref_label="sequential", target=("<=", 0.40))],
        "command": "python -m daemon run --config C --once (twice: parallel_ranges 0, then 1)",
        "simulator": f"python -m daemon simulate --latency-ms {latency} (unlimited rate)",
        "config": configs,
        "details": {"series": f"SPY 5m {first} .. {LAST_DAY}", "page_limit": page_limit,
                    "base_aggregates": aggregates,
                    "page_limit_wanted": wanted_limit,
                    "page_limit_note": "" if wanted_limit <= MAX_PAGE_LIMIT else
                    f"{DEEP_PAGES} pages need limit {wanted_limit:,} > the API's "
                    f"{MAX_PAGE_LIMIT:,}: "
                    "the maximum is used",
                    "expected_pages": math.ceil(aggregates / page_limit),
                    "requests_sequential": requests[1], "requests_auto": requests[0],
                    "wall_auto_s": round(walls[0], 2), "wall_sequential_s": round(walls[1], 2),
                    "sequential_floor_s": round(requests[1] * DEEP_LATENCY_MS / 1000, 1),
                    "auto_killed_at_timeout": killed[0], "cycle_auto": cycles[0],
                    "cycle_sequential": cycles[1]},
    }


# --- 2. end to end, and 7. features (over the same data) ---------------------------------


def e2e_universe(bench: Bench) -> tuple[tuple[str, ...], dt.date]:
    if bench.quick:
        return E2E_SYMBOLS[:4], years_before(LAST_DAY, 1)
    return E2E_SYMBOLS, years_before(LAST_DAY, 2)


def e2e_backfill(bench: Bench) -> dict[str, Any]:
    """The e2e backfill (once per benchmark run; figure 7 reads its database)."""
    if "e2e" in bench.cache:
        return bench.cache["e2e"]  # type: ignore[no-any-return]
    symbols, first = e2e_universe(bench)
    url = bench.database("e2e")
    with simulator_process(seed=SEED, log=bench.tmp / "e2e-sim.log") as sim:
        path, text = bench.config("e2e", sim, backfill_body(symbols, ["5m"], first, LAST_DAY))
        child = run_once(bench, path, url, "e2e")
    result = {"url": url, "config_path": path, "config": text, "wall": child.wall,
              "cycle": cycle_line(child), "bars": bar_count(url),
              "universe": f"{len(symbols)} symbols x 5m, {first} .. {LAST_DAY}"}
    bench.cache["e2e"] = result
    return result


def bare_copy(bench: Bench, source_url: str) -> tuple[float, int]:
    """Seconds to binary-COPY the rows of `bars` into a plain table with the same primary key
    (the rows read into memory first, untimed): what PostgreSQL ingests with no daemon."""
    with psycopg.connect(source_url) as conn:
        rows = conn.execute("SELECT symbol, timeframe, ts, open, high, low, close, volume, "
                            "vwap, trades FROM bars").fetchall()
    url = bench.database("bare_copy")
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE bare (symbol text NOT NULL, timeframe text NOT NULL, "
                     "ts timestamptz NOT NULL, open float8 NOT NULL, high float8 NOT NULL, "
                     "low float8 NOT NULL, close float8 NOT NULL, volume float8 NOT NULL, "
                     "vwap float8, trades int8, PRIMARY KEY (symbol, timeframe, ts))")
        conn.commit()
        started = time.perf_counter()
        with conn.cursor() as cur, cur.copy(
                "COPY bare (symbol, timeframe, ts, open, high, low, close, volume, vwap, "
                "trades) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["text", "text", "timestamptz", "float8", "float8", "float8",
                            "float8", "float8", "float8", "int8"])
            for r in rows:
                copy.write_row(r)
        conn.commit()
        seconds = time.perf_counter() - started
    return seconds, len(rows)


def fig_e2e(bench: Bench) -> dict[str, Any]:
    run = e2e_backfill(bench)
    copy_seconds, copied = bare_copy(bench, run["url"])
    copy_rate = copied / copy_seconds
    cycle = run["cycle"]
    cycle_rate = cycle["bars_written"] / cycle["cycle_seconds"] if cycle else None
    wall_rate = run["bars"] / run["wall"]
    bench.cache["writer_bars_per_s"] = cycle_rate or wall_rate
    return {
        "rows": [
            row("e2e bars/s (cycle, from the log line)", cycle_rate, copy_rate, unit="bars/s",
                ref_label="bare binary COPY", target=(">=", 0.60)),
            row("e2e bars/s (run --once wall)", wall_rate, copy_rate, unit="bars/s",
                ref_label="bare binary COPY", target=(">=", 0.60)),
        ],
        "command": "python -m daemon run --config C --once; reference: psycopg binary COPY "
                   "(set_types, write_row) of the same rows into a plain table, same PK",
        "simulator": "python -m daemon simulate (no latency, unlimited rate)",
        "config": run["config"],
        "details": {"universe": run["universe"], "bars": run["bars"],
                    "wall_s": round(run["wall"], 2), "cycle": cycle,
                    "copy_seconds": round(copy_seconds, 2), "copy_rows": copied,
                    "features": "always on (the daemon has no switch for them): the cycle "
                                "includes the features task's work that ran during it"},
    }


def fig_features(bench: Bench) -> dict[str, Any]:
    run = e2e_backfill(bench)
    with psycopg.connect(run["url"]) as conn:
        conn.execute("TRUNCATE features, features_progress")
    out = bench.tmp / "features.log"
    child = Child(["features", "rebuild", "--config", str(run["config_path"])],
                  daemon_env(run["url"]), out).reap()
    match = REBUILD_LINE.search(child.output())
    if child.returncode != 0 or match is None:
        raise RuntimeError(f"features rebuild exited {child.returncode}: {child.output()[-800:]}")
    series, rows_written, seconds = (float(g.replace(",", "")) for g in match.groups())
    rate = rows_written / seconds
    writer = bench.cache.get("writer_bars_per_s")
    if writer is None:
        cycle = run["cycle"]
        writer = cycle["bars_written"] / cycle["cycle_seconds"] if cycle else None
    latencies = trio.run(topup_latencies, run["url"])
    drain = (run["cycle"] or {}).get("after_cycle_s")
    return {
        "rows": [row("features rebuild rows/s (2 connections, the default)", rate, writer,
                     unit="rows/s",
                     ref_label="e2e writer bars/s", target=(">=", 1.0)),
                 row("top-up commit -> its features (median of series)",
                     statistics.median(latencies), unit="s", target=("<", 1.0),
                     on="measured"),
                 row("top-up commit -> its features (worst series)", max(latencies),
                     unit="s", target=("<", 1.0), on="measured"),
                 row("e2e: features still computing after the cycle", drain, unit="s")],
        "command": "python -m daemon features rebuild --config C (after TRUNCATE features, "
                   "features_progress: from scratch); then, per series, a top-up page (its "
                   "last bar revised, one new bar) through the real Writer and FeaturesTask "
                   "(coalesce 0.2 s, as the daemon runs it)",
        "config": run["config"],
        "details": {"series": int(series), "rows": int(rows_written),
                    "seconds": round(seconds, 2), "process_wall_s": round(child.wall, 2),
                    "data": run["universe"],
                    "topup_latency_s": [round(x, 3) for x in latencies],
                    "after_cycle_s_is": "from the e2e run's cycle line to its last log line: "
                                        "the features drain, then the shutdown"},
    }


async def topup_latencies(url: str) -> list[float]:
    """Per series of the database: the latency from a top-up page's commit to the end of the
    features pass that served it (FeaturesTask.statistics().last_latency_seconds)."""
    with psycopg.connect(url) as conn:
        tails = conn.execute(
            "SELECT DISTINCT ON (symbol, timeframe) symbol, timeframe, ts, open, high, low, "
            "close, volume FROM bars ORDER BY symbol, timeframe, ts DESC").fetchall()
    task = FeaturesTask(url)
    send, receive = open_writer_channel(4)
    writer = Writer(url, receive, on_commit=task.notify)
    out: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await nursery.start(task.run)
        for symbol, timeframe, ts, o, h, low, c, v in tails:
            t = db.to_ms(ts)
            step = parse_timeframe(timeframe).approx_ms
            bars = [Bar(t=t, o=o, h=h, l=low, c=c * 1.001, v=v),  # a revision
                    Bar(t=t + step, o=c, h=max(h, c), l=min(low, c), c=c, v=v)]  # a new bar
            receipt = Receipt()
            runs = task.statistics().runs
            await send.send(PageWrite(SeriesKey(symbol, timeframe),
                                      encode_copy_rows(bars, symbol, timeframe)[0],
                                      (t, t + step + 1), receipt))
            while receipt.pages_written == 0 or task.statistics().pending:  # noqa: ASYNC110 - statistics are a snapshot
                await trio.sleep(0.005)
            stats = task.statistics()
            assert stats.runs > runs and stats.last_latency_seconds is not None
            out.append(stats.last_latency_seconds)
        await send.aclose()
        nursery.cancel_scope.cancel()
    return out


# --- 3. peak RSS ----------------------------------------------------------------------------


def fig_rss(bench: Bench) -> dict[str, Any]:
    long_years, short_years = (1.0, 0.25) if bench.quick else (4.0, 1.0)
    symbols = ["SPY", "AAPL"]
    peaks: dict[float, int] = {}
    wait4: dict[float, int] = {}
    bars: dict[float, int] = {}
    configs: dict[str, str] = {}
    with simulator_process(seed=SEED, log=bench.tmp / "rss-sim.log") as sim:
        for years in (short_years, long_years):
            url = bench.database("rss")
            body = backfill_body(symbols, ["5m", "1h"], years_before(LAST_DAY, years), LAST_DAY)
            path, text = bench.config(f"rss-{years:g}y", sim, body)
            configs[f"{years:g} years"] = text
            child = run_once(bench, path, url, f"rss-{years:g}y")
            peaks[years], bars[years] = child.maxrss_bytes, bar_count(url)
            wait4[years] = child.wait4_maxrss_bytes
    long_mb, short_mb = peaks[long_years] / MIB, peaks[short_years] / MIB
    return {
        "rows": [
            row(f"peak RSS {long_years:g}y / {short_years:g}y", long_mb, short_mb, unit="MiB",
                ref_label=f"{short_years:g} year(s)", target=("<=", 1.10)),
            row(f"peak RSS {long_years:g}y (absolute)", long_mb, unit="MiB",
                target=("<", 150), on="measured"),
        ],
        "command": "python -m daemon run --config C --once; peak = the child's VmHWM "
                   "(/proc/PID/status, sampled every 20 ms); wait4's ru_maxrss beside it",
        "simulator": "python -m daemon simulate (no latency, unlimited rate)",
        "config": configs,
        "details": {"symbols": symbols, "timeframes": ["5m", "1h"],
                    "bars": {f"{k:g}y": v for k, v in bars.items()},
                    "peak_rss_mib": {f"{k:g}y": round(v / MIB, 1) for k, v in peaks.items()},
                    "wait4_ru_maxrss_mib": {f"{k:g}y": round(v / MIB, 1)
                                            for k, v in wait4.items()},
                    "wait4_note": "ru_maxrss includes the parent's pre-exec high-water mark "
                                  "(vfork): an upper bound only"},
    }


# --- 4. the demo ----------------------------------------------------------------------------

DEMO_TABLE = re.compile(r"^(requests|wall time|bars written|jobs|429s|retries)\s+(.+)$", re.M)


def fig_demo(bench: Bench) -> dict[str, Any]:
    from daemon.demo import DEMO_SYMBOLS, REAL_RATE_PER_MINUTE

    speed = 10.0
    symbols, days = (5, 180) if bench.quick else (len(DEMO_SYMBOLS), 730)
    state = bench.tmp / "demo"
    args = ["demo", "--symbols", str(symbols), "--days", str(days), "--speed", f"{speed:g}",
            "--state-dir", str(state)]
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    child = Child(args, env, bench.tmp / "demo.log").reap()
    with contextlib.suppress(Exception):  # the demo leaves its PostgreSQL up on purpose
        Child(["demo", "--stop", "--state-dir", str(state)], env, None).reap(60)
    text = child.output()
    fields = dict(DEMO_TABLE.findall(text))
    if child.returncode != 0 or "requests" not in fields:
        raise RuntimeError(f"demo exited {child.returncode}: {text[-800:]}")
    requests = int(fields["requests"].replace(",", ""))
    rate_per_s = REAL_RATE_PER_MINUTE * speed / 60
    bound = requests / rate_per_s
    own_wall = float(fields["wall time"].split()[0])
    return {
        "rows": [
            row("demo wall (process) / request bound", child.wall, bound, unit="s",
                ref_label="requests / rate", target=("<=", 1.15)),
            row("demo wall (its own, cycle only) / request bound", own_wall, bound, unit="s",
                ref_label="requests / rate", target=("<=", 1.15)),
        ],
        "command": "python -m daemon " + " ".join(a if a != str(state) else "TMP" for a in args),
        "details": {"requests": requests,
                    "rate": f"{REAL_RATE_PER_MINUTE} req/min x{speed:g} = "
                            f"{REAL_RATE_PER_MINUTE * speed:g} req/min ({rate_per_s:g}/s)",
                    "request_bound_s": round(bound, 1), "process_wall_s": round(child.wall, 1),
                    "demo_table": {k: v.strip() for k, v in fields.items()},
                    "how": "the demo runs 150 req/min with 2-4 s latency, compressed x10: "
                           "rate x10, latency /10 (daemon/demo.py)"},
    }


# --- 5. fixed costs -------------------------------------------------------------------------


def fig_fixed(bench: Bench) -> dict[str, Any]:
    env = child_env()
    Child(["--help"], env, None).reap(60)  # writes the bytecode cache a first start writes
    helps = [Child(["--help"], env, None).reap(60).wall for _ in range(5)]
    url = bench.database("fixed")
    first = LAST_DAY - dt.timedelta(days=29)
    with simulator_process(seed=SEED, log=bench.tmp / "fixed-sim.log") as sim:
        path, text = bench.config("fixed", sim, backfill_body(["SPY"], ["1d"], first, LAST_DAY))
        run_once(bench, path, url, "fixed-first")
        idles = [run_once(bench, path, url, f"fixed-idle-{i}").wall for i in range(3)]
        requests_idle = aggs_requests(sim)
    return {
        "rows": [
            row("python -m daemon --help (median of 5)", statistics.median(helps), unit="s",
                target=("<", 0.3), on="measured"),
            row("run --once, nothing to do (median of 3)", statistics.median(idles), unit="s",
                target=("<", 0.6), on="measured"),
        ],
        "command": "python -m daemon --help; python -m daemon run --config C --once after a "
                   "completed backfill of the same config",
        "config": text,
        "details": {"help_s": [round(x, 3) for x in helps],
                    "idle_run_s": [round(x, 3) for x in idles],
                    "aggs_requests_all_runs": requests_idle},
    }


# --- 6. status endpoints under load ---------------------------------------------------------


def fig_status(bench: Bench) -> dict[str, Any]:
    seconds = 5 if bench.quick else 10
    args = [sys.executable, str(ROOT / "scripts" / "loadtest.py"), "--clients", "50",
            "--seconds", str(seconds)]
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}  # its own server's
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    start = proc.stdout.find("{")
    if start < 0:
        raise RuntimeError(f"loadtest exited {proc.returncode}: {proc.stderr[-800:]}")
    result = json.loads(proc.stdout[start:])
    overall, health = result["latency"], result["per_endpoint"]["/healthz"]
    rows = [
        row("status p99, all endpoints", overall["p99_ms"], overall["p50_ms"], unit="ms",
            ref_label="p50", target=("<", 50), on="measured"),
        row("status p99, /healthz", health["p99_ms"], health["p50_ms"], unit="ms",
            ref_label="p50", target=("<", 50), on="measured"),
    ]
    return {
        "rows": rows,
        "command": " ".join(["python", *args[1:]]).replace(str(ROOT) + "/", ""),
        "details": {"requests": result["requests"], "errors": result["errors"],
                    "error_kinds": result["error_kinds"],
                    "requests_per_second": result["requests_per_second"],
                    "latency": overall, "per_endpoint": result["per_endpoint"],
                    "daemon_before": result.get("daemon_before"),
                    "daemon_after": result.get("daemon_after"),
                    "backfill": "loadtest.py's own: 25 demo symbols x 5 timeframes x 730 days, "
                                "1500 req/min, 200-400 ms latency"},
    }


# --- 8. scale-out ---------------------------------------------------------------------------


def fig_scaleout(bench: Bench) -> dict[str, Any]:
    symbols = E2E_SYMBOLS[:4] if bench.quick else E2E_SYMBOLS
    first = years_before(LAST_DAY, 0.25 if bench.quick else 1)
    rates: dict[int, float] = {}
    details: dict[str, Any] = {}
    with simulator_process(seed=SEED, log=bench.tmp / "scale-sim.log") as sim:
        body = backfill_body(symbols, ["5m"], first, LAST_DAY,
                             extra="[daemon]\nlease_seconds = 10\n")
        path, text = bench.config("scaleout", sim, body)
        for n in (1, 2, 3):
            url = bench.database("scaleout")
            before = aggs_requests(sim)
            children = [Child(["run", "--config", str(path), "--once"], daemon_env(url),
                              bench.tmp / f"scaleout-{n}-{i}.log") for i in range(n)]
            for child in children:
                child.reap()
            wall = max(c.ended or 0 for c in children) - children[0].started
            count = bar_count(url)
            rates[n] = count / wall
            details[f"{n}_instances"] = {
                "wall_s": round(wall, 2), "bars": count,
                "exit_codes": [c.returncode for c in children],
                "aggs_requests": aggs_requests(sim) - before,
                "peak_rss_mib": [round(c.maxrss_bytes / MIB, 1) for c in children]}
    single = details["1_instances"]["bars"]
    for n in (2, 3):
        details[f"{n}_instances"]["rows_equal_single"] = details[f"{n}_instances"]["bars"] == single
    return {
        "rows": [row(f"scale-out bars/s, {n} instance{'s' if n > 1 else ''}", rates[n], rates[1],
                     unit="bars/s", ref_label="1 instance") for n in (1, 2, 3)],
        "command": "N x python -m daemon run --config C --once, started together, one "
                   "database; wall from the first start to the last exit",
        "simulator": "python -m daemon simulate (no latency, unlimited rate)",
        "config": text,
        "note": "on 2 cores this shows the coordination overhead (leases, one shared budget), "
                "not a speed-up: the instances share the same two cores and one PostgreSQL",
        "details": {"universe": f"{len(symbols)} symbols x 5m, {first} .. {LAST_DAY}",
                    **details},
    }


# --- 9. decode + validate, the writer ------------------------------------------------------


def page_body() -> bytes:
    """A real 50,000-bar page from the simulator's generator, as the API would send it."""
    tf = parse_timeframe("1m")
    start = 1_704_171_600_000  # 2024-01-02 ET midnight
    bars = ground_truth(SEED, "X:BTCUSD", tf, start, start + 60 * 86_400_000)[:PAGE]
    return msgspec.json.encode({"status": "OK", "results": bars, "resultsCount": len(bars)})


def fig_decode(bench: Bench) -> dict[str, Any]:
    rounds = 3 if bench.quick else 10
    body = page_body()
    decoder = msgspec.json.Decoder(AggsResponse)
    decoded = decoder.decode(body)
    assert isinstance(decoded.results, list)
    lo, hi = decoded.results[0].t, decoded.results[-1].t

    def timed(fn: Callable[[], object]) -> float:
        started = time.perf_counter()
        for _ in range(rounds):
            fn()
        return (time.perf_counter() - started) / rounds

    decode_s = timed(lambda: decoder.decode(body))
    validate_s = timed(lambda: check_bars(decoded.results, lo, hi))  # type: ignore[arg-type]
    encode_s = timed(lambda: encode_copy_rows(decoded.results, "SPY", "5m"))  # type: ignore[arg-type]
    page_s = timed(lambda: decode_page(body, lo, hi, symbol="SPY", timeframe="5m"))
    writer = bench_writer(bench, body, 4 if bench.quick else 10)
    small = bench_small_pages(bench, 200 if bench.quick else 1000)
    return {
        "rows": [
            row("decode + validate one 50k-bar page", (decode_s + validate_s) * 1000, unit="ms"),
            row("decode_page (decode, validate, COPY-encode)", page_s * 1000, unit="ms"),
            row("writer rows/s, new rows", writer["new_rows_per_s"], unit="rows/s"),
            row("writer rows/s, all conflicting (top-up)", writer["conflicting_rows_per_s"],
                writer["new_rows_per_s"], unit="rows/s", ref_label="new rows"),
            row(f"writer ms a page, {small['pages']:,} new pages of {SMALL_PAGE} bars",
                small["new_ms_per_page"], unit="ms"),
            row("writer ms a page, the same pages again (upsert)", small["again_ms_per_page"],
                unit="ms"),
        ],
        "command": "in-process: msgspec typed decode + check_bars; daemon.bars.decode_page; "
                   "the Writer fed 50,000-bar pages (COPY -> stage -> insert/upsert + coverage), "
                   f"then {SMALL_PAGE}-bar pages (where round trips, not rows, set the pace)",
        "details": {"page_bytes": len(body), "rounds": rounds,
                    "decode_ms": round(decode_s * 1000, 1),
                    "validate_ms": round(validate_s * 1000, 1),
                    "encode_ms": round(encode_s * 1000, 1),
                    "decode_page_ms": round(page_s * 1000, 1),
                    "decode_validate_bars_per_s": round(PAGE / (decode_s + validate_s)),
                    "writer": writer, "small_pages": small},
    }


async def _write_pages(url: str, pages: list[PageWrite], series: SeriesKey, receipt: Receipt,
                       first: int, last: int) -> float:
    send, receive = open_writer_channel(4)
    writer = Writer(url, receive)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        started = time.perf_counter()
        async with send:
            for page in pages:
                await send.send(page)
            await send.send(JobFinished(series, FetchResult(first, last), receipt))
        await receipt.finished.wait()
        elapsed = time.perf_counter() - started
        nursery.cancel_scope.cancel()
    assert receipt.outcome is JobOutcome.OK, receipt.write_error
    return elapsed


def _write_twice(url: str, series: SeriesKey, encoded: list[CopyRows]) -> tuple[float, float]:
    """Seconds for the Writer to write `encoded` as one job's pages, new, then the same again
    (every row conflicting)."""
    first, last = encoded[0].first_t, encoded[-1].last_t

    def run(receipt: Receipt) -> float:
        writes = [PageWrite(series, rows, (rows.first_t, rows.last_t + 60_000), receipt)
                  for rows in encoded]
        return trio.run(_write_pages, url, writes, series, receipt, first, last)

    return run(Receipt()), run(Receipt())


SMALL_PAGE = 300


def bench_small_pages(bench: Bench, pages: int) -> dict[str, Any]:
    """The Writer fed many small pages of one series (a top-up's or a slow plan's size)."""
    url = bench.database("writer_small")
    db.apply_migrations(url)
    series = SeriesKey("SMALL", "1m")
    t0 = 1_704_067_200_000  # 2024-01-01
    encoded = [encode_copy_rows(
        [Bar(t=t0 + (p * SMALL_PAGE + i) * 60_000, o=10.0, h=11.0, l=9.0, c=10.5, v=100.0,
             vw=10.2, n=3) for i in range(SMALL_PAGE)], series.symbol, series.timeframe)[0]
        for p in range(pages)]
    new_s, again_s = _write_twice(url, series, encoded)
    return {"pages": pages, "bars_per_page": SMALL_PAGE,
            "new_ms_per_page": round(new_s * 1000 / pages, 2),
            "again_ms_per_page": round(again_s * 1000 / pages, 2)}


def bench_writer(bench: Bench, body: bytes, pages: int) -> dict[str, Any]:
    url = bench.database("writer")
    db.apply_migrations(url)
    bars = msgspec.json.decode(body, type=AggsResponse).results
    assert isinstance(bars, list)
    step = bars[-1].t - bars[0].t + 60_000
    series = SeriesKey("BENCH", "1m")
    encoded = [encode_copy_rows([msgspec.structs.replace(b, t=b.t + i * step) for b in bars],
                                series.symbol, series.timeframe)[0]
               for i in range(pages)]
    new_s, again_s = _write_twice(url, series, encoded)
    n = pages * PAGE
    return {"rows": n, "new_seconds": round(new_s, 2), "conflicting_seconds": round(again_s, 2),
            "new_rows_per_s": round(n / new_s), "conflicting_rows_per_s": round(n / again_s)}


# --- the run --------------------------------------------------------------------------------

FIGURES: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "deep": fig_deep,
    "e2e": fig_e2e,
    "rss": fig_rss,
    "demo": fig_demo,
    "fixed": fig_fixed,
    "status": fig_status,
    "features": fig_features,
    "scaleout": fig_scaleout,
    "decode": fig_decode,
}


def table(figures: dict[str, dict[str, Any]]) -> str:
    headers = ["figure", "measured", "reference", "ratio", "target", "met?"]
    lines: list[list[str]] = []
    for name, fig in figures.items():
        if "error" in fig:
            lines.append([f"{name}: NOT MEASURED ({fig['error'].splitlines()[0][:70]})",
                          "", "", "", "", ""])
            continue
        for r in fig["rows"]:
            unit = f" {r['unit']}" if r["unit"] else ""
            ref = "" if r["reference"] is None else f"{r['reference']:,}{unit}"
            if r["reference_is"] and ref:
                ref += f" ({r['reference_is']})"
            met = {True: "yes", False: "NO", None: "-"}[r["met"]]
            lines.append([r["figure"], f"{r['measured']:,}{unit}" if r["measured"] is not None
                          else "-", ref, "" if r["ratio"] is None else f"{r['ratio']:.3f}",
                          r["target"], met])
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(headers)]

    def fmt(cells: list[str]) -> str:
        return " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([fmt(headers), "-+-".join("-" * w for w in widths), *map(fmt, lines)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller universes and fewer rounds: a ~3-minute smoke run")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the JSON here")
    parser.add_argument("--keep-logs", type=Path, metavar="DIR",
                        help="copy every child's log and config here (they are removed with "
                             "the temporary directory otherwise)")
    parser.add_argument("--only", metavar="NAME[,NAME]",
                        help=f"run these figures only: {', '.join(FIGURES)}")
    args = parser.parse_args()
    chosen = list(FIGURES) if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in chosen if n not in FIGURES]
    if unknown:
        parser.error(f"unknown figure(s) {', '.join(unknown)}; known: {', '.join(FIGURES)}")
    setup_logging("ERROR")
    started = time.perf_counter()
    result: dict[str, Any] = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                              "mode": "quick" if args.quick else "full",
                              "load_average_at_start": load_average()}
    figures: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="backfilld-bench-") as tmp, embedded_postgres(
            Path(tmp) / "pg", delete_on_exit=True) as server:
        result["machine"] = machine(server)
        bench = Bench(server, Path(tmp), args.quick)
        for name in chosen:
            t = time.perf_counter()
            load = load_average()
            try:
                fig = FIGURES[name](bench)
            except Exception as exc:  # one figure failing must not lose the others
                fig = {"error": f"{type(exc).__name__}: {exc}"}
            fig["seconds"] = round(time.perf_counter() - t, 1)
            fig["load_average_before"] = load
            figures[name] = fig
            print(json.dumps({name: fig}, default=str), file=sys.stderr, flush=True)
        if args.keep_logs:
            args.keep_logs.mkdir(parents=True, exist_ok=True)
            for path in [*Path(tmp).glob("*.log"), *Path(tmp).glob("*.toml")]:
                shutil.copy(path, args.keep_logs / path.name)
    result["figures"] = figures
    result["load_average_at_end"] = load_average()
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    print(table(figures), file=sys.stderr)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
