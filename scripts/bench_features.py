#!/usr/bin/env python3
"""Features speed, measured: prints numbers and a JSON summary, asserts nothing.

    python scripts/bench_features.py [--bars 1000000] [--top-ups 20] [--json PATH]

1. backfill: `--bars` 5m bars of four crypto pairs (the simulator's ground truth) through the
   real Writer in 10,000-bar pages (a 5m page of 50,000 base aggregates), each page's
   transaction marking its series dirty, a FeaturesTask notified after each commit: the wiring
   the composition root will have. Writer bars/s, features/s over the same span, and how long
   features trailed the last commit.
2. rebuild: the same bars from scratch, series by series (features.rebuild), into an empty
   features table, again over correct features (nothing written), and with two connections
   (`jobs=2`): features/s.
3. top-ups: a few new bars (plus the 3 re-sent overlap bars, as a top-up cycle sends them)
   committed for one series at a time: latency from the commit to its features being computed
   (the task's coalescing included), and the computation alone, against the 2-3 s per symbol of
   the system this replaces.
4. profile: EXPLAIN ANALYZE of one CHUNK_BARS statement: where the time goes, per plan node.

Uses an embedded PostgreSQL in a temporary directory; nothing is left behind.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import psycopg
import trio
from psycopg import conninfo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon import db, features  # noqa: E402
from daemon.bars import Bar  # noqa: E402
from daemon.embedded import embedded_postgres  # noqa: E402
from daemon.features import FeaturesTask, mark_dirty  # noqa: E402
from daemon.log import setup_logging  # noqa: E402
from daemon.market_calendar import et_midnight_ms  # noqa: E402
from daemon.simulator.data import bars_between  # noqa: E402
from daemon.timeframes import parse_timeframe  # noqa: E402
from daemon.writer import JobDone, JobState, PageWrite, Writer, open_writer_channel  # noqa: E402

SYMBOLS = ["X:BTCUSD", "X:ETHUSD", "X:SOLUSD", "X:ADAUSD"]
TIMEFRAME = "5m"
PAGE_BARS = 10_000
START_MS = et_midnight_ms(dt.date(2021, 1, 4))
HELD_BACK = 400  # bars per series kept for the top-ups
WAIT_SECONDS = 600.0
OVERLAP = 3  # [backfill] overlap_bars: a top-up re-sends the newest bars it already has


@attrs.frozen
class MarkedPage:
    """A PageWrite whose transaction also marks its series dirty: what the writer will do."""

    page: PageWrite

    @property
    def job(self) -> JobState:
        return self.page.job

    def apply(self, cur: psycopg.Cursor, writer: Writer) -> None:
        self.page.apply(cur, writer)
        mark_dirty(cur, [(self.job.symbol, self.job.timeframe, self.page.bars[0].t)])

    def committed(self, writer: Writer, seconds: float) -> None:
        self.page.committed(writer, seconds)


def series_bars(symbol: str, count: int) -> list[Bar]:
    tf = parse_timeframe(TIMEFRAME)
    days = count // 280 + 10  # a crypto pair has ~288 5m bars a day
    out: list[Bar] = []
    for b in bars_between(5, symbol, tf, START_MS, START_MS + days * 86_400_000):
        out.append(Bar(t=int(b["t"]), o=float(b["o"]), h=float(b["h"]), l=float(b["l"]),
                       c=float(b["c"]), v=float(b["v"]), vw=b.get("vw"),
                       n=int(b["n"]) if "n" in b else None))
        if len(out) == count:
            break
    return out


async def _wait(condition: Callable[[], bool]) -> None:
    """Poll the task's statistics: a snapshot is all a part exposes, there is no event."""
    with trio.fail_after(WAIT_SECONDS):
        while not condition():  # noqa: ASYNC110 - see above
            await trio.sleep(0.005)


