#!/usr/bin/env python3
"""Speed targets, measured: prints numbers, asserts nothing, runs in about a minute.

    python scripts/benchmark.py [--quick]

1. decode + validate one 50,000-bar page (msgspec typed decode, then validate_bars);
2. the writer: 50,000-bar pages through COPY -> stage -> upsert + checkpoint, new rows and
   all-conflicting rows (a top-up rewriting what is there);
3. rate-boundness: a real backfill (daemon in-process, simulator as a child process with
   latency) at a given request budget: achieved requests/min against the budget. A rate-bound
   daemon reaches >= 90 % of it; a latency-bound one (too few requests in flight) does not.

Uses an embedded PostgreSQL in a temporary directory; nothing is left behind.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import psycopg
import trio
from psycopg import conninfo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon import db  # noqa: E402
from daemon.app import serve  # noqa: E402
from daemon.bars import AggsResponse, check_bars  # noqa: E402
from daemon.compose import build  # noqa: E402
from daemon.config import parse_config  # noqa: E402
from daemon.embedded import embedded_postgres  # noqa: E402
from daemon.jobs import FetchResult, JobOutcome, Receipt, SeriesKey  # noqa: E402
from daemon.log import setup_logging  # noqa: E402
from daemon.simulator.data import ground_truth  # noqa: E402
from daemon.simulator.process import simulator_process  # noqa: E402
from daemon.timeframes import parse_timeframe  # noqa: E402
from daemon.writer import JobFinished, PageWrite, Writer, open_writer_channel  # noqa: E402

PAGE = 50_000


def page_body() -> tuple[bytes, int, int]:
    """A real 50,000-bar page from the simulator's generator, as the API would send it."""
    tf = parse_timeframe("1m")
    start = 1_704_171_600_000  # 2024-01-02 ET midnight
    bars = ground_truth(7, "X:BTCUSD", tf, start, start + 60 * 86_400_000)[:PAGE]
    body = msgspec.json.encode({"status": "OK", "results": bars, "resultsCount": len(bars)})
    return body, bars[0]["t"], bars[-1]["t"]


def bench_decode(rounds: int) -> dict[str, float]:
    body, lo, hi = page_body()
    decoder = msgspec.json.Decoder(AggsResponse)
    t = time.perf_counter()
    for _ in range(rounds):
        decoded = decoder.decode(body)
    decode_s = (time.perf_counter() - t) / rounds
    assert isinstance(decoded.results, list)
    t = time.perf_counter()
    for _ in range(rounds):
        check_bars(decoded.results, lo, hi)
    validate_s = (time.perf_counter() - t) / rounds
    return {
        "page_bytes": len(body),
        "decode_ms": round(decode_s * 1000, 1),
        "validate_ms": round(validate_s * 1000, 1),
        "bars_per_s": round(PAGE / (decode_s + validate_s)),
    }


async def _write_pages(url: str, pages: list[list]) -> float:
    send, receive = open_writer_channel(4)
    writer = Writer(url, receive)
    series, receipt = SeriesKey("BENCH", "1m"), Receipt()
    first, last = pages[0][0].t, pages[-1][-1].t
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        t = time.perf_counter()
        async with send:
            for bars in pages:
                await send.send(PageWrite(series, bars, first, receipt))
            await send.send(JobFinished(series, FetchResult(first, last), receipt))
        await receipt.finished.wait()
        elapsed = time.perf_counter() - t
    assert receipt.outcome is JobOutcome.OK, receipt.write_error
    return elapsed


def bench_writer(server_url: str, pages: int) -> dict[str, float]:
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS bench WITH (FORCE)")
        conn.execute("CREATE DATABASE bench")
    url = conninfo.make_conninfo(server_url, dbname="bench")
    db.apply_migrations(url)
    body, _, _ = page_body()
    bars = msgspec.json.decode(body, type=AggsResponse).results
    assert isinstance(bars, list)
    step = bars[-1].t - bars[0].t + 60_000
    batches = [
        [msgspec.structs.replace(b, t=b.t + i * step) for b in bars] for i in range(pages)
    ]
    new_s = trio.run(_write_pages, url, batches)
    again_s = trio.run(_write_pages, url, batches)
    n = pages * PAGE
    return {
        "rows": n,
        "new_rows_per_s": round(n / new_s),
        "conflicting_rows_per_s": round(n / again_s),
    }


def bench_rate(server_url: str, rpm: float, latency_ms: str, symbols: int, seconds: int
               ) -> dict[str, float]:
    """Run the daemon against the simulator for `seconds`; how much of the budget was used."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS bench_rate WITH (FORCE)")
        conn.execute("CREATE DATABASE bench_rate")
    url = conninfo.make_conninfo(server_url, dbname="bench_rate")
    with simulator_process(requests_per_minute=rpm, latency_ms=latency_ms, seed=3) as base_url:
        names = ", ".join(f'"S{i}"' for i in range(symbols))
        config = parse_config(
            f'[polygon]\nbase_url = "{base_url}"\napi_key = "k"\n'
            f"requests_per_minute = {rpm}\n"
            f"[backfill]\nsymbols = [{names}]\nhistory_days = 730\nstagger_seconds = 0.05\n"
            "[retry]\nmin_seconds = 0.1\nmax_seconds = 5\n"
            '[status]\nlisten = "127.0.0.1:0"\n',
            env={},
        )
        parts = build(config, url)

        async def main() -> float:
            with trio.move_on_after(seconds):
                await serve(parts, once=True)
            return time.perf_counter()

        t = time.perf_counter()
        end = trio.run(main)
        elapsed = end - t
    stats = parts.client.statistics()
    achieved = stats.total_requests / elapsed * 60
    return {
        "budget_rpm": rpm,
        "latency_ms": latency_ms,
        "seconds": round(elapsed, 1),
        "requests": stats.total_requests,
        "achieved_rpm": round(achieved),
        "budget_used_pct": round(100 * achieved / rpm, 1),
        "rate_limited": stats.rate_limited_count,
        "bars_written": parts.writer.statistics().bars_written,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (about 20 s)")
    args = parser.parse_args()
    setup_logging("ERROR")
    results: dict[str, object] = {"date": dt.date.today().isoformat()}
    results["decode_validate_50k"] = bench_decode(3 if args.quick else 10)
    print(json.dumps({"decode_validate_50k": results["decode_validate_50k"]}), flush=True)
    with tempfile.TemporaryDirectory() as tmp, embedded_postgres(Path(tmp), delete_on_exit=True
                                                                 ) as server:
        results["writer"] = bench_writer(server, 4 if args.quick else 10)
        print(json.dumps({"writer": results["writer"]}), flush=True)
        # 150 req/min with 2-4 s latency, x10 compressed: 1500 req/min, 200-400 ms.
        results["rate_bound"] = bench_rate(server, 1500, "200-400", 6, 15 if args.quick else 30)
        print(json.dumps({"rate_bound": results["rate_bound"]}), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
