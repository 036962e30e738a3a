"""`backfilld demo`: a complete backfill you can watch, with nothing to set up.

Embedded PostgreSQL + the simulator as a child process + the daemon in this process, running one
full cycle of 25 symbols x the 5 default timeframes x 2 years at 150 req/min with latencies of
2-4 s, all time-compressed (x10 by default) so it finishes in about a minute. The numbers at the
end are the ones a real backfill would show, divided by the compression factor.

The database is left running afterwards so the data can be looked at with the printed psql
line; `backfilld demo --stop` stops it.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import httpx
import psycopg
import trio
from psycopg import conninfo

from .app import serve
from .compose import Parts, build
from .config import parse_config
from .cycles import CycleSnapshot
from .embedded import embedded_postgres, psql_path, stop_embedded_postgres
from .log import setup_logging
from .report import format_table
from .simulator.process import simulator_process

__all__ = ["DEMO_SYMBOLS", "add_demo_arguments", "run_demo"]

# A mix that exercises the ticker syntax the API uses: `.` classes, `:` crypto and indices.
DEMO_SYMBOLS = (
    "AAPL", "MSFT", "NVDA", "AMZN", "GOOGL", "META", "TSLA", "BRK.A", "BRK.B", "JPM",
    "V", "UNH", "XOM", "JNJ", "WMT", "PG", "MA", "HD", "CVX", "KO",
    "X:BTCUSD", "X:ETHUSD", "I:SPX", "I:NDX", "SPY",
)
REAL_RATE_PER_MINUTE = 150
REAL_LATENCY_MS = (2000, 4000)
DEMO_DATABASE = "backfilld_demo"
DEFAULT_STATE_DIR = "~/.local/state/backfilld-demo"


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--symbols", type=int, default=len(DEMO_SYMBOLS),
                        help=f"how many symbols (1-{len(DEMO_SYMBOLS)}, default all)")
    parser.add_argument("--days", type=int, default=730, help="days of history (default 730)")
    parser.add_argument("--speed", type=float, default=10.0,
                        help="time compression: rate x speed, latency / speed (default 10)")
    parser.add_argument("--fault-rate", type=float, default=0.02,
                        help="share of simulator responses that fail (default 0.02)")
    parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR,
                        help="where the demo's embedded PostgreSQL lives")
    parser.add_argument("--stop", action="store_true",
                        help="stop the PostgreSQL a previous demo left running, then exit")


def _fresh_database(server_url: str) -> str:
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DEMO_DATABASE} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DEMO_DATABASE}")
    return conninfo.make_conninfo(server_url, dbname=DEMO_DATABASE)


def _demo_config(base_url: str, args: argparse.Namespace) -> str:
    symbols = ", ".join(f'"{s}"' for s in DEMO_SYMBOLS[: max(1, args.symbols)])
    speed = args.speed
    return f"""
