"""The daemon as systemd runs it: a real subprocess, a notify socket we own, real signals.

Each test binds the AF_UNIX datagram socket systemd would own, starts `python -m daemon run`
with `NOTIFY_SOCKET` (and `WATCHDOG_USEC`, `JOURNAL_STREAM`) pointing at it, and reads what the
daemon says while the test reloads, breaks the config and stops it. Data is compared with the
simulator's ground truth; after every stop, each series' coverage must describe exactly the
bars in the table (inside every covered span the bars equal the truth there, and no bar lies
outside the coverage).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from daemon import db
from daemon.market_calendar import et_midnight_ms
from daemon.simulator.process import free_port

from .procs import (
    duplicates,
    run_once,
    simulator,
    start_daemon,
    table,
    truth,
    write_config,
)

SEED = 5
START, END = dt.date(2024, 1, 2), dt.date(2024, 2, 29)
FROM_MS = et_midnight_ms(START)
TO_MS = et_midnight_ms(END + dt.timedelta(days=1)) - 1
WAIT = 20.0  # generous bound for any one expected event on a loaded 2-core machine


class NotifySocket:
    """The service manager's end: a datagram socket and a thread recording what arrives."""

    def __init__(self, path: Path) -> None:
        self.address = str(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.address)
        self._sock.settimeout(0.05)
        self.messages: list[tuple[float, dict[str, str]]] = []  # (monotonic, fields)
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._done.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
            with self._lock:
                self.messages.append((time.monotonic(), fields))

    def close(self) -> None:
        self._done.set()
        self._thread.join()
        self._sock.close()

    def snapshot(self) -> list[tuple[float, dict[str, str]]]:
        with self._lock:
            return list(self.messages)

    def wait_for(self, predicate: Callable[[dict[str, str]], bool], *, after: int = 0,
                 timeout: float = WAIT) -> int:
        """Index of the first message at or after `after` matching `predicate`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, (_, fields) in enumerate(self.snapshot()[after:], start=after):
                if predicate(fields):
                    return i
            time.sleep(0.01)
        raise TimeoutError(f"no matching notification; got {self.kinds()}")

    def kinds(self) -> list[str]:
        """The state changes, in order (WATCHDOG / STATUS / EXTEND_TIMEOUT_USEC left out)."""
        keys = ("READY", "RELOADING", "STOPPING")
        return [k for _, f in self.snapshot() for k in keys if k in f]


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def backfill(symbols: list[str], timeframes: list[str], **extra: object) -> str:
    settings = {"symbols": symbols, "timeframes": timeframes, "start": START.isoformat(),
                "end": END.isoformat(), "stagger_seconds": 0.0, **extra}
    lines = [f"{k} = {v!r}".replace("'", '"') for k, v in settings.items()]
    return "[backfill]\n" + "\n".join(lines) + "\n"


def config_text(status_port: int, polygon: str, symbols: list[str], timeframes: list[str],
                **extra: object) -> str:
    # unlimited rate: the simulator's latency paces these tests, not the default 150 req/min
    return (f"requests_per_minute = 0\n{polygon}[status]\nlisten = \"127.0.0.1:{status_port}\"\n"
            "[retry]\nattempts = 8\nmin_seconds = 0.05\nmax_seconds = 1\n"
            + backfill(symbols, timeframes, **extra))


def journal_env(log: Path) -> dict[str, str]:
    """JOURNAL_STREAM naming `log`, which becomes the daemon's stderr: journald format."""
    log.touch()
    st = os.stat(log)
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def wait_until(condition: Callable[[], bool], timeout: float = WAIT, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what or condition}")


def series(url: str, symbols: list[str], timeframes: list[str]) -> dict:
    got = table(url)
    return {k: v for k, v in got.items() if k[0] in symbols and k[1] in timeframes}


def bar_count(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM bars").fetchone()
    return int(row[0]) if row else 0


def assert_coverage_consistent(url: str) -> None:
    """Inside every covered span the bars are exactly the truth; no bar is outside coverage."""
    got = table(url)
    coverage = db.read_coverage(url)
    for (symbol, tf), covered in coverage.items():
        for lo, hi in covered:
            rows = [r for r in got.get((symbol, tf), []) if lo <= r[0] < hi]
            expected = truth(SEED, [symbol], [tf], lo, hi - 1)
            assert rows == expected.get((symbol, tf), []), (symbol, tf, lo, hi)
    for key, rows in got.items():
        assert key in coverage, f"bars of {key} without coverage"
        assert all(coverage[key].contains(r[0]) for r in rows), key


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = WAIT
         ) -> tuple[int, float]:
    """Send `sig`; return (exit code, seconds to exit)."""
    sent = time.monotonic()
    proc.send_signal(sig)
    code = proc.wait(timeout=timeout)
    return code, time.monotonic() - sent


