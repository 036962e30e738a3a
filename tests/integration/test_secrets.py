"""Secrets never reach logs, the status endpoints, exceptions, the STATUS= line or the database.

A daemon subprocess runs with an API key the simulator refuses (so every job fails and every
error path records something), a database URL carrying a password, and a status token handed
over as systemd would (a credential in $CREDENTIALS_DIRECTORY). The test holds the notify socket
systemd would own, reads every endpoint with the token, without it and with a wrong one, then
searches everything the daemon wrote, served or sent for any of the secrets.
"""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import httpx
import psycopg
from psycopg import conninfo

from daemon.simulator.process import free_port

from .procs import simulator, start_daemon, write_config

API_KEY = "SECRETKEY-7f3a9c"
DB_PASSWORD = "hunter2-pw-41d"
STATUS_TOKEN = "status-tok-9b1e4d27"
SECRETS = {"API key": API_KEY, "database password": DB_PASSWORD, "status token": STATUS_TOKEN}
ENDPOINTS = ["/healthz", "/readyz", "/status", "/metrics", "/api/v1/admin/scheduler-health",
             "/api/v1/admin/features/staleness", "/api/v1/admin/scheduler/execution-history"]


def test_no_secret_in_logs_endpoints_or_database(database: str, tmp_path: Path) -> None:
    port = free_port()
    # the session's server trusts local connections: the password is carried, never checked
    url = conninfo.make_conninfo(database, password=DB_PASSWORD)
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "status-token").write_text(STATUS_TOKEN + "\n")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    with notify, simulator(tmp_path, extra=("--api-key", "the-only-good-key")) as api:
        config = write_config(
            tmp_path / "config.toml", api,
            '[backfill]\nsymbols = ["AAPL", "X:BTCUSD"]\ntimeframes = ["1d", "5m"]\n'
            f'history_days = 10\n[status]\nlisten = "127.0.0.1:{port}"\n'
            '[logging]\nlevel = "debug"\n',
        )
        log = tmp_path / "daemon.log"
        proc = start_daemon(config, url, log=log, POLYGON_API_KEY=API_KEY,
                            CREDENTIALS_DIRECTORY=str(credentials),
                            NOTIFY_SOCKET=str(tmp_path / "notify.sock"))
        try:
            answers = _after_first_cycle(port, proc)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        notified = _drain(notify)
    texts = {"log": log.read_text(), "notify": notified, **answers}
    with psycopg.connect(database) as conn:
        for table in ("executions", "job_results", "series_freshness", "coverage"):
            rows = conn.execute(f"SELECT * FROM {table}").fetchall()
            texts[table] = repr(rows)
    # the run did fail, and said why, in every place searched
    assert "401" in texts["log"] and "401" in texts["job_results"]
    assert "STATUS=" in texts["notify"] and "READY=1" in texts["notify"]
    # the token was in force: without it (or with a wrong one) only the probes answered
    assert '"error":"unauthorized"' in texts["/status without a token"]
    assert '"error":"unauthorized"' in texts["/status with a wrong token"]
    assert '"status":"ok"' in texts["/healthz without a token"]
    assert '"last_cycle"' in texts["/status"]
    for where, text in texts.items():
        for what, secret in SECRETS.items():
            assert secret not in text, (what, where)


def _after_first_cycle(port: int, proc: object) -> dict[str, str]:
    base = f"http://127.0.0.1:{port}"
    auth = {"authorization": f"Bearer {STATUS_TOKEN}"}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            status = httpx.get(base + "/status", headers=auth, timeout=2).json()
        except httpx.HTTPError:
            status = {}
        if status.get("last_cycle"):
            break
        time.sleep(0.1)
    else:
        raise TimeoutError("no cycle finished")
    answers = {path: _answer(base + path, auth) for path in ENDPOINTS}
    for path in ENDPOINTS:
        answers[f"{path} without a token"] = _answer(base + path, {})
        answers[f"{path} with a wrong token"] = _answer(
            base + path, {"authorization": f"Bearer {STATUS_TOKEN[:-1]}"})
    return answers


def _answer(url: str, headers: dict[str, str]) -> str:
    """Head and body as one text: a secret in a header counts too."""
    r = httpx.get(url, headers=headers, timeout=5)
    return "\n".join([str(r.status_code), *(f"{k}: {v}" for k, v in r.headers.items()), r.text])


def _drain(sock: socket.socket) -> str:
    """Every datagram the daemon sent to the notify socket, one per line."""
    sock.setblocking(False)
    out = []
    try:
        while True:
            out.append(sock.recv(65536).decode())
    except BlockingIOError:
        return "\n".join(out)
