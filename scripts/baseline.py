#!/usr/bin/env python3
"""One backfill cycle against a target, timed: where does the time go? Prints one JSON object.

    python scripts/baseline.py                       # the simulator, embedded PostgreSQL
    python scripts/baseline.py --symbols 10 --days 90 --latency-ms 200-400 --rpm 1500
    python scripts/baseline.py --base-url https://api.massive.com --api-key-env POLYGON_API_KEY \\
        --database-url postgresql://... --symbol-list AAPL,MSFT --days 30

The daemon runs in this process (writer, scheduler, client, exactly as `backfilld run --once`),
so its parts can be timed from inside:

- total: the cycle's wall time.
- db: the single writer's busy time (the sum of its transactions: it writes one at a time).
- compute: CPU time of the event-loop thread during the cycle (decoding, validating, HTTP,
  bookkeeping: everything that is neither waiting nor the writer's thread).
- api: the rest, `total - db - compute`: time spent waiting on the API (latency, tokens,
  backoff). The writer's thread and the event loop can overlap on two cores, so this is a lower
  bound.

Each share is that part over total, i.e. how busy that stage was. The verdict names the
bottleneck: "api" when api > 60 %, "db" when db > 60 %, else "balanced".

Give `--database-url` an empty database (a full backfill is what is measured), or let the
script start an embedded PostgreSQL in a temporary directory, removed afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import trio
from psycopg import conninfo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon.app import serve  # noqa: E402
from daemon.compose import Parts, build  # noqa: E402
from daemon.config import parse_config  # noqa: E402
from daemon.cycles import CycleSnapshot  # noqa: E402
from daemon.demo import DEMO_SYMBOLS  # noqa: E402
from daemon.embedded import embedded_postgres  # noqa: E402
from daemon.log import setup_logging  # noqa: E402
from daemon.simulator.process import simulator_process  # noqa: E402

BOTTLENECK_SHARE = 0.60
DATABASE = "backfilld_baseline"


def simulator(args: argparse.Namespace) -> contextlib.AbstractContextManager[str]:
    """The simulator as a child process; yields its base URL."""
    return simulator_process(requests_per_minute=args.sim_rpm, latency_ms=args.latency_ms,
                             fault_rate=args.fault_rate, seed=args.seed)


@contextlib.contextmanager
def database(args: argparse.Namespace) -> Iterator[str]:
    if args.database_url:
        yield args.database_url
        return
    with tempfile.TemporaryDirectory() as tmp, embedded_postgres(
            Path(tmp), delete_on_exit=True) as server:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")
        yield conninfo.make_conninfo(server, dbname=DATABASE)


def config_text(args: argparse.Namespace, base_url: str, api_key: str) -> str:
    symbols = args.symbol_list.split(",") if args.symbol_list else DEMO_SYMBOLS[: args.symbols]
    names = ", ".join(f'"{s.strip()}"' for s in symbols)
    timeframes = ", ".join(f'"{t.strip()}"' for t in args.timeframes.split(","))
    return (
        f'[polygon]\nbase_url = "{base_url}"\napi_key = "{api_key}"\n'
        f"requests_per_minute = {args.rpm}\nmax_in_flight = {args.max_in_flight}\n"
        f"page_limit = {args.page_limit}\n"
        f"[backfill]\nsymbols = [{names}]\ntimeframes = [{timeframes}]\n"
        f"history_days = {args.days}\nstagger_seconds = 0.05\n"
        '[retry]\nmin_seconds = 0.1\nmax_seconds = 10\n'
        '[status]\nlisten = "127.0.0.1:0"\n[daemon]\ninstance = "baseline"\n'
    )


async def run_cycle(parts: Parts) -> tuple[CycleSnapshot | None, float]:
    """Run one cycle; return it and the event loop's CPU seconds during it."""
    cpu_at_start = time.thread_time()

    async def note_start() -> None:
        nonlocal cpu_at_start
        # 1 ms polling of the snapshot is precise enough for CPU accounting.
        while parts.snapshot().scheduler.cycle is None:  # noqa: ASYNC110
            await trio.sleep(0.001)
        cpu_at_start = time.thread_time()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(note_start)
        cycle = await serve(parts, once=True)
        nursery.cancel_scope.cancel()
    return cycle, time.thread_time() - cpu_at_start


