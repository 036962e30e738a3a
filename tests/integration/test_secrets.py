"""Secrets never reach logs, the status endpoints, exceptions or the database.

A daemon subprocess runs with an API key the simulator refuses (so every job fails and every
error path records something) and a database URL carrying a password. Then everything it
wrote or served is searched for either secret.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import psycopg
from psycopg import conninfo

from daemon.simulator.process import free_port

from .procs import simulator, start_daemon, write_config

API_KEY = "SECRETKEY-7f3a9c"
DB_PASSWORD = "hunter2-pw-41d"
ENDPOINTS = ["/healthz", "/readyz", "/status", "/metrics", "/api/v1/admin/scheduler-health",
             "/api/v1/admin/features/staleness", "/api/v1/admin/scheduler/execution-history"]


def test_no_secret_in_logs_endpoints_or_database(database: str, tmp_path: Path) -> None:
    port = free_port()
    # the session's server trusts local connections: the password is carried, never checked
    url = conninfo.make_conninfo(database, password=DB_PASSWORD)
    with simulator(tmp_path, extra=("--api-key", "the-only-good-key")) as api:
        config = write_config(
            tmp_path / "config.toml", api,
            '[backfill]\nsymbols = ["AAPL", "X:BTCUSD"]\ntimeframes = ["1d", "5m"]\n'
            f'history_days = 10\n[status]\nlisten = "127.0.0.1:{port}"\n',
        )
        log = tmp_path / "daemon.log"
        proc = start_daemon(config, url, log=log, POLYGON_API_KEY=API_KEY)
        try:
            answers = _after_first_cycle(port, proc)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
    texts = {"log": log.read_text(), **answers}
    with psycopg.connect(database) as conn:
        for table in ("executions", "job_results", "series_freshness", "coverage"):
            rows = conn.execute(f"SELECT * FROM {table}").fetchall()
            texts[table] = repr(rows)
    # the run did fail, and said why, in every place searched
    assert "401" in texts["log"] and "401" in texts["job_results"]
    for where, text in texts.items():
        assert API_KEY not in text, where
        assert DB_PASSWORD not in text, where


def _after_first_cycle(port: int, proc: object) -> dict[str, str]:
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            status = httpx.get(base + "/status", timeout=2).json()
        except httpx.HTTPError:
            status = {}
        if status.get("last_cycle"):
            break
        time.sleep(0.1)
    else:
        raise TimeoutError("no cycle finished")
    return {path: httpx.get(base + path, timeout=5).text for path in ENDPOINTS}
