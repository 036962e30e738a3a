#!/usr/bin/env python3
"""N concurrent clients against the status endpoints for T seconds, during a backfill.

    python scripts/loadtest.py                        # starts its own backfill, 50 clients, 10 s
    python scripts/loadtest.py --clients 50 --seconds 30 --interval 0
    python scripts/loadtest.py --url http://127.0.0.1:8080   # a daemon already running

Without --url the script starts everything a backfill needs: an embedded PostgreSQL in a
temporary directory, the simulator (150 req/min and 2-4 s latency, compressed x10 like the
demo) and `backfilld run` as a child process with its status endpoint on a free port, and waits
for /readyz. It checks the daemon was backfilling before and after the load (a load test on an
idle daemon proves little), then stops everything.

Each client holds one keep-alive connection and walks the endpoints in turn, pausing about
`--interval` seconds between requests (uniformly 0.5-1.5x, and starting at a random point of
the first interval, so 50 clients do not fire in lockstep like no 50 dashboards would); 0 sends
as fast as answers come: a saturation test. Latency
is from the first byte sent to the last byte of the response. An error is anything but a
complete 200 (the database-backed endpoints answer 503 when the database is down, which
counts), a connection failure, or no answer within --timeout.

Prints one JSON object: requests, errors (by kind), requests/s, p50/p95/p99/max latency in ms,
overall and per endpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import httpx
import psycopg
import trio
from psycopg import conninfo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon.demo import DEMO_SYMBOLS  # noqa: E402
from daemon.embedded import embedded_postgres  # noqa: E402
from daemon.simulator.process import free_port, simulator_process  # noqa: E402

PATHS = (
    "/healthz",
    "/readyz",
    "/status",
    "/metrics",
    "/api/v1/admin/scheduler-health",
    "/api/v1/admin/features/staleness",
    "/api/v1/admin/scheduler/execution-history?limit=20",
)
START_SECONDS = 30.0
RECEIVE = 65536


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), math.ceil(q / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


def summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "count": len(ordered),
        "p50_ms": round(percentile(ordered, 50) * 1000, 2),
        "p95_ms": round(percentile(ordered, 95) * 1000, 2),
        "p99_ms": round(percentile(ordered, 99) * 1000, 2),
        "max_ms": round((ordered[-1] if ordered else 0.0) * 1000, 2),
    }


class _Failed(Exception):
    pass


async def _read_response(stream: trio.SocketStream, buffer: bytearray) -> int:
    """Read one Content-Length-framed response off `stream`; return its status code."""
    while b"\r\n\r\n" not in buffer:
        chunk = await stream.receive_some(RECEIVE)
        if not chunk:
            raise _Failed("closed")
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = await stream.receive_some(RECEIVE)
        if not chunk:
            raise _Failed("closed")
        rest += chunk
    buffer[:] = rest[length:]
    return status


async def client(host: str, port: int, index: int, deadline: float, interval: float,
                 request_timeout: float, results: dict[str, list[float]], errors: dict[str, int]
                 ) -> None:
    """One keep-alive connection, walking the endpoints until the deadline."""
    stream: trio.SocketStream | None = None
    buffer = bytearray()
    turn = index
    if interval > 0:
        await trio.sleep(random.uniform(0, interval))
    while trio.current_time() < deadline:
        path = PATHS[turn % len(PATHS)]
        turn += 1
        request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        started = trio.current_time()
        try:
            with trio.fail_after(request_timeout):
                if stream is None:
                    stream = await trio.open_tcp_stream(host, port)
                    buffer.clear()
                await stream.send_all(request)
                status = await _read_response(stream, buffer)
            if status != 200:
                raise _Failed(f"HTTP {status}")
            results[path].append(trio.current_time() - started)
        except (trio.TooSlowError, OSError, trio.BrokenResourceError, _Failed, ValueError,
                IndexError) as exc:
            kind = str(exc) if isinstance(exc, _Failed) else type(exc).__name__
            errors[kind] = errors.get(kind, 0) + 1
            if stream is not None:
                with contextlib.suppress(Exception):
                    await stream.aclose()
            stream = None
        if interval > 0:
            await trio.sleep(interval * random.uniform(0.5, 1.5))
    if stream is not None:
        await stream.aclose()


async def load(url: str, clients: int, seconds: float, interval: float,
               request_timeout: float) -> dict[str, object]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    results: dict[str, list[float]] = {p: [] for p in PATHS}
    errors: dict[str, int] = {}
    deadline = trio.current_time() + seconds
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for i in range(clients):
            nursery.start_soon(client, host, port, i, deadline, interval, request_timeout,
                               results, errors)
    elapsed = time.monotonic() - started
    everything = [t for ts in results.values() for t in ts]
    total = len(everything) + sum(errors.values())
    return {
        "clients": clients,
        "seconds": round(elapsed, 2),
        "interval_seconds": interval,
        "requests": total,
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "requests_per_second": round(total / elapsed, 1),
        "latency": summary(everything),
        "per_endpoint": {p: summary(ts) for p, ts in results.items()},
    }


# --- a backfill to load, when no --url is given ----------------------------------------------


def _wait_until(check: object, what: str, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise SystemExit(f"loadtest: a child exited ({proc.args}) before {what}")
        with contextlib.suppress(Exception):
            if check():  # type: ignore[operator]
                return
        time.sleep(0.1)
    raise SystemExit(f"loadtest: timed out waiting for {what}")


@contextlib.contextmanager
def backfill(args: argparse.Namespace) -> Iterator[str]:
    """Embedded PostgreSQL + simulator + `backfilld run`; yields the status URL."""
    with tempfile.TemporaryDirectory() as tmp, embedded_postgres(
            Path(tmp), delete_on_exit=True) as server:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute("CREATE DATABASE loadtest")
        db_url = conninfo.make_conninfo(server, dbname="loadtest")
        status_port = free_port()
        sim = simulator_process(requests_per_minute=args.rpm, latency_ms=args.latency_ms,
                                seed=7, log=Path(tmp) / "simulator.log")
        with sim as sim_url, open(Path(tmp) / "daemon.log", "wb") as log:
            yield from _daemon(args, tmp, db_url, sim_url, status_port, log)


def _daemon(args: argparse.Namespace, tmp: str, db_url: str, sim_url: str, status_port: int,
            log: BinaryIO) -> Iterator[str]:
    """`backfilld run` against the simulator; yields its status URL, then stops it."""
    names = ", ".join(f'"{s}"' for s in DEMO_SYMBOLS[: args.symbols])
    config = Path(tmp) / "config.toml"
    config.write_text(
        f'[polygon]\nbase_url = "{sim_url}"\napi_key = "load"\n'
        f"requests_per_minute = {args.rpm}\npage_limit = {args.page_limit}\n"
        f"[backfill]\nsymbols = [{names}]\nhistory_days = {args.days}\n"
        "stagger_seconds = 0.05\n[retry]\nmin_seconds = 0.1\nmax_seconds = 30\n"
        f'[status]\nlisten = "127.0.0.1:{status_port}"\n[logging]\nlevel = "warning"\n'
        f'[daemon]\ninstance = "loadtest"\nstate_dir = "{tmp}"\n')
    env = {**os.environ, "BACKFILLD_DATABASE_URL": db_url}
    env.pop("NOTIFY_SOCKET", None)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "daemon", "run", "--config", str(config)], env=env,
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{status_port}"
        _wait_until(lambda: httpx.get(f"{url}/readyz", timeout=1).status_code == 200,
                    "the daemon to be ready", [daemon])
        yield url
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=40)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def _progress(url: str) -> dict[str, object]:
    st = httpx.get(f"{url}/status", timeout=5).json()
    cycle = st.get("cycle") or {}
    return {"state": st["state"], "jobs_done": cycle.get("jobs_done"),
            "jobs_total": cycle.get("jobs_total"), "bars_written": st["writer"]["bars_written"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running daemon's status address (default: start a "
                        "backfill here)")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=0.1,
                        help="each client's pause between requests (default 0.1 s; 0 = none)")
    parser.add_argument("--timeout", type=float, default=5.0, help="per request (default 5 s)")
    backfill_args = parser.add_argument_group("the backfill started without --url")
    backfill_args.add_argument("--symbols", type=int, default=25)
    backfill_args.add_argument("--days", type=int, default=730)
    backfill_args.add_argument("--rpm", type=float, default=1500)
    backfill_args.add_argument("--latency-ms", default="200-400")
    backfill_args.add_argument("--page-limit", type=int, default=50_000)
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(backfill(args))
        before = _progress(url)
        result = trio.run(load, url, args.clients, args.seconds, args.interval, args.timeout)
        after = _progress(url)
    result["url"] = url
    result["daemon_before"] = before
    result["daemon_after"] = after
    print(json.dumps(result, indent=2))
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
