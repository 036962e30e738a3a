"""Who may read the status endpoint: the bearer token, the open-bind refusal, the connection cap.

A daemon runs in-process (as in test_status.py) with a token from a `[status] token_file`; every
route is called over loopback without a token, with a wrong one and with the right one. The rule
that refuses an open endpoint on a reachable address is a pure function, tested on its own and
through `backfilld run` (a subprocess, which must exit 2 before any database starts) and
`check-config`. `backfilld status` is run in-process against the daemon with each token source.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
from loguru import logger

from daemon.__main__ import EXIT_CONFIG, main
from daemon.app import serve
from daemon.compose import Parts, build
from daemon.config import (
    STATUS_TOKEN_ENV,
    Secret,
    StatusConfig,
    is_loopback,
    parse_config,
    status_exposure_problem,
)
from daemon.errors import ConfigError
from daemon.httpserver import BUSY_BODY
from daemon.simulator.server import SimulatorOptions, serve_simulator
from daemon.status import StatusOptions, serve_status
from daemon.status.auth import BearerAuth
from daemon.status_cli import EXIT_UNAUTHORIZED, Target, resolve_target, run_status

TOKEN = "c0ffee-status-token-5e2b9d"
CHALLENGE = 'Bearer realm="backfilld"'
# Every route but the two probes, and a path that does not exist.
GUARDED = ["/status", "/metrics", "/api/v1/admin/scheduler-health",
           "/api/v1/admin/features/staleness", "/api/v1/admin/scheduler/execution-history",
           "/no/such/path"]
OPEN = ["/healthz", "/readyz"]
FAST = StatusOptions(cache_seconds=0.0, render_seconds=0.0, read_timeout=0.5)


@pytest.fixture
def no_token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (STATUS_TOKEN_ENV, "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)


def token_file(tmp_path: Path, token: str = TOKEN) -> Path:
    path = tmp_path / "status-token"
    path.write_text(token + "\n")
    return path


async def start(nursery: trio.Nursery, database: str, status: str) -> tuple[Parts, int]:
    """Simulator + daemon whose `[status]` section is `status`; returns after cycle 1."""
    sim_port = await nursery.start(serve_simulator, SimulatorOptions(port=0, seed=5,
                                                                     api_key="k"))
    config = parse_config(
        f'[polygon]\nbase_url = "http://127.0.0.1:{sim_port}"\napi_key = "k"\n'
        'requests_per_minute = 0\n[backfill]\nsymbols = ["AAPL"]\ntimeframes = ["1d"]\n'
        'history_days = 5\nstagger_seconds = 0\n[daemon]\ninstance = "t1"\n'
        f'[status]\nlisten = "127.0.0.1:0"\n{status}',
        env={}, source="test.toml")
    parts = build(config, database, status_options=FAST)
    port = await nursery.start(serve, parts)
    assert port is not None
    with trio.fail_after(20):
        await parts.scheduler.wait_cycle_done(1)
    return parts, port


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


# --- the pure rule: when an open endpoint is refused -----------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "localhost", "LocalHost",
                                  "::ffff:127.0.0.1"])
def test_loopback_addresses(host: str) -> None:
    assert is_loopback(host)
    assert status_exposure_problem(StatusConfig(host=host)) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.7", "192.168.1.2", "fe80::1",
                                  "backfilld.internal", "128.0.0.1"])
def test_a_reachable_address_without_a_token_is_refused(host: str) -> None:
    assert not is_loopback(host)
    problem = status_exposure_problem(StatusConfig(host=host, port=8080))
    assert problem is not None
    assert "reachable from other hosts" in problem and "no status token" in problem
    # ...and it says how to fix it
    for fix in (STATUS_TOKEN_ENV, "status-token", "token_file", "allow_unauthenticated = true",
                "127.0.0.1"):
        assert fix in problem
    # a token, or saying that open is meant, lets it start
    assert status_exposure_problem(StatusConfig(host=host, token=Secret("t"))) is None
    assert status_exposure_problem(StatusConfig(host=host, allow_unauthenticated=True)) is None


def test_the_refusal_names_the_listen_address() -> None:
    assert status_exposure_problem(StatusConfig(host="::", port=9)).startswith(  # type: ignore[union-attr]
        '[status] listen = "[::]:9" is reachable')
    config = parse_config('[status]\nlisten = "0.0.0.0:8080"\nallow_unauthenticated = true\n',
                          env={})
    assert status_exposure_problem(config.status) is None


# --- the token in the config: sources, precedence, errors ------------------------------------


def test_token_precedence_env_then_credential_then_file(tmp_path: Path) -> None:
    path = token_file(tmp_path, "from-file")
    creds = tmp_path / "credentials"
    creds.mkdir()
    text = f'[status]\ntoken_file = "{path}"\n'
    status = parse_config(text, env={}).status
    assert status.token == Secret("from-file") and status.token_source == str(path)
    (creds / "status-token").write_text("from-credential\n")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    status = parse_config(text, env=env).status
    assert status.token == Secret("from-credential")
    assert status.token_source == "the systemd credential status-token"
    status = parse_config(text, env={**env, STATUS_TOKEN_ENV: " from-env\n"}).status
    assert status.token == Secret("from-env") and status.token_source == f"${STATUS_TOKEN_ENV}"
    # nothing set anywhere: no token, every path open (on loopback)
    assert parse_config("", env={}).status.token is None
    assert parse_config("", env={STATUS_TOKEN_ENV: ""}).status.token is None


def test_an_unreadable_token_file_names_file_key_and_line(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    text = f'[backfill]\nsymbols = ["AAPL"]\n[status]\ntoken_file = "{missing}"\n'
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="/etc/backfilld/config.toml", env={})
    assert info.value.key == "status.token_file" and info.value.line == 4
    assert str(info.value) == (f"/etc/backfilld/config.toml:4: key 'status.token_file': "
                               f"cannot read {missing}: No such file or directory")
    empty = token_file(tmp_path, "  ")
    with pytest.raises(ConfigError, match="is empty"):
        parse_config(f'[status]\ntoken_file = "{empty}"\n', env={})
    # a higher source set: the file is not needed, so not read
    status = parse_config(text, env={STATUS_TOKEN_ENV: "t"}).status
    assert status.token == Secret("t")


def test_a_token_that_cannot_travel_in_a_header_is_refused_without_quoting_it(
        tmp_path: Path) -> None:
    bad = "has space-SEKRIT"
    with pytest.raises(ConfigError) as info:
        parse_config(f'[status]\ntoken_file = "{token_file(tmp_path, bad)}"\n', env={})
    assert info.value.key == "status.token_file" and "printable ASCII" in str(info.value)
    assert "SEKRIT" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_config("", env={STATUS_TOKEN_ENV: "naïve-SEKRIT"})
    assert f"${STATUS_TOKEN_ENV}" in str(info.value) and "SEKRIT" not in str(info.value)


def test_the_token_never_prints(tmp_path: Path) -> None:
    config = parse_config(f'[status]\ntoken_file = "{token_file(tmp_path)}"\n', env={})
    assert TOKEN not in repr(config) and TOKEN not in str(config.status)
    options = StatusOptions().with_access(config.status)
    assert options.token == Secret(TOKEN) and TOKEN not in repr(options)


@pytest.mark.parametrize("text, expected", [
    ("[status]\nmax_connections = 0\n", "whole number from 1"),
    ("[status]\nallow_unauthenticated = 1\n", "true or false"),
    ("[status]\ntoken = \"x\"\n", "unknown key"),
])
def test_bad_status_values(text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse_config(text, env={})


def test_status_defaults() -> None:
    status = parse_config("", env={}).status
    assert (status.token, status.allow_unauthenticated, status.max_connections) == (
        None, False, 64)
    assert StatusOptions().with_access(status).max_connections == 64


# --- the header check --------------------------------------------------------------------------


@pytest.mark.parametrize("header, allowed", [
    (f"Bearer {TOKEN}", True),
    (f"bearer {TOKEN}", True),
    (f"BEARER   {TOKEN}  ", True),
    (f"Bearer {TOKEN}x", False),
    (f"Bearer {TOKEN[:-1]}", False),
    ("Bearer ", False),
    ("Bearer", False),
    (TOKEN, False),
    (f"Basic {TOKEN}", False),
    (f"Bearer {TOKEN}, Bearer {TOKEN}", False),  # two headers, comma-joined
    ("Bearer \xff\xfe", False),
])
def test_bearer_header(header: str, allowed: bool) -> None:
    auth = BearerAuth(Secret(TOKEN))
    assert auth.allows({"authorization": header}) is allowed
    assert auth.allows({}) is False


def test_an_empty_token_is_refused() -> None:
    with pytest.raises(ValueError):
        BearerAuth(Secret(""))


# --- a running daemon with a token -------------------------------------------------------------


async def test_every_route_wants_the_token_but_the_probes(
        nursery: trio.Nursery, database: str, tmp_path: Path) -> None:
    _, port = await start(nursery, database, f'token_file = "{token_file(tmp_path)}"\n')
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
        for path in GUARDED:
            for headers in ({}, bearer("wrong"), bearer(TOKEN + "x"),
                            {"authorization": TOKEN}, {"authorization": f"Basic {TOKEN}"}):
                for method in ("GET", "HEAD"):
                    r = await http.request(method, path, headers=headers)
                    assert r.status_code == 401, (method, path, headers)
                    assert r.headers["www-authenticate"] == CHALLENGE
                    if method == "GET":
                        assert r.json()["error"] == "unauthorized"
                        assert "no/such" not in r.text and "endpoints" not in r.text
                    else:
                        assert r.content == b""
            good = await http.get(path, headers=bearer(TOKEN))
            assert good.status_code == (404 if path == "/no/such/path" else 200), path
            assert "www-authenticate" not in good.headers
            head = await http.head(path, headers=bearer(TOKEN))
            assert head.status_code == good.status_code and head.content == b""
        # the 404 an authorised client gets may list what exists
        assert "/status" in (await http.get("/nope", headers=bearer(TOKEN))).json()["endpoints"]
        for path in OPEN:
            for headers in ({}, bearer("wrong"), bearer(TOKEN)):
                for method in ("GET", "HEAD"):
                    r = await http.request(method, path, headers=headers)
                    assert r.status_code == 200, (method, path, headers)
        # the same path however it is spelled: slash, percent-encoding, method
        assert (await http.get("/status/")).status_code == 401
        assert (await http.get("/%73tatus")).status_code == 401
        assert (await http.get("/healthz/")).status_code == 200
        assert (await http.post("/status", content=b"{}")).status_code == 401
        assert (await http.post("/status", headers=bearer(TOKEN))).status_code == 405
        # a 401 quotes nothing the client sent
        r = await http.get("/status", headers=bearer("sent-by-client-77"))
        assert "sent-by-client-77" not in r.text and TOKEN not in r.text


async def test_without_a_token_a_loopback_endpoint_stays_open(
        nursery: trio.Nursery, database: str, no_token_env: None) -> None:
    _, port = await start(nursery, database, "")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
        assert (await http.get("/status")).status_code == 200
        assert (await http.get("/no/such/path")).status_code == 404


async def test_serve_status_itself_refuses_an_open_reachable_address(
        nursery: trio.Nursery) -> None:
    lines: list[str] = []
    sink = logger.add(lines.append, level="ERROR", format="{message}")
    try:
        port = await nursery.start(serve_status, lambda: None, "postgresql://unused",
                                   "0.0.0.0", 0, StatusOptions())
    finally:
        logger.remove(sink)
    assert port is None
    assert any("status endpoint not started" in line and "no status token" in line
               for line in lines)


# --- max_connections -----------------------------------------------------------------------------


async def read_response(stream: trio.SocketStream) -> bytes:
    """Bytes until one Content-Length-framed response is complete (or the peer closes)."""
    data = bytearray()
    with trio.fail_after(5):
        while True:
            chunk = await stream.receive_some(65536)
            data += chunk
            head, sep, body = bytes(data).partition(b"\r\n\r\n")
            if sep:
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                if len(body) >= length:
                    return bytes(data)
            if not chunk:
                return bytes(data)


async def test_connections_over_max_connections_get_503(
        nursery: trio.Nursery, database: str, no_token_env: None) -> None:
    _, port = await start(nursery, database, "max_connections = 2\n")
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    held = []
    for _ in range(2):  # two kept-alive connections, each served once: both slots taken
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(request)
        assert (await read_response(stream)).startswith(b"HTTP/1.1 200 ")
        held.append(stream)
    extra = await trio.open_tcp_stream("127.0.0.1", port)
    async with extra:
        await extra.send_all(request)
        reply = await read_response(extra)
    assert reply.startswith(b"HTTP/1.1 503 ") and reply.endswith(BUSY_BODY)
    assert b"retry-after: 1\r\n" in reply.lower()
    await held.pop().aclose()
    with trio.fail_after(5):  # a slot is free again (once the server saw the close)
        while True:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(request)
                if (await read_response(stream)).startswith(b"HTTP/1.1 200 "):
                    break
            await trio.sleep(0.02)
    for stream in held:
        await stream.aclose()


# --- the CLI: run refuses, check-config reports, status sends the token ------------------------


def test_run_refuses_an_open_reachable_listen_before_anything_starts(
        tmp_path: Path, no_token_env: None) -> None:
    state = tmp_path / "state"
    config = tmp_path / "c.toml"
    config.write_text('[polygon]\napi_key = "k"\n[backfill]\nsymbols = ["AAPL"]\n'
                      f'[status]\nlisten = "0.0.0.0:0"\n[daemon]\nstate_dir = "{state}"\n')
    done = subprocess.run([sys.executable, "-m", "daemon", "run", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_CONFIG, done.stderr
    assert done.stderr.startswith(f'backfilld: {config}: [status] listen = "0.0.0.0:0" is '
                                  "reachable from other hosts, but no status token is set")
    assert "allow_unauthenticated = true" in done.stderr and STATUS_TOKEN_ENV in done.stderr
    assert not state.exists()  # no embedded PostgreSQL was started (nor anything else)


def test_check_config_reports_the_same_problem(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], no_token_env: None) -> None:
    config = tmp_path / "c.toml"
    body = '[polygon]\napi_key = "k"\n[backfill]\nsymbols = ["AAPL"]\n[status]\n'
    config.write_text(body + 'listen = "0.0.0.0:8080"\n')
    assert main(["check-config", "--config", str(config)]) == EXIT_CONFIG
    out, err = capsys.readouterr()
    expected = status_exposure_problem(StatusConfig(host="0.0.0.0"))
    assert err.strip().endswith(f"backfilld: {config}: {expected}")
    assert "REFUSED" in out and "status: http://0.0.0.0:8080, no token" in out

    config.write_text(body + 'listen = "0.0.0.0:8080"\nallow_unauthenticated = true\n')
    assert main(["check-config", "--config", str(config)]) == 0
    assert "no token, allow_unauthenticated" in capsys.readouterr().out

    path = token_file(tmp_path)
    config.write_text(body + f'listen = "0.0.0.0:8080"\ntoken_file = "{path}"\n')
    assert main(["check-config", "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    assert f"token set (from {path}), at most 64 connections" in out
    assert TOKEN not in out + err


def status_args(**kw: object) -> argparse.Namespace:
    values: dict[str, object] = dict(url=None, config=None, default_config="none.toml",
                                     all=False, json=False, timeout=5.0, token_file=None)
    values.update(kw)
    return argparse.Namespace(**values)


async def status_cli(args: argparse.Namespace) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()

    def run() -> int:
        real, sys.stderr = sys.stderr, err
        try:
            return run_status(args, out)
        finally:
            sys.stderr = real

    code = await trio.to_thread.run_sync(run)
    return code, out.getvalue(), err.getvalue()


async def test_status_cli_sends_the_token(nursery: trio.Nursery, database: str,
                                          tmp_path: Path, no_token_env: None,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = token_file(tmp_path)
    _, port = await start(nursery, database, f'token_file = "{path}"\n')
    url = f"http://127.0.0.1:{port}"

    code, out, err = await status_cli(status_args(url=url))
    assert code == EXIT_UNAUTHORIZED and out == ""
    assert err.startswith(f"backfilld: {url}: the daemon requires a status token: none was "
                          "sent; give --token-file PATH")

    code, out, err = await status_cli(status_args(url=url, token_file=str(path)))
    assert (code, err) == (0, "") and out.startswith(f"backfilld t1 at {url}: HEALTHY")

    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token\n")
    code, _, err = await status_cli(status_args(url=url, token_file=str(wrong)))
    assert code == EXIT_UNAUTHORIZED and "refused the token from --token-file" in err

    code, _, err = await status_cli(status_args(url=url, token_file=str(tmp_path / "no")))
    assert code == 2 and "--token-file: cannot read: No such file" in err

    # the daemon's own config: its listen gives the address, its token_file the token
    config = tmp_path / "daemon.toml"
    config.write_text(f'[status]\nlisten = "0.0.0.0:{port}"\ntoken_file = "{path}"\n')
    code, out, _ = await status_cli(status_args(config=str(config)))
    assert code == 0 and out.startswith(f"backfilld t1 at {url}: HEALTHY")
    # ...also found as the default config file
    code, out, _ = await status_cli(status_args(default_config=str(config)))
    assert code == 0
    # but a config's token goes only where that config points, or with an explicit --config
    code, _, err = await status_cli(status_args(url=url, default_config=str(config)))
    assert code == EXIT_UNAUTHORIZED and "none was sent" in err
    code, _, _ = await status_cli(status_args(url=url, config=str(config)))
    assert code == 0

    monkeypatch.setenv(STATUS_TOKEN_ENV, TOKEN)
    code, _, err = await status_cli(status_args(url=url))
    assert (code, err) == (0, "")
    # --token-file outranks the environment
    code, _, err = await status_cli(status_args(url=url, token_file=str(wrong)))
    assert code == EXIT_UNAUTHORIZED
    for text in (out, err):
        assert TOKEN not in text


def test_status_cli_token_sources_without_a_daemon(tmp_path: Path) -> None:
    url = "http://127.0.0.1:1"
    assert resolve_target(status_args(url=url), env={}) == Target(url)
    target = resolve_target(status_args(url=url), env={STATUS_TOKEN_ENV: f" {TOKEN}\n"})
    assert (target.token, target.token_source) == (Secret(TOKEN), f"${STATUS_TOKEN_ENV}")
    target = resolve_target(status_args(url=url, token_file=str(token_file(tmp_path))),
                            env={STATUS_TOKEN_ENV: "other"})
    assert (target.token, target.token_source) == (Secret(TOKEN), "--token-file")
    # the config's token_file is not read when a higher source gives the token, so a config
    # whose token file only the daemon may read still gives the address
    config = tmp_path / "daemon.toml"
    config.write_text(f'[status]\nlisten = "[::]:8081"\ntoken_file = "{tmp_path / "no"}"\n')
    target = resolve_target(status_args(config=str(config)), env={STATUS_TOKEN_ENV: TOKEN})
    assert target == Target("http://[::1]:8081", Secret(TOKEN), f"${STATUS_TOKEN_ENV}")
    with pytest.raises(ConfigError, match="status.token_file"):
        resolve_target(status_args(config=str(config)), env={})
    for bad in ("two words", "naïve", ""):
        path = tmp_path / "bad"
        path.write_text(bad)
        with pytest.raises(ConfigError, match="--token-file") as info:
            resolve_target(status_args(url=url, token_file=str(path)), env={})
        assert not bad or bad not in str(info.value)
    with pytest.raises(ConfigError, match=STATUS_TOKEN_ENV):
        resolve_target(status_args(url=url), env={STATUS_TOKEN_ENV: "two words"})


async def test_the_dashboard_page_is_open_and_its_data_is_not(
        nursery: trio.Nursery, database: str, tmp_path: Path) -> None:
    _, port = await start(nursery, database, f'token_file = "{token_file(tmp_path)}"\n')
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
        for path in ("/", "/dashboard"):
            page = await http.get(path)
            assert page.status_code == 200 and page.headers["content-type"].startswith(
                "text/html")
            assert "connect-src 'self'" in page.headers["content-security-policy"]
            assert b"Authorization" in page.content and TOKEN.encode() not in page.content
        head = await http.head("/")
        assert head.status_code == 200 and head.content == b""
        assert (await http.get("/status")).status_code == 401
        assert (await http.get("/status", headers=bearer(TOKEN))).status_code == 200