[polygon]
base_url = "{base_url}"
api_key = "demo-key"
requests_per_minute = {REAL_RATE_PER_MINUTE * speed}
max_in_flight = 16
[backfill]
symbols = [{symbols}]
history_days = {args.days}
stagger_seconds = {0.5 / speed}
[retry]
min_seconds = {1.0 / speed}
max_seconds = {300.0 / speed}
[status]
listen = "127.0.0.1:0"
[logging]
level = "error"
"""


async def _progress(parts: Parts, total_jobs: int, started: float) -> None:
    tty = sys.stdout.isatty()
    every = 0.25 if tty else 5.0
    while True:
        await trio.sleep(every)
        snap = parts.snapshot()
        cycle = snap.scheduler.cycle
        done = cycle.jobs_done if cycle else 0
        line = (
            f"jobs {done}/{total_jobs}  bars {snap.writer.bars_written:,}  "
            f"requests {snap.api.total_requests:,}  429s {snap.api.rate_limited_count}  "
            f"queue {snap.writer.queue_depth}  circuit {snap.breaker.state.value}  "
            f"quarantined {snap.api.bars_quarantined}  {time.monotonic() - started:5.1f} s"
        )
        print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)


def run_demo(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir).expanduser()
    setup_logging("ERROR")
    if args.stop:
        stopped = stop_embedded_postgres(state_dir)
        print("stopped the demo database" if stopped else "no demo database was running")
        return 0
    state_dir.mkdir(parents=True, exist_ok=True)
    lo, hi = (int(ms / args.speed) for ms in REAL_LATENCY_MS)
    print(f"backfilld demo: {min(args.symbols, len(DEMO_SYMBOLS))} symbols x 5 timeframes x "
          f"{args.days} days at {REAL_RATE_PER_MINUTE} req/min, {REAL_LATENCY_MS[0] // 1000}-"
          f"{REAL_LATENCY_MS[1] // 1000} s latency, time-compressed x{args.speed:g}")
    with contextlib.ExitStack() as stack:
        try:
            base_url = stack.enter_context(simulator_process(
                requests_per_minute=REAL_RATE_PER_MINUTE * args.speed, latency_ms=f"{lo}-{hi}",
                fault_rate=args.fault_rate, seed=7, log=state_dir / "simulator.log"))
        except (RuntimeError, TimeoutError) as exc:
            raise SystemExit(f"backfilld demo: the simulator did not start: {exc}") from None
        server = stack.enter_context(embedded_postgres(state_dir, keep_running=True))
        db_url = _fresh_database(server)
        config = parse_config(_demo_config(base_url, args), source="<demo>")
        parts = build(config, db_url)
        total = len(config.backfill.symbols) * len(config.backfill.timeframes)
        started = time.monotonic()

        async def main() -> CycleSnapshot | None:
            result: CycleSnapshot | None = None
            progress = trio.CancelScope()

            async def run(task_status: trio.TaskStatus[int | None]) -> None:
                nonlocal result
                try:
                    result = await serve(parts, once=True, task_status=task_status)
                finally:
                    progress.cancel()

            async with trio.open_nursery() as nursery:
                port = await nursery.start(run)
                if port:
                    print(f"status endpoint: http://127.0.0.1:{port}/status "
                          f"(or: backfilld status --url http://127.0.0.1:{port})")
                with progress:
                    await _progress(parts, total, started)
            return result

        cycle = trio.run(main)
        wall = time.monotonic() - started
        sim_stats = httpx.get(f"{base_url}/__stats", timeout=5).json()
    print()
    _print_summary(parts, cycle, wall, args.speed, sim_stats, db_url)
    default_dir = Path(DEFAULT_STATE_DIR).expanduser()
    where = "" if state_dir == default_dir else f" --state-dir {state_dir}"
    print(f"stop the demo database:  backfilld demo --stop{where}")
    return 0 if cycle is not None and cycle.ok else 1


def _print_summary(
    parts: Parts,
    cycle: CycleSnapshot | None,
    wall: float,
    speed: float,
    sim_stats: dict[str, object],
    db_url: str,
) -> None:
    jobs = cycle.jobs if cycle else []
    failed = cycle.failed if cycle else []
    client = parts.client.statistics()
    bars = parts.writer.statistics().bars_written
    rows = [
        ("jobs", f"{len(jobs) - len(failed)} ok, {len(failed)} failed"),
        ("bars written", f"{bars:,}"),
        ("requests", f"{client.total_requests:,}"),
        ("429s", f"{client.rate_limited_count:,}"),
        ("retries", f"{client.retries:,}"),
        ("faults injected", f"{sim_stats.get('faults_total', '?')}"),
        ("circuit opened", f"{parts.breaker.statistics().opened_total}"),
        ("bars quarantined", f"{client.bars_quarantined:,}"),
        ("wall time", f"{wall:.1f} s (x{speed:g} compressed: {wall * speed / 60:.1f} min real)"),
        ("bars/s", f"{bars / wall:,.0f}"),
        ("requests/min", f"{client.total_requests / wall * 60:,.0f} "
                         f"({client.total_requests / wall * 60 / speed:,.0f} real)"),
    ]
    print(format_table(["demo", "result"], rows))
    for job in failed:
        print(f"  failed {job.symbol} {job.timeframe}: {job.error}")
    print("\nlook at the data:")
    print(f"  {psql_path()} '{db_url}' -c "
          "'SELECT symbol, timeframe, count(*), min(ts), max(ts) FROM bars GROUP BY 1, 2 "
          "ORDER BY 1, 2'")