async def backfill_and_top_ups(url: str, data: dict[str, list[Bar]], backfill_bars: int,
                               top_ups: int) -> dict[str, object]:
    task = FeaturesTask(url)
    send, receive = open_writer_channel(8)
    writer = Writer(url, receive, on_commit=lambda bars, seconds: task.notify())
    jobs = {s: JobState(s, TIMEFRAME, data[s][0].t, data[s][-1].t) for s in data}
    per_series = backfill_bars // len(data)
    pages = [(s, data[s][i:min(i + PAGE_BARS, per_series)])
             for i in range(0, per_series, PAGE_BARS) for s in data]  # series interleaved
    out: dict[str, object] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await nursery.start(task.run)
        await _wait(lambda: task.statistics().runs >= 1)
        started = time.perf_counter()
        for symbol, bars in pages:
            await send.send(MarkedPage(PageWrite(jobs[symbol], bars)))
        for job in jobs.values():
            await send.send(JobDone(job))
        for job in jobs.values():
            await job.done.wait()
        written = time.perf_counter()
        await _wait(lambda: task.statistics().pending == 0)
        done = time.perf_counter()
        stats = task.statistics()
        out["backfill"] = {
            "bars": backfill_bars,
            "pages": len(pages),
            "writer_seconds": round(written - started, 2),
            "writer_bars_per_s": round(backfill_bars / (written - started)),
            "features_seconds": round(done - started, 2),
            "features_per_s": round(backfill_bars / (done - started)),
            "features_behind_last_commit_s": round(done - written, 3),
            "feature_passes": stats.runs - 1,
            "feature_rows_written": stats.rows_written,
        }
        print(json.dumps({"backfill": out["backfill"]}), flush=True)

        latencies, computes = [], []
        for i in range(top_ups):
            symbol = SYMBOLS[i % len(data)]
            k = per_series + (i // len(data)) * 3
            bars = data[symbol][k - OVERLAP:k + 3]
            runs = task.statistics().runs
            await send.send(MarkedPage(PageWrite(jobs[symbol], bars)))
            await _wait(lambda: task.statistics().runs > runs  # noqa: B023 - awaited here
                        and task.statistics().pending == 0)
            stats = task.statistics()
            assert stats.last_latency_seconds is not None and stats.last_run_seconds is not None
            latencies.append(stats.last_latency_seconds)
            computes.append(stats.last_run_seconds)
            await trio.sleep(0.3)  # one top-up at a time: each is its own pass
        await send.aclose()
        nursery.cancel_scope.cancel()
    out["top_ups"] = {
        "count": top_ups,
        "bars_each": f"{OVERLAP} re-sent + 3 new",
        "coalesce_seconds": 0.2,
        "commit_to_features_ms_median": round(1000 * statistics.median(latencies), 1),
        "commit_to_features_ms_max": round(1000 * max(latencies), 1),
        "computation_ms_per_symbol_median": round(1000 * statistics.median(computes), 1),
        "computation_ms_per_symbol_max": round(1000 * max(computes), 1),
        "replaced_system_ms_per_symbol": "2000-3000",
    }
    print(json.dumps({"top_ups": out["top_ups"]}), flush=True)
    return out


def bench_rebuild(url: str, bars: int) -> dict[str, object]:
    """From scratch into an empty table (the first computation, alone on the machine), then
    again over features that are all right already (computed, compared, nothing written)."""
    result: dict[str, object] = {}
    for name, jobs in (("empty_table", 1), ("nothing_changed", 1), ("empty_table_2_jobs", 2)):
        if name.startswith("empty"):
            with psycopg.connect(url) as conn:
                conn.execute("TRUNCATE features, features_progress")
        started = time.perf_counter()
        rows = features.rebuild(url, jobs=jobs)
        seconds = time.perf_counter() - started
        result[name] = {"bars": bars, "rows_written": rows, "seconds": round(seconds, 2),
                        "features_per_s": round(bars / seconds)}
    print(json.dumps({"rebuild": result}), flush=True)
    return result


def profile(url: str, symbol: str) -> dict[str, object]:
    """EXPLAIN ANALYZE of one chunk's first computation (rolled back), node by node."""
    with psycopg.connect(url) as conn:
        params = {"symbol": symbol, "timeframe": TIMEFRAME, "from": features._BEGINNING,
                  "lookback": features._BEGINNING, "alpha": features.EMA_ALPHA,
                  "fresh_after": features._BEGINNING}
        end = conn.execute("SELECT ts FROM bars WHERE symbol = %s AND timeframe = %s ORDER BY ts"
                           " OFFSET %s LIMIT 1", (symbol, TIMEFRAME, features.CHUNK_BARS)
                           ).fetchone()
        params["to"] = end[0] if end else features._END
        plan = [r[0] for r in conn.execute("EXPLAIN (ANALYZE, COSTS OFF) " + features._APPEND,
                                           params).fetchall()]
        conn.rollback()
    nodes = [line.strip() for line in plan
             if ("WindowAgg" in line or "Insert" in line or "Execution Time" in line
                 or "Subquery Scan" in line or "Append" in line)]
    for line in nodes:
        print("  " + line)
    return {"chunk_bars": features.CHUNK_BARS, "nodes": nodes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bars", type=int, default=1_000_000, help="bars in the backfill")
    parser.add_argument("--top-ups", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args()
    setup_logging("ERROR")
    per_series = args.bars // len(SYMBOLS)
    t = time.perf_counter()
    data = {s: series_bars(s, per_series + HELD_BACK) for s in SYMBOLS}
    print(f"generated {sum(map(len, data.values())):,} bars in {time.perf_counter() - t:.1f} s",
          flush=True)
    results: dict[str, object] = {"date": dt.date.today().isoformat(), "timeframe": TIMEFRAME,
                                  "symbols": SYMBOLS}
    with tempfile.TemporaryDirectory() as tmp, embedded_postgres(Path(tmp), delete_on_exit=True
                                                                 ) as server:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute("CREATE DATABASE bench_features")
        url = conninfo.make_conninfo(server, dbname="bench_features")
        db.apply_migrations(url)
        results.update(trio.run(backfill_and_top_ups, url, data, per_series * len(SYMBOLS),
                                args.top_ups))
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT count(*) FROM bars").fetchone()
            conn.execute("TRUNCATE features, features_progress")
        results["profile"] = profile(url, SYMBOLS[0])  # a first computation: empty table
        results["rebuild"] = bench_rebuild(url, int(row[0]) if row else 0)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
