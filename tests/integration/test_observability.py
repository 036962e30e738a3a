"""Observability end to end: `backfilld run` as a subprocess, its status endpoint over loopback,
`backfilld status`, and the baseline and load-test scripts against it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from daemon.simulator.process import free_port

from ..conftest import drop_database, make_database
from .procs import simulator, start_daemon, write_config

ROOT = Path(__file__).resolve().parents[2]
SYMBOLS = ["AAPL", "X:BTCUSD"]
TIMEFRAMES = ["1d", "1h"]


@pytest.fixture(scope="module")
def daemon_url(pg_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A daemon that finished its first cycle and now waits for the next (in an hour); shared
    by the module's tests, which only read from it."""
    tmp_path = tmp_path_factory.mktemp("observability")
    database = make_database(pg_server)
    port = free_port()
    with simulator(tmp_path, seed=3) as sim:
        config = write_config(
            tmp_path / "config.toml", sim,
            "requests_per_minute = 0\npage_limit = 2000\n"
            "[backfill]\nsymbols = [\"AAPL\", \"X:BTCUSD\"]\n"
            "timeframes = [\"1d\", \"1h\"]\nhistory_days = 30\nstagger_seconds = 0\n"
            f"[status]\nlisten = \"127.0.0.1:{port}\"\n[daemon]\ninstance = \"it\"\n",
        )
        proc = start_daemon(config, database, log=tmp_path / "daemon.log")
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no finished cycle within 30 s"
                try:
                    if httpx.get(f"{url}/status", timeout=1).json()["last_cycle"]:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
            yield url
        finally:
            proc.terminate()
            code = proc.wait(timeout=30)
            drop_database(pg_server, database)
    assert code == 0


def test_endpoints_of_the_daemon_process(daemon_url: str) -> None:
    with httpx.Client(base_url=daemon_url, timeout=5) as http:
        check_endpoints(http.get)


def check_endpoints(get: Callable[[str], httpx.Response]) -> None:
    assert get("/healthz").json()["status"] == "ok"
    assert get("/readyz").json()["status"] == "ready"
    st = get("/status").json()
    assert st["instance"] == "it" and st["last_cycle"]["ok"] is True
    assert st["last_cycle"]["jobs_done"] == 4 and st["writer"]["bars_written"] > 0
    assert st["total_requests"] == st["last_cycle"]["requests"] > 0
    assert get("/api/v1/admin/scheduler-health").json()["status"] == "healthy"
    stale = get("/api/v1/admin/features/staleness").json()
    assert stale["counts"]["fresh"] == 4
    history = get("/api/v1/admin/scheduler/execution-history?limit=1").json()
    assert history["executions"][0]["jobs_ok"] == 4
    assert history["executions"][0]["bars_written"] == st["writer"]["bars_written"]
    metrics = get("/metrics").text
    assert f"backfilld_bars_written_total {float(st['writer']['bars_written'])}" in metrics
    assert get("/no/such/path").status_code == 404


def _raw(url: str, payload: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(payload)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_garbage_huge_headers_and_half_requests_do_not_stop_it(daemon_url: str) -> None:
    host, port = daemon_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as half:
        half.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\nX-Half")  # ...and nothing more
        assert _raw(daemon_url, b"\xff\xfe\x00garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        big = b"GET /status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 100_000 + b"\r\n\r\n"
        assert _raw(daemon_url, big).startswith(b"HTTP/1.1 431 ")
        # the half request is still pending: everyone else is served meanwhile
        for path in ("/healthz", "/status", "/metrics"):
            assert httpx.get(daemon_url + path, timeout=5).status_code == 200


def test_backfilld_status_prints_tables(daemon_url: str) -> None:
    done = subprocess.run([sys.executable, "-m", "daemon", "status", "--url", daemon_url],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith(f"backfilld it at {daemon_url}: HEALTHY")
    assert "freshness: 4 fresh, 0 aging, 0 stale, 0 very stale, 0 missing" in out
    assert "every series holds every bar" in out
    assert "recent executions" in out and " start " in out and " ok " in out
    raw = subprocess.run([sys.executable, "-m", "daemon", "status", "--url", daemon_url,
                          "--json"], capture_output=True, text=True, timeout=30)
    assert json.loads(raw.stdout)["health"]["status"] == "healthy"
    gone = subprocess.run([sys.executable, "-m", "daemon", "status", "--url",
                           f"http://127.0.0.1:{free_port()}"], capture_output=True, text=True,
                          timeout=30)
    assert gone.returncode == 4 and "cannot reach the daemon" in gone.stderr


def test_loadtest_script_against_the_daemon(daemon_url: str) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "loadtest.py"), "--url", daemon_url,
         "--clients", "8", "--seconds", "1", "--interval", "0.01"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["errors"] == 0 and result["requests"] > 50
    assert set(result["per_endpoint"]) >= {"/healthz", "/status", "/metrics"}
    assert 0 < result["latency"]["p50_ms"] <= result["latency"]["p99_ms"]


def test_baseline_script(database: str) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "baseline.py"), "--symbols", "2", "--days", "10",
         "--timeframes", "1d,1h", "--latency-ms", "20-40", "--database-url", database],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["jobs"] == 4 and result["jobs_failed"] == 0 and result["bars"] > 0
    assert result["requests"] >= 4 and result["rate_limited"] == 0
    shares = result["api_share"] + result["db_share"] + result["compute_share"]
    assert shares == pytest.approx(1.0, abs=0.01)
    assert result["bottleneck"] in ("api", "db", "balanced")
    assert result["total_seconds"] == pytest.approx(
        result["api_seconds"] + result["db_seconds"] + result["compute_seconds"], abs=0.01)
