"""sd_notify over a real datagram socket, the watchdog on MockClock, and the unit file.

The protocol tests bind the AF_UNIX SOCK_DGRAM socket systemd would own (a path, and an `@`
abstract address) and read what `Notifier` sends. The watchdog tests run on
`MockClock(autojump_threshold=0)` with a writer whose statistics the test scripts, so the ping
times are exact. The unit file is parsed with systemd's own rules (repeated keys accumulate) and,
where `systemd-analyze` exists, verified by it.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing
from loguru import logger

from daemon import app, reload, systemd
from daemon.compose import build
from daemon.config import parse_config
from daemon.cycles import SchedulerState, SymbolState
from daemon.jobs import JobOutcome
from daemon.systemd import Notifier, run_status_updates, run_watchdog, status_text
from daemon.writer import WriterStatistics

from . import snapshots

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "backfilld.service"


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket standing in for systemd's notify socket: (address, socket)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(2)
    yield str(path), sock
    sock.close()


def received(sock: socket.socket) -> list[str]:
    """Every datagram waiting on `sock`, decoded."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(2)
    return out


# --- the protocol -----------------------------------------------------------------------------


def test_notify_sends_one_datagram_of_assignments_in_order(manager) -> None:
    address, sock = manager
    notifier = Notifier(address)
    assert notifier.enabled
    assert notifier.notify(READY=1, STATUS="cycle 1: 3/4 symbols done")
    assert notifier.notify(RELOADING=1, MONOTONIC_USEC=123)
    assert notifier.notify(STATUS="line one\nline two")  # one assignment per line
    assert received(sock) == [
        "READY=1\nSTATUS=cycle 1: 3/4 symbols done",
        "RELOADING=1\nMONOTONIC_USEC=123",
        "STATUS=line one line two",
    ]
    notifier.close()


def test_abstract_namespace_address() -> None:
    name = f"backfilld-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        notifier = Notifier("@" + name)
        assert notifier.notify(STOPPING=1)
        assert sock.recv(4096) == b"STOPPING=1"
        notifier.close()


def test_from_environment_reads_and_unsets(manager) -> None:
    address, sock = manager
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid()),
           "OTHER": "kept"}
    notifier = Notifier.from_environment(env)
    assert env == {"OTHER": "kept"}  # children (the embedded PostgreSQL) must not inherit them
    assert notifier.enabled and notifier.watchdog_usec == 20_000_000
    assert notifier.watchdog_interval == 10.0
    assert notifier.notify(WATCHDOG=1)
    assert received(sock) == ["WATCHDOG=1"]
    notifier.close()