@pytest.fixture
def reaper() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- the notify sequence ------------------------------------------------------------------------


def test_notify_sequence_start_reload_bad_reload_watchdog_stop(
    database: str, tmp_path: Path, notify: NotifySocket, reaper: list
) -> None:
    port = free_port()
    with simulator(tmp_path, seed=SEED) as url:
        path = tmp_path / "config.toml"
        # refresh every 0.6 s: cycles keep coming, so "still running" is visible
        good = config_text(port, "", ["AAPL"], ["1d"], refresh_minutes=0.01)
        write_config(path, url, good)
        log = tmp_path / "daemon.log"
        proc = start_daemon(path, database, log=log, NOTIFY_SOCKET=notify.address,
                            WATCHDOG_USEC="400000", **journal_env(log))
        reaper.append(proc)
        started = time.monotonic()
        ready = notify.wait_for(lambda f: "READY" in f)
        ready_after = notify.snapshot()[ready][0] - started
        before = [f for _, f in notify.snapshot()[:ready]]
        assert before[0] == {"STATUS": "starting"}
        assert {"STATUS": "applying database migrations"} in before
        assert notify.snapshot()[ready][1] == {
            "READY": "1", "STATUS": "ready: 1 symbols x 1 timeframes"}
        # the status server listened before READY=1
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200

        # a valid reload: RELOADING=1 with MONOTONIC_USEC, then READY=1
        write_config(path, url, config_text(port, "", ["AAPL", "BRK.A"], ["1d"],
                                            refresh_minutes=0.01))
        mark = len(notify.snapshot())
        sent = time.monotonic()
        proc.send_signal(signal.SIGHUP)
        reloading = notify.wait_for(lambda f: "RELOADING" in f, after=mark)
        fields = notify.snapshot()[reloading][1]
        assert abs(int(fields["MONOTONIC_USEC"]) / 1e6 - sent) < 5  # the same CLOCK_MONOTONIC
        reready = notify.wait_for(lambda f: "READY" in f, after=reloading)
        reload_seconds = notify.snapshot()[reready][0] - sent

        # a broken reload: refused in one line naming file, line and key; READY=1 again
        broken = good.replace('timeframes = ["1d"]', 'timeframes = ["1d", "7x"]')
        write_config(path, url, broken)
        line = broken.count("\n", 0, broken.index("timeframes = ")) + 4  # write_config adds 3
        mark = len(notify.snapshot())
        proc.send_signal(signal.SIGHUP)
        bad = notify.wait_for(lambda f: "RELOADING" in f, after=mark)
        bad_ready = notify.wait_for(lambda f: "READY" in f, after=bad)
        status = notify.snapshot()[bad_ready][1]["STATUS"]
        assert f"LAST RELOAD FAILED (old config kept): {path}:{line}: key 'backfill.timeframes'" \
            in status
        report = httpx.get(f"http://127.0.0.1:{port}/status", timeout=5).json()
        assert report["config"]["last_reload_error"].startswith(
            f"{path}:{line}: key 'backfill.timeframes'")
        assert report["config"]["generation"] == 2  # the good reload counted, the bad one not
        # still working on the old config: later cycles finish
        seen = _cycle_numbers(notify)
        notify.wait_for(lambda f: _cycle_of(f) > max(seen), after=bad_ready)

        # watchdog: a ping every WATCHDOG_USEC / 2 = 0.2 s since READY=1
        pings = [t for t, f in notify.snapshot() if "WATCHDOG" in f]
        assert pings and pings[0] >= notify.snapshot()[ready][0]
        gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
        assert len(pings) >= 5 and max(gaps) < 0.4, gaps  # never a whole WATCHDOG_USEC

        code, stop_seconds = stop(proc)
    assert code == 0, log.read_text()[-3000:]
    assert notify.kinds() == ["READY", "RELOADING", "READY", "RELOADING", "READY", "STOPPING"]
    text = log.read_text()
    # journald format: a priority on every line, no timestamps
    assert all(re.match(r"<[0-7]>", line) for line in text.splitlines()), text[:2000]
    assert (f"<3>reload failed, keeping the running config: {path}:{line}: "
            "key 'backfill.timeframes'") in text
    assert "<6>reload: symbols + BRK.A" in text
    print(f"\nREADY after {ready_after:.2f} s, reload applied in {reload_seconds * 1000:.0f} ms,"
          f" stop in {stop_seconds:.2f} s, {len(pings)} pings, max gap {max(gaps):.3f} s")


