"""The status endpoint of a running daemon, over a real socket.

The daemon runs in-process (writer, scheduler, status server in its root nursery) against the
simulator, also in-process, and a real PostgreSQL: every endpoint is called over loopback and its
content checked against what the daemon did. Bad clients (garbage, a 100 KB header, half a
request) must cost only their own connection, and never hold up the writer.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from typing import TypeVar

import httpx
import psycopg
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from daemon import monitoring
from daemon.app import serve
from daemon.compose import Parts, build
from daemon.config import parse_config
from daemon.db import load_migrations
from daemon.httpserver import Request
from daemon.leases import Coordinator, Identity
from daemon.monitoring import check_database
from daemon.simulator.server import SimulatorOptions, serve_simulator
from daemon.snapshot import Snapshot
from daemon.status import StatusOptions
from daemon.status import app as status_app
from daemon.status.app import StatusApp
from daemon.status.cache import Cached, Outcome
from daemon.status_cli import run_status

T = TypeVar("T")
SYMBOLS = ["AAPL", "X:BTCUSD"]
TIMEFRAMES = ["1d", "1h"]


# No answer caching (each request sees the database and the daemon now), a short read timeout.
FAST = StatusOptions(cache_seconds=0.0, render_seconds=0.0, read_timeout=0.5)


class Running:
    """A daemon under test: its parts (for their statistics) and its status port."""

    def __init__(self, parts: Parts, port: int | None) -> None:
        self.parts = parts
        self.status_port = port
        self.writer, self.client, self.scheduler = parts.writer, parts.client, parts.scheduler


async def start(nursery: trio.Nursery, database: str, *, api_key: str = "k",
                extra: str = "", latency_ms: tuple[float, float] = (0, 0),
                wait: bool = True, options: StatusOptions = FAST,
                lease_seconds: float = 30) -> Running:
    """Simulator + daemon (status on a free port); returns once the first cycle is done."""
    sim_port = await nursery.start(serve_simulator, SimulatorOptions(
        port=0, seed=5, api_key="k", latency_ms=latency_ms))
    symbols = ", ".join(f'"{s}"' for s in SYMBOLS)
    timeframes = ", ".join(f'"{t}"' for t in TIMEFRAMES)
    config = parse_config(
        f'[polygon]\nbase_url = "http://127.0.0.1:{sim_port}"\napi_key = "{api_key}"\n'
        "requests_per_minute = 0\npage_limit = 2000\n"
        f"[backfill]\nsymbols = [{symbols}]\ntimeframes = [{timeframes}]\nhistory_days = 20\n"
        "stagger_seconds = 0\n[status]\nlisten = \"127.0.0.1:0\"\n[daemon]\ninstance = \"t1\"\n"
        f"lease_seconds = {lease_seconds}\n" + extra,
        env={}, source="test.toml",
    )
    parts = build(config, database, status_options=options)
    daemon = Running(parts, await nursery.start(serve, parts))
    if wait:
        await wait_for_cycle(daemon, 1)
    return daemon


async def wait_for_cycle(daemon: Running, number: int) -> None:
    with trio.fail_after(20):
        await daemon.scheduler.wait_cycle_done(number)


def client(daemon: Running) -> httpx.AsyncClient:
    assert daemon.status_port
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.status_port}", timeout=5)


async def test_every_endpoint_of_a_running_daemon(nursery: trio.Nursery, database: str) -> None:
    daemon = await start(nursery, database)
    async with client(daemon) as http:
        health = await http.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"

        ready = await http.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json() == {"status": "ready", "migrations": len(load_migrations())}

        st = (await http.get("/status")).json()
        writer = daemon.writer.statistics()
        api = daemon.client.statistics()
        assert st["state"] == "waiting" and st["instance"] == "t1"
        assert st["config"]["generation"] == 1 and st["config"]["source"] == "test.toml"
        assert st["uptime_seconds"] > 0 and st["started_at"].endswith("Z")
        assert st["cycle"] is None
        last = st["last_cycle"]
        assert last["number"] == 1 and last["ok"] is True and last["trigger"] == "start"
        assert last["jobs_done"] == last["jobs_total"] == 4 and last["jobs_failed"] == 0
        assert last["symbols"]["X:BTCUSD"]["state"] == "done"
        assert last["symbols"]["AAPL"]["jobs_done"] == 2
        assert last["bars_written"] == writer.bars_written > 0
        assert last["requests"] == api.total_requests == st["total_requests"] > 0
        assert st["rate_limited_count"] == 0 and st["retries"] == 0
        assert st["rate_limiter"]["configured_per_minute"] == 0
        assert st["writer"]["connected"] is True and st["writer"]["queue_depth"] == 0
        assert st["writer"]["pages_written"] == writer.pages_written
        assert st["next_cycle_at"] is not None and st["last_error"] is None

        sh = await http.get("/api/v1/admin/scheduler-health")
        assert sh.status_code == 200
        assert sh.json()["status"] == "healthy", sh.json()
        assert sh.json()["circuit"]["state"] == "closed"
        assert sh.json()["failure_rate"] == 0.0

        stale = (await http.get("/api/v1/admin/features/staleness")).json()
        assert [(s["symbol"], s["timeframe"]) for s in stale["series"]] == [
            (s, t) for s in SYMBOLS for t in TIMEFRAMES]
        # fetched through now: every series holds every bar that can exist
        assert {s["class"] for s in stale["series"]} == {"fresh"}
        assert stale["counts"]["fresh"] == 4 and stale["thresholds_hours"]["fresh"] == 1.0
        assert all(s["last_bar"] and s["last_success"] for s in stale["series"])
        # one span each, from the history's first day through the newest bar, no hole
        for s in stale["series"]:
            cov = s["coverage"]
            assert cov["holes"] == 0 and cov["from"] <= s["last_bar"] < cov["to"], s

        hist = (await http.get("/api/v1/admin/scheduler/execution-history?limit=5")).json()
        assert hist["limit"] == 5 and len(hist["executions"]) == 1
        ex = hist["executions"][0]
        assert ex["status"] == "ok" and ex["instance"] == "t1" and ex["number"] == 1
        assert ex["jobs_total"] == ex["jobs_ok"] == 4 and ex["jobs_failed"] == 0
        assert ex["bars_written"] == writer.bars_written
        assert ex["requests"] == api.total_requests and ex["rate_limited"] == 0
        assert ex["failed_jobs"] == [] and ex["finished_at"] and ex["duration_seconds"] > 0

        metrics = await http.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain")
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(metrics.text)
                   for s in family.samples}
        assert samples[("backfilld_api_requests_total", ())] == api.total_requests
        assert samples[("backfilld_api_rate_limited_total", ())] == 0
        assert samples[("backfilld_api_retries_total", ())] == 0
        assert samples[("backfilld_bars_written_total", ())] == writer.bars_written
        assert samples[("backfilld_write_seconds_count", ())] == writer.pages_written
        assert samples[("backfilld_writer_queue_depth", ())] == 0
        assert samples[("backfilld_cycles_total", (("status", "ok"),))] == 1
        assert samples[("backfilld_series", (("class", "fresh"), ("timeframe", "1d")))] == 2
        assert samples[("backfilld_series", (("class", "missing"), ("timeframe", "1h")))] == 0
        assert samples[("backfilld_database_ready", ())] == 1

        head = await http.head("/status")
        assert head.status_code == 200 and head.content == b""


async def test_unknown_path_wrong_method_and_bad_parameters(nursery: trio.Nursery,
                                                            database: str) -> None:
    daemon = await start(nursery, database)
    async with client(daemon) as http:
        missing = await http.get("/nope")
        assert missing.status_code == 404
        assert missing.json()["error"] == "not found" and "/status" in missing.json()["endpoints"]
        post = await http.post("/status", content=b"{}")
        assert post.status_code == 405 and post.headers["allow"] == "GET, HEAD"
        assert post.json()["error"] == "method POST not allowed"
        for bad in ("0", "x", "501"):
            r = await http.get(f"/api/v1/admin/scheduler/execution-history?limit={bad}")
            assert r.status_code == 400 and "limit" in r.json()["error"]
        r = await http.get("/api/v1/admin/features/staleness?class=rotten")
        assert r.status_code == 400
        r = await http.get("/api/v1/admin/features/staleness?class=fresh")
        assert len(r.json()["series"]) == 4


async def test_staleness_classes_and_readiness_follow_the_database(
        nursery: trio.Nursery, database: str) -> None:
    daemon = await start(nursery, database)
    with psycopg.connect(database, autocommit=True) as conn:
        # crypto trades around the clock: with the bar of 3 hours ago the newest held (and no
        # fetch since), the one after it has been due for 2 hours and some minutes
        conn.execute("UPDATE series_freshness SET checked_through = NULL,"
                     " last_bar_ts = date_trunc('hour', now()) - interval '3 hours'"
                     " WHERE symbol = 'X:BTCUSD' AND timeframe = '1h'")
        conn.execute("DELETE FROM series_freshness WHERE symbol = 'X:BTCUSD' AND timeframe = '1d'")
    async with client(daemon) as http:
        stale = (await http.get("/api/v1/admin/features/staleness")).json()
        by_key = {(s["symbol"], s["timeframe"]): s for s in stale["series"]}
        aging = by_key[("X:BTCUSD", "1h")]
        assert aging["class"] == "aging" and 7200 <= aging["age_seconds"] < 3 * 3600
        assert aging["age"].startswith("2h ")
        assert by_key[("X:BTCUSD", "1d")]["class"] == "missing"
        assert by_key[("X:BTCUSD", "1d")]["last_bar"] is None
        assert stale["counts"] == {"fresh": 2, "aging": 1, "stale": 0, "very_stale": 0,
                                   "missing": 1}

        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("DELETE FROM schema_migrations WHERE version = 3")
        ready = await http.get("/readyz")
        assert ready.status_code == 503
        assert ready.json() == {"status": "not ready", "reason": "1 migration(s) not applied: "
                                "003_monitoring (run `backfilld migrate`)"}


def test_readiness_reasons_without_a_daemon(empty_database: str) -> None:
    migrations = load_migrations()
    assert check_database(empty_database, migrations) == (
        f"{len(migrations)} migration(s) not applied: "
        + ", ".join(f"{m.version:03d}_{m.name}" for m in migrations)
        + " (run `backfilld migrate`)")
    reason = check_database("postgresql://nobody:secret@127.0.0.1:1/none", migrations)
    assert reason is not None and reason.startswith("cannot connect to PostgreSQL")
    assert "secret" not in reason


async def test_a_failing_cycle_is_explained_everywhere(nursery: trio.Nursery,
                                                       database: str) -> None:
    daemon = await start(nursery, database, api_key="wrong")
    async with client(daemon) as http:
        sh = await http.get("/api/v1/admin/scheduler-health")
        assert sh.status_code == 503 and sh.json()["status"] == "unhealthy"
        assert any("refused the key" in r for r in sh.json()["reasons"])
        assert sh.json()["failure_rate"] == 1.0

        st = (await http.get("/status")).json()
        assert st["last_cycle"]["ok"] is False and st["last_cycle"]["jobs_failed"] == 4
        assert "401" in st["last_error"]["message"]
        assert st["last_cycle"]["symbols"]["AAPL"]["state"] == "failed"

        hist = (await http.get("/api/v1/admin/scheduler/execution-history")).json()
        ex = hist["executions"][0]
        assert ex["status"] == "failed" and ex["jobs_failed"] == 4 and ex["jobs_ok"] == 0
        assert "401" in (ex["error"] or "")
        assert sorted((j["symbol"], j["timeframe"]) for j in ex["failed_jobs"]) == sorted(
            (s, t) for s in SYMBOLS for t in TIMEFRAMES)
        assert all("401" in j["error"] for j in ex["failed_jobs"])

        stale = (await http.get("/api/v1/admin/features/staleness")).json()
        assert {s["class"] for s in stale["series"]} == {"missing"}
        assert all("401" in s["last_error"] for s in stale["series"])

    out = io.StringIO()
    args = argparse.Namespace(url=f"http://127.0.0.1:{daemon.status_port}", config=None,
                              default_config="none.toml", all=False, json=False, timeout=5.0)
    assert await trio.to_thread.run_sync(run_status, args, out) == 1
    text = out.getvalue()
    assert text.startswith(f"backfilld t1 at {args.url}: UNHEALTHY\n  ! the API refused the key")
    assert "last cycle 1 (start) FAILED: 4 jobs, 4 failed" in text
    assert "freshness: 0 fresh, 0 aging, 0 stale, 0 very stale, 4 missing" in text
    assert "execution 1: AAPL 1d failed: HTTP 401" in text
    assert "X:BTCUSD  1h         missing" in text


async def test_a_running_cycle_shows_its_progress(nursery: trio.Nursery, database: str) -> None:
    # 100-200 ms per page: the cycle takes a few seconds, seen here mid-way
    daemon = await start(nursery, database, latency_ms=(100, 200), wait=False)
    async with client(daemon) as http:
        with trio.fail_after(10):
            while True:  # wait for an observable mid-cycle state
                st = (await http.get("/status")).json()
                cycle = st["cycle"]
                if cycle and 1 <= cycle["jobs_done"] < cycle["jobs_total"]:
                    break
                await trio.sleep(0.02)
        cycle = st["cycle"]
        assert st["state"] == "backfilling" and st["last_cycle"] is None
        assert cycle["number"] == 1 and cycle["finished_at"] is None and cycle["ok"] is None
        assert 1 <= cycle["jobs_done"] < cycle["jobs_total"] == 4
        assert cycle["requests"] >= cycle["jobs_done"]
        assert "running" in cycle["symbol_states"]
        health = (await http.get("/api/v1/admin/scheduler-health")).json()
        assert health["status"] == "healthy" and health["last_execution"]["state"] == "running"
        hist = (await http.get("/api/v1/admin/scheduler/execution-history")).json()
        assert hist["executions"][0]["status"] == "running"
        assert hist["executions"][0]["finished_at"] is None
        out = io.StringIO()
        args = argparse.Namespace(url=f"http://127.0.0.1:{daemon.status_port}", config=None,
                                  default_config="none.toml", all=True, json=False, timeout=5.0)
        assert await trio.to_thread.run_sync(run_status, args, out) == 0
        assert "state: backfilling, cycle 1 (start)" in out.getvalue()
        assert "symbols in cycle 1:" in out.getvalue()


async def test_status_shows_every_instance_sharing_the_database(nursery: trio.Nursery,
                                                               database: str) -> None:
    daemon = await start(nursery, database, lease_seconds=1.5)
    other = Coordinator(database, Identity("box2:77:abc", "box2", "box2", 77))
    await other.claim("ZZZ", ["1d"], due_before=0)
    await nursery.start(other.run)
    async with client(daemon) as http:
        with trio.fail_after(10):
            # the daemon sees the other instance at its next heartbeat (every 0.5 s)
            while len((st := (await http.get("/status")).json())["instances"]) < 2:  # noqa: ASYNC110
                await trio.sleep(0.05)
        metrics = (await http.get("/metrics")).text
    mine = [i for i in st["instances"] if i["this"]]
    assert [i["label"] for i in mine] == ["t1"] and mine[0]["id"] == st["instance_id"]
    [theirs] = [i for i in st["instances"] if not i["this"]]
    assert theirs["id"] == "box2:77:abc" and theirs["alive"] and theirs["leases"] == 1
    assert 'backfilld_instance_leases{instance_id="box2:77:abc"} 1.0' in metrics
    assert st["event_loop"]["max_lag_seconds"] >= st["event_loop"]["lag_seconds"] >= 0
    assert "backfilld_event_loop_lag_max_seconds " in metrics
    out = io.StringIO()
    args = argparse.Namespace(url=f"http://127.0.0.1:{daemon.status_port}", config=None,
                              default_config="none.toml", all=True, json=False, timeout=5.0)
    assert await trio.to_thread.run_sync(run_status, args, out) == 0
    text = out.getvalue()
    assert "Instances sharing the database (2 alive" in text
    assert "box2:77:abc" in text and "* " + st["instance_id"] in text


# --- bad clients -----------------------------------------------------------------------------


async def read_all(stream: trio.SocketStream) -> bytes:
    data = bytearray()
    with trio.fail_after(5):
        while chunk := await stream.receive_some(65536):
            data += chunk
    return bytes(data)


async def test_bad_clients_cost_their_connection_only(nursery: trio.Nursery,
                                                      database: str) -> None:
    daemon = await start(nursery, database)
    port = daemon.status_port
    assert port is not None
    half = await trio.open_tcp_stream("127.0.0.1", port)
    await half.send_all(b"GET /status HTTP/1.1\r\nHost: x\r\nX-Partial: ")  # and then nothing
    silent = await trio.open_tcp_stream("127.0.0.1", port)  # connects, never sends a byte

    garbage = await trio.open_tcp_stream("127.0.0.1", port)
    async with garbage:
        # the start of a TLS ClientHello, then junk
        await garbage.send_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http\r\n\r\n")
        assert (await read_all(garbage)).startswith(b"HTTP/1.1 400 ")
    huge = await trio.open_tcp_stream("127.0.0.1", port)
    async with huge:
        await huge.send_all(b"GET /status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000
                            + b"\r\n\r\n")
        assert (await read_all(huge)).startswith(b"HTTP/1.1 431 ")

    async with client(daemon) as http:
        # the half request and the silent connection are still open: others are served
        assert (await http.get("/healthz")).status_code == 200
        # ...and the writer is not held up: a whole new cycle commits meanwhile
        daemon.scheduler.trigger()
        await wait_for_cycle(daemon, 2)
        last = daemon.scheduler.statistics().last_cycle
        assert last is not None and last.ok
        st = (await http.get("/status")).json()
        assert st["last_cycle"]["number"] == 2 and st["last_cycle"]["trigger"] == "wake"
    async with half:
        # the read timeout (0.5 s here) closes the half request with 408
        assert (await read_all(half)).startswith(b"HTTP/1.1 408 ")
    async with silent:
        await silent.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = await read_all_or_first(silent)
        assert reply.startswith(b"HTTP/1.1 200 ")
        assert json.loads(reply.partition(b"\r\n\r\n")[2])["status"] == "ok"


async def read_all_or_first(stream: trio.SocketStream) -> bytes:
    """Bytes until one Content-Length-framed response is complete."""
    data = bytearray()
    with trio.fail_after(5):
        while True:
            data += await stream.receive_some(65536)
            head, sep, body = bytes(data).partition(b"\r\n\r\n")
            if sep:
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                if len(body) >= length:
                    return bytes(data)


async def test_answers_are_cached_and_fetched_once(nursery: trio.Nursery, database: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    real = monitoring.check_database

    def counting(url: str, migrations: list) -> str | None:  # type: ignore[type-arg]
        nonlocal calls
        calls += 1
        return real(url, migrations)

    monkeypatch.setattr(monitoring, "check_database", counting)
    daemon = await start(nursery, database, options=StatusOptions(cache_seconds=60.0))
    async with client(daemon) as http:
        async with trio.open_nursery() as burst:
            for _ in range(30):
                burst.start_soon(http.get, "/readyz")
    assert calls == 1


@pytest.mark.parametrize(("render_seconds", "renders"), [(60.0, 1), (0.0, 30)])
async def test_metrics_are_rendered_once_per_render_interval(
        nursery: trio.Nursery, database: str, monkeypatch: pytest.MonkeyPatch,
        render_seconds: float, renders: int) -> None:
    """30 scrapes at once cost one render (render_seconds 60) and get the same exposition, not
    one render each (0); /status is built for every request either way."""
    counts = {"status": 0, "metrics": 0}
    real_report, real_render = status_app.status_report, status_app.render

    def report(snap: Snapshot) -> dict[str, object]:
        counts["status"] += 1
        return real_report(snap)

    def render(snap: Snapshot, **kwargs: object) -> bytes:
        counts["metrics"] += 1
        return real_render(snap, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(status_app, "status_report", report)
    monkeypatch.setattr(status_app, "render", render)
    options = StatusOptions(cache_seconds=60.0, render_seconds=render_seconds)
    daemon = await start(nursery, database, options=options)
    scrapes: set[bytes] = set()
    async with client(daemon) as http:
        async def scrape() -> None:
            answer = await http.get("/metrics")
            assert answer.status_code == 200
            scrapes.add(answer.content)

        async with trio.open_nursery() as burst:
            for _ in range(30):
                burst.start_soon(scrape)
                burst.start_soon(http.get, "/status")
    assert counts == {"status": 30, "metrics": renders}
    if renders == 1:
        assert len(scrapes) == 1


async def test_a_reused_exposition_is_rendered_again_after_render_seconds(
        autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    taken = iter(range(1000))
    monkeypatch.setattr(status_app, "render",
                        lambda snap, **kwargs: f"snapshot {snap.number}\n".encode())
    monkeypatch.setattr(status_app, "scheduler_health", lambda snap, error: {"status": "ok"})

    def snapshot() -> argparse.Namespace:  # what the patched render reads of a Snapshot
        return argparse.Namespace(number=next(taken), started_at=time.time() - 60)

    app = StatusApp(snapshot, "postgresql:///unused",  # type: ignore[arg-type]
                    StatusOptions(cache_seconds=3600.0, render_seconds=0.25))
    answered = Outcome(None, "no database here")
    monkeypatch.setattr(app._ready, "get", lambda: _now(answered))
    monkeypatch.setattr(app._staleness, "get", lambda: _now(answered))

    async def rendered_from() -> bytes:
        return (await app.handle(Request("GET", "/metrics", "/metrics", {}, {}))).body

    assert await rendered_from() == b"snapshot 0\n"
    await trio.sleep(0.2)
    assert await rendered_from() == b"snapshot 0\n"  # 0.2 s old: reused
    await trio.sleep(0.1)
    assert await rendered_from() == b"snapshot 1\n"  # 0.3 s old: rendered again
    health = await app.handle(Request("GET", "/healthz", "/healthz", {}, {}))
    assert health.status == 200 and 59 < json.loads(health.body)["uptime_seconds"] < 70
    await app.handle(Request("GET", "/healthz", "/healthz", {}, {}))
    assert next(taken) == 3  # the first probe took snapshot 2 (the start time), later ones none


async def _now(outcome: Outcome[T]) -> Outcome[T]:
    return outcome


async def test_port_in_use_is_logged_and_the_daemon_runs_on(nursery: trio.Nursery,
                                                            database: str) -> None:
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sim_port = await nursery.start(serve_simulator, SimulatorOptions(port=0, seed=5))
        config = parse_config(
            f'[polygon]\nbase_url = "http://127.0.0.1:{sim_port}"\napi_key = "k"\n'
            '[backfill]\nsymbols = ["AAPL"]\ntimeframes = ["1d"]\nhistory_days = 5\n'
            f'[status]\nlisten = "127.0.0.1:{port}"\n', env={})
        parts = build(config, database)
        async with trio.open_nursery() as inner:
            port = await inner.start(serve, parts)
            cycle = await parts.scheduler.wait_cycle_done(1)
            parts.controls.stop()
    assert port is None
    assert cycle.ok


async def test_a_stale_answer_is_served_while_it_refreshes(autojump_clock: trio.abc.Clock
                                                           ) -> None:
    fetched: list[float] = []

    async def fetch() -> Outcome[int]:
        fetched.append(trio.current_time())
        await trio.sleep(0.5)  # a slow database
        return Outcome(len(fetched), None)

    async with trio.open_nursery() as nursery:
        cache = Cached(1.0, fetch, nursery)
        t0 = trio.current_time()
        assert (await cache.get()).value == 1  # nothing yet: the caller waits
        assert trio.current_time() - t0 == 0.5
        await trio.sleep(0.2)
        assert (await cache.get()).value == 1 and len(fetched) == 1  # fresh
        await trio.sleep(1.0)
        before = trio.current_time()
        assert (await cache.get()).value == 1  # stale: served at once...
        await trio.testing.wait_all_tasks_blocked()
        assert (await cache.get()).value == 1 and trio.current_time() == before
        assert len(fetched) == 2  # ...while one refresh runs, however many ask
        await trio.sleep(0.6)
        assert (await cache.get()).value == 2
        await trio.sleep(60)  # far too old to serve: the caller waits again
        before = trio.current_time()
        assert (await cache.get()).value == 3 and trio.current_time() - before == 0.5