def test_watchdog_for_another_pid_is_not_ours() -> None:
    env = {"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    assert Notifier.from_environment(env).watchdog_usec is None


def test_no_notify_socket_is_a_no_op() -> None:
    notifier = Notifier.from_environment({})
    assert not notifier.enabled and notifier.watchdog_interval is None
    assert notifier.notify(READY=1) is False
    assert notifier.sent == 0


def test_a_vanished_manager_is_a_warning_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "gone.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
    notifier = Notifier(str(path))  # the file is there, nobody reads it
    assert notifier.notify(READY=1) is False
    assert notifier.notify(WATCHDOG=1) is False
    notifier.close()
    assert Notifier("vsock:2:1234").enabled is False


def test_monotonic_usec_is_clock_monotonic() -> None:
    before = time.clock_gettime(time.CLOCK_MONOTONIC)
    usec = systemd.monotonic_usec()
    after = time.clock_gettime(time.CLOCK_MONOTONIC)
    assert before * 1e6 - 1 <= usec <= after * 1e6 + 1


# --- the watchdog -----------------------------------------------------------------------------


class RecordingNotifier(Notifier):
    def __init__(self) -> None:
        super().__init__(None)
        self.messages: list[tuple[float, dict[str, object]]] = []

    def notify(self, **fields: object) -> bool:
        self.messages.append((trio.current_time(), fields))
        return True

    def times(self, key: str) -> list[float]:
        return [t for t, fields in self.messages if key in fields]


@attrs.define
class ScriptedWriter:
    """Writer statistics whose `busy_since` the test sets."""

    busy_since: float | None = None

    def statistics(self) -> WriterStatistics:
        return WriterStatistics(
            connected=True, queue_depth=0, queue_capacity=8, pages_written=0, bars_written=0,
            transactions=0, write_errors=0, reconnects=0, last_write_seconds=None,
            busy_since=self.busy_since, last_progress=0.0,
        )


async def test_watchdog_pings_every_half_timeout(autojump_clock: trio.abc.Clock) -> None:
    notifier, writer = RecordingNotifier(), ScriptedWriter()
    t0 = trio.current_time()
    with trio.move_on_after(32):
        await run_watchdog(notifier, writer.statistics, interval=5.0, stall_seconds=10.0)
    assert [t - t0 for t in notifier.times("WATCHDOG")] == [0, 5, 10, 15, 20, 25, 30]


async def test_busy_writer_within_bound_still_pinged(autojump_clock: trio.abc.Clock) -> None:
    # one long transaction (9 s) under the 10 s bound: pings go on
    notifier, writer = RecordingNotifier(), ScriptedWriter()
    t0 = trio.current_time()

    async def long_write() -> None:
        await trio.sleep(3)
        writer.busy_since = trio.current_time()
        await trio.sleep(9)
        writer.busy_since = None

    async with trio.open_nursery() as nursery:
        nursery.start_soon(long_write)
        with trio.move_on_after(21):
            await run_watchdog(notifier, writer.statistics, interval=5.0, stall_seconds=10.0)
    assert [t - t0 for t in notifier.times("WATCHDOG")] == [0, 5, 10, 15, 20]


async def test_wedged_writer_lets_the_watchdog_fire(autojump_clock: trio.abc.Clock) -> None:
    # WATCHDOG_USEC = 10 s: pings every 5 s; the writer enters a call at t=12 that returns at
    # t=37. Pings stop once it has been busy > 10 s (t=25: 13 s) and resume at t=40.
    notifier, writer = RecordingNotifier(), ScriptedWriter()
    t0 = trio.current_time()

    async def wedge() -> None:
        await trio.sleep(12)
        writer.busy_since = trio.current_time()
        await trio.sleep(25)
        writer.busy_since = None

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wedge)
        with trio.move_on_after(46):
            await run_watchdog(notifier, writer.statistics, interval=5.0, stall_seconds=10.0)
    pings = [t - t0 for t in notifier.times("WATCHDOG")]
    assert pings == [0, 5, 10, 15, 20, 40, 45]
    # systemd would have fired: 20 s without a ping is past WatchdogSec (10 s)
    assert max(b - a for a, b in zip(pings, pings[1:], strict=False)) > 10


async def test_watchdog_defaults_come_from_watchdog_usec(autojump_clock: trio.abc.Clock
                                                          ) -> None:
    # WATCHDOG_USEC = 4 s: pings every 2 s; a writer busy for more than 4 s is wedged.
    notifier = RecordingNotifier()
    notifier.watchdog_usec = 4_000_000
    wedged = ScriptedWriter()
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_watchdog, notifier, wedged.statistics)
        await trio.sleep(3)
        wedged.busy_since = trio.current_time()  # t=3; > 4 s busy from t=7 on
        await trio.sleep(8.5)
        nursery.cancel_scope.cancel()
    assert [t - t0 for t in notifier.times("WATCHDOG")] == [0, 2, 4, 6]
    with pytest.raises(ValueError, match="no watchdog"):
        await run_watchdog(RecordingNotifier(), wedged.statistics)


# --- STATUS= ------------------------------------------------------------------------------