def measure(cycle: CycleSnapshot, cpu: float) -> dict[str, object]:
    assert cycle.finished is not None
    total = cycle.finished - cycle.started
    db = sum(j.db_seconds for j in cycle.jobs)
    compute = min(cpu, total)
    api = max(0.0, total - db - compute)
    shares = {k: (v / total if total > 0 else 0.0) for k, v in
              (("api", api), ("db", db), ("compute", compute))}
    if shares["api"] > BOTTLENECK_SHARE:
        verdict = "api"
    elif shares["db"] > BOTTLENECK_SHARE:
        verdict = "db"
    else:
        verdict = "balanced"
    bars = sum(j.bars_written for j in cycle.jobs)
    return {
        "total_seconds": round(total, 3),
        "api_seconds": round(api, 3),
        "db_seconds": round(db, 3),
        "compute_seconds": round(compute, 3),
        "api_share": round(shares["api"], 3),
        "db_share": round(shares["db"], 3),
        "compute_share": round(shares["compute"], 3),
        "bottleneck": verdict,
        "requests": cycle.requests,
        "rate_limited": cycle.rate_limited,
        "retries": cycle.retries,
        "requests_per_minute": round(cycle.requests / total * 60, 1) if total else 0.0,
        "api_request_seconds_sum": round(sum(j.api_seconds for j in cycle.jobs), 3),
        "pages": sum(j.pages_written for j in cycle.jobs),
        "bars": bars,
        "bars_per_second": round(bars / total, 1) if total else 0.0,
        "jobs": len(cycle.jobs),
        "jobs_failed": len(cycle.failed),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_argument_group("target (default: the simulator, started here)")
    target.add_argument("--base-url", help="a real API instead of the simulator")
    target.add_argument("--api-key-env", default="POLYGON_API_KEY",
                        help="environment variable holding the key for --base-url")
    target.add_argument("--latency-ms", default="50-150", help="simulator latency (A-B)")
    target.add_argument("--sim-rpm", type=float, default=0,
                        help="simulator's own rate limit, 0 = none (default)")
    target.add_argument("--fault-rate", type=float, default=0.0, help="simulator faults")
    target.add_argument("--seed", type=int, default=7)
    work = parser.add_argument_group("work")
    work.add_argument("--symbols", type=int, default=5, help="first N demo symbols (default 5)")
    work.add_argument("--symbol-list", help="comma-separated tickers instead of --symbols")
    work.add_argument("--timeframes", default="1d,4h,1h,15m,5m")
    work.add_argument("--days", type=int, default=60, help="days of history (default 60)")
    work.add_argument("--rpm", type=float, default=0,
                      help="the daemon's requests_per_minute, 0 = unlimited (default)")
    work.add_argument("--max-in-flight", type=int, default=16)
    work.add_argument("--page-limit", type=int, default=50_000)
    parser.add_argument("--database-url", help="an empty, reachable database (default: an "
                        "embedded PostgreSQL in a temporary directory)")
    args = parser.parse_args()
    setup_logging("ERROR")
    with contextlib.ExitStack() as stack:
        if args.base_url:
            base_url, api_key = args.base_url, os.environ.get(args.api_key_env, "")
            if not api_key:
                raise SystemExit(f"baseline: ${args.api_key_env} is not set")
        else:
            base_url, api_key = stack.enter_context(simulator(args)), "baseline-key"
        url = stack.enter_context(database(args))
        config = parse_config(config_text(args, base_url, api_key), source="<baseline>", env={})
        cycle, cpu = trio.run(run_cycle, build(config, url))
    if cycle is None:
        raise SystemExit("baseline: the cycle did not complete")
    result = {"target": "simulator" if not args.base_url else args.base_url,
              "symbols": len(config.backfill.symbols),
              "timeframes": [t.label for t in config.backfill.timeframes], "days": args.days,
              **measure(cycle, cpu)}
    print(json.dumps(result, indent=2))
    return 0 if cycle.ok else 1


if __name__ == "__main__":
    sys.exit(main())