def _cycle_of(fields: dict[str, str]) -> int:
    match = re.match(r"(?:cycle|idle: cycle) (\d+)", fields.get("STATUS", ""))
    return int(match.group(1)) if match else -1


def _cycle_numbers(notify: NotifySocket) -> list[int]:
    return [_cycle_of(f) for _, f in notify.snapshot()] or [0]


def test_a_wedged_writer_stops_the_watchdog_pings(
    database: str, tmp_path: Path, notify: NotifySocket, reaper: list
) -> None:
    # The test holds an ACCESS EXCLUSIVE lock on `bars`: the writer's first page waits on it
    # inside its transaction. Pings must stop once it has waited WATCHDOG_USEC (systemd would
    # fire), and resume when the lock goes.
    with simulator(tmp_path, seed=SEED) as url, psycopg.connect(database) as blocker:
        blocker.execute("LOCK TABLE bars IN ACCESS EXCLUSIVE MODE")
        path = write_config(tmp_path / "config.toml", url,
                            config_text(free_port(), "", ["AAPL"], ["1d"]))
        log = tmp_path / "daemon.log"
        proc = start_daemon(path, database, log=log, NOTIFY_SOCKET=notify.address,
                            WATCHDOG_USEC="500000")
        reaper.append(proc)
        notify.wait_for(lambda f: "READY" in f)
        wait_until(lambda: "withholding the watchdog ping" in log.read_text(), what="a stall")
        time.sleep(0.6)  # > WATCHDOG_USEC without a ping
        released = time.monotonic()
        blocker.rollback()
        wait_until(lambda: any(t > released for t, f in notify.snapshot() if "WATCHDOG" in f),
                   what="pings again")
        wait_until(lambda: table(database) == truth(SEED, ["AAPL"], ["1d"], FROM_MS, TO_MS),
                   what="the page once unblocked")
        code, _ = stop(proc)
    assert code == 0
    pings = [t for t, f in notify.snapshot() if "WATCHDOG" in f]
    gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
    assert max(gaps) > 0.5  # longer than WATCHDOG_USEC: systemd's watchdog would have fired
    assert "watchdog pings resume" in log.read_text()


# --- reload applies live ------------------------------------------------------------------------


def test_sighup_adds_series_live_and_a_broken_config_keeps_the_old_one(
    database: str, tmp_path: Path, notify: NotifySocket, reaper: list
) -> None:
    port = free_port()
    with simulator(tmp_path, seed=SEED) as url:
        path = tmp_path / "config.toml"
        polygon = "page_limit = 5000\n"
        write_config(path, url, config_text(port, polygon, ["AAPL"], ["1d"]))
        log = tmp_path / "daemon.log"
        proc = start_daemon(path, database, log=log, NOTIFY_SOCKET=notify.address)
        reaper.append(proc)
        expected = truth(SEED, ["AAPL"], ["1d"], FROM_MS, TO_MS)
        wait_until(lambda: table(database) == expected, what="AAPL 1d")

        # add a symbol and a timeframe: they arrive, without a restart (same process)
        symbols, timeframes = ["AAPL", "X:BTCUSD"], ["1d", "1h"]
        write_config(path, url, config_text(port, polygon, symbols, timeframes))
        sent = time.monotonic()
        proc.send_signal(signal.SIGHUP)
        expected = truth(SEED, symbols, timeframes, FROM_MS, TO_MS)
        wait_until(lambda: table(database) == expected, what="the added series")
        arrived = time.monotonic() - sent
        assert proc.poll() is None

        # a broken config: refused, the old one keeps running (a later reload still applies)
        write_config(path, url, config_text(port, polygon, symbols, timeframes)
                     + "max_concurrent_symbols = 0\n")
        mark = len(notify.snapshot())
        proc.send_signal(signal.SIGHUP)
        notify.wait_for(lambda f: "LAST RELOAD FAILED" in f.get("STATUS", ""), after=mark)
        report = httpx.get(f"http://127.0.0.1:{port}/status", timeout=5).json()
        error = report["config"]["last_reload_error"]
        assert re.match(rf"{re.escape(str(path))}:\d+: key 'backfill.max_concurrent_symbols'",
                        error)
        assert report["config"]["symbols"] == 2 and report["config"]["timeframes"] == ["1d", "1h"]
        assert proc.poll() is None

        symbols = ["AAPL", "X:BTCUSD", "BRK.A"]
        write_config(path, url, config_text(port, polygon, symbols, timeframes))
        proc.send_signal(signal.SIGHUP)
        expected = truth(SEED, symbols, timeframes, FROM_MS, TO_MS)
        wait_until(lambda: table(database) == expected, what="BRK.A after the fix")
        report = httpx.get(f"http://127.0.0.1:{port}/status", timeout=5).json()
        assert report["config"]["last_reload_error"] is None

        code, _ = stop(proc)
    assert code == 0
    assert duplicates(database) == 0
    assert_coverage_consistent(database)
    print(f"\nadded series complete {arrived:.2f} s after SIGHUP")