def test_status_text_running_idle_stopping_and_failed_reload() -> None:
    jobs = (snapshots.job("A", JobOutcome.OK),
            snapshots.job("D", JobOutcome.FAILED, "ApiServerError: 503"),
            snapshots.job("B", None))
    states = {"A": SymbolState.DONE, "B": SymbolState.RUNNING, "C": SymbolState.QUEUED,
              "D": SymbolState.FAILED}
    running = snapshots.cycle(symbols=states, jobs=jobs)
    assert status_text(snapshots.snapshot(cycle=running, bars_written=1234)) == (
        "cycle 3 (schedule): 2/4 symbols done, 1 running, 2 jobs done, 1 failed; "
        "1234 bars written")
    finished = snapshots.cycle(symbols=states, jobs=jobs, finished=141.0)
    idle = snapshots.snapshot(now=200.0, last_cycle=finished, next_cycle_at=3740.0,
                              bars_written=5)
    assert status_text(idle) == (
        "idle: cycle 3 took 41 s, 3 jobs, 1 failed; next in 59 min; 5 bars written")
    text = status_text(snapshots.snapshot(
        state=SchedulerState.STOPPING, reload_error="/etc/backfilld/config.toml:7: key 'x': bad"))
    assert text.startswith("stopping: finishing in-flight pages; starting; 0 bars written")
    assert text.endswith("LAST RELOAD FAILED (old config kept): "
                         "/etc/backfilld/config.toml:7: key 'x': bad")


async def test_status_updates_only_when_changed(autojump_clock: trio.abc.Clock) -> None:
    notifier = RecordingNotifier()
    texts = iter(["a", "a", "b", "b", "b", "c"])
    t0 = trio.current_time()
    with trio.move_on_after(5.5):
        await run_status_updates(notifier, lambda: next(texts, "c"), every=1.0)
    assert [(t - t0, f["STATUS"]) for t, f in notifier.messages] == [(0, "a"), (2, "b"),
                                                                      (5, "c")]


async def test_start_timeout_extender(autojump_clock: trio.abc.Clock) -> None:
    notifier = RecordingNotifier()
    t0 = trio.current_time()
    with trio.move_on_after(25):
        await systemd.run_start_timeout_extender(notifier)
    assert [(t - t0, f) for t, f in notifier.messages] == [
        (0, {"EXTEND_TIMEOUT_USEC": 30_000_000}), (10, {"EXTEND_TIMEOUT_USEC": 30_000_000}),
        (20, {"EXTEND_TIMEOUT_USEC": 30_000_000})]


@pytest.fixture
def _restore_logging() -> Iterator[None]:
    yield  # a reload calls setup_logging: give the other tests loguru's default sink back
    logger.remove()
    logger.configure(patcher=None)
    logger.add(sys.stderr)


@pytest.mark.usefixtures("_restore_logging")
async def test_reload_applies_rate_and_concurrency_live_and_notifies(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[backfill]\nsymbols = ["A"]\n')
    notifier = RecordingNotifier()
    parts = build(parse_config(path.read_text(), env={}), "postgresql://unused",
                  config_path=path, notifier=notifier)
    path.write_text('[polygon]\nrequests_per_minute = 600\nmax_in_flight = 4\n'
                    '[backfill]\nsymbols = ["A", "B"]\nmax_concurrent_symbols = 7\n')
    assert parts.controls.reload()
    snap = parts.snapshot()
    assert snap.limiter.configured_per_minute == 600 and snap.limiter.max_in_flight == 4
    assert snap.scheduler.symbol_slots == 7
    assert snap.config.backfill.symbols == ("A", "B") and snap.reload.generation == 2
    (_, reloading), (_, ready) = notifier.messages
    assert list(reloading) == ["RELOADING", "MONOTONIC_USEC", "STATUS"]
    assert abs(int(str(reloading["MONOTONIC_USEC"])) - systemd.monotonic_usec()) < 5_000_000
    assert ready["READY"] == 1

    # a bad file: refused, the running config stays, READY=1 all the same
    notifier.messages.clear()
    path.write_text('[backfill]\nsymbols = ["A"]\nmax_concurrent_symbols = "many"\n')
    assert not parts.controls.reload()
    snap = parts.snapshot()
    assert snap.scheduler.symbol_slots == 7
    assert snap.config.backfill.symbols == ("A", "B") and snap.reload.generation == 2
    assert snap.reload.last_error == (
        f"{path}:3: key 'backfill.max_concurrent_symbols': expected a whole number from 1 to "
        "1000")
    assert [list(f)[0] for _, f in notifier.messages] == ["RELOADING", "READY"]
    assert snap.reload.last_error in str(notifier.messages[-1][1]["STATUS"])

    # once stopping, a reload is ignored (and systemd hears nothing about it)
    notifier.messages.clear()
    parts.controls.stop()
    assert not parts.controls.reload()
    assert [list(f)[0] for _, f in notifier.messages] == ["STOPPING"]
    assert parts.limiter.closed


def test_reload_change_summary() -> None:
    old = parse_config('[backfill]\nsymbols = ["A", "B"]\ntimeframes = ["1d"]\n', env={})
    new = parse_config('[polygon]\nrequests_per_minute = 300\napi_key = "k2"\n'
                       '[backfill]\nsymbols = ["A", "C"]\ntimeframes = ["1d", "5m"]\n'
                       '[status]\nlisten = "127.0.0.1:9"\n', env={})
    assert reload.describe_changes(old, new) == [
        "symbols + C", "symbols - B (stop after their current page)", "timeframes + 5m",
        "polygon.api_key ***", "polygon.requests_per_minute 150.0 -> 300.0"]
    assert reload.restart_only_changes(old, new) == ["[status] (listen, token, connection cap)"]


# --- the unit file ----------------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd.syntax(7): [Section], Key=Value, `#`/`;` comments, repeated keys accumulate,
    an empty assignment resets the list (kept here as an empty string)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        header = re.fullmatch(r"\[([A-Za-z]+)\]", line)
        if header:
            current = sections.setdefault(header.group(1), {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None and re.fullmatch(r"[A-Za-z]+", key.strip()), (
            f"line {number} is not Key=Value inside a section: {raw!r}")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, value
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)


def test_unit_has_the_required_directives() -> None:
    unit = parse_unit(UNIT.read_text())
    service = {k: v[-1] for k, v in unit["Service"].items()}
    assert service["Type"] == "notify"
    assert re.fullmatch(r"/\S+/backfilld run --config /etc/backfilld/config\.toml",
                        service["ExecStart"])
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["Restart"] == "on-failure"
    assert {"StartLimitIntervalSec", "StartLimitBurst"} <= unit["Unit"].keys()
    assert service["StateDirectory"] == "backfilld"
    assert service["DynamicUser"] == "yes"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "ProtectHome": "yes", "PrivateTmp": "yes"}.items():
        assert service[key] == value, key
    assert service["CapabilityBoundingSet"] == ""
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert service["LoadCredential"].startswith("polygon-api-key:/etc/backfilld/")
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    # Stopping must finish well inside TimeoutStopSec, or systemd SIGKILLs a clean stop.
    stop = _seconds(service["TimeoutStopSec"])
    assert app.GRACE_SECONDS + app.WRITER_DRAIN_SECONDS + 5 <= stop
    # The watchdog: pings every WatchdogSec / 2, the writer may be busy WatchdogSec at most.
    assert 10 <= _seconds(service["WatchdogSec"]) <= 300


def _unit_for_this_machine(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at the installed console script (verify checks it)."""
    script = shutil.which("backfilld") or str(Path(sys.executable).with_name("backfilld"))
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={script}", UNIT.read_text(), flags=re.M)
    path = tmp_path / "backfilld.service"
    path.write_text(text)
    return path


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed here")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = _unit_for_this_machine(tmp_path)
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)
    # verify exits 0 on unknown keys and bad values too: any output at all is a finding.
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), (
        done.stdout + done.stderr)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed here")
def test_systemd_analyze_security_exposure_is_low(tmp_path: Path) -> None:
    unit = _unit_for_this_machine(tmp_path)
    done = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager",
                           str(unit)], capture_output=True, text=True, timeout=30, cwd=tmp_path)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    if match is None:  # systemd < 250 has no --offline
        pytest.skip(f"systemd-analyze security --offline unsupported: {done.stderr.strip()}")
    assert float(match.group(1)) <= 2.0, done.stdout