# --- stopping -----------------------------------------------------------------------------------

STOP_SYMBOLS = ["AAPL", "X:BTCUSD", "BRK.B"]
STOP_TIMEFRAMES = ["1h", "15m"]
# ~16 pages per series at ~100 ms each, 2 in flight: a few seconds of backfill to interrupt.
STOP_POLYGON = "page_limit = 3000\nmax_in_flight = 2\n"


def _start_backfill(database: str, tmp_path: Path, url: str, notify: NotifySocket,
                    reaper: list) -> tuple[subprocess.Popen[bytes], Path, Path]:
    path = write_config(tmp_path / "config.toml", url,
                        config_text(free_port(), STOP_POLYGON, STOP_SYMBOLS, STOP_TIMEFRAMES,
                                    overlap_bars=0))
    log = tmp_path / "daemon.log"
    proc = start_daemon(path, database, log=log, NOTIFY_SOCKET=notify.address)
    reaper.append(proc)
    notify.wait_for(lambda f: "READY" in f)
    wait_until(lambda: bar_count(database) > 0, what="the first page")
    return proc, path, log


def test_sigterm_mid_backfill_exits_0_consistent_then_restart_completes_exactly(
    database: str, tmp_path: Path, notify: NotifySocket, reaper: list
) -> None:
    total = sum(map(len, truth(SEED, STOP_SYMBOLS, STOP_TIMEFRAMES, FROM_MS, TO_MS).values()))
    with simulator(tmp_path, seed=SEED, latency_ms="50-150") as url:
        proc, path, log = _start_backfill(database, tmp_path, url, notify, reaper)
        time.sleep(0.5)
        requests_before = _sim_requests(url)
        code, stop_seconds = stop(proc)
        requests_after = _sim_requests(url)
        assert code == 0, log.read_text()[-3000:]
        assert notify.kinds()[-1] == "STOPPING"
        at_stop = bar_count(database)
        assert 0 < at_stop < total  # it was mid-backfill
        # no request started after SIGTERM: only the ones in flight (2 at most) were answered
        assert requests_after - requests_before <= 2
        assert_coverage_consistent(database)
        assert "stopping: finishing in-flight pages" in log.read_text()

        assert run_once(path, database, log=tmp_path / "restart.log") == 0
    assert table(database) == truth(SEED, STOP_SYMBOLS, STOP_TIMEFRAMES, FROM_MS, TO_MS)
    assert duplicates(database) == 0
    assert_coverage_consistent(database)
    print(f"\nSIGTERM mid-backfill ({at_stop}/{total} bars): exit 0 in {stop_seconds:.2f} s")


def test_second_sigint_exits_at_once_with_consistent_data(
    database: str, tmp_path: Path, notify: NotifySocket, reaper: list
) -> None:
    # Slow pages (1-2 s each): the graceful path would wait for them; the second ^C does not.
    with simulator(tmp_path, seed=SEED, latency_ms="1000-2000") as url:
        proc, _, log = _start_backfill(database, tmp_path, url, notify, reaper)
        proc.send_signal(signal.SIGINT)
        notify.wait_for(lambda f: "STOPPING" in f)
        code, seconds = stop(proc, signal.SIGINT)
    assert code == 130, log.read_text()[-3000:]
    assert seconds < 1.0  # not the 1-2 s a page in flight would take
    assert "second interrupt: stopping now" in log.read_text()
    assert_coverage_consistent(database)
    print(f"\nsecond SIGINT: exit 130 in {seconds:.2f} s")


def _sim_requests(url: str) -> int:
    return int(httpx.get(f"{url}/__stats", timeout=5).json()["requests"])
