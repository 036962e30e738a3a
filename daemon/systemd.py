"""Talking to systemd: sd_notify(3) messages, the watchdog, and the one-line STATUS.

What the service manager hears from us, in order (see `daemon.app.serve`):

    STATUS=starting ...                      while the embedded PostgreSQL / migrations start
    EXTEND_TIMEOUT_USEC=...                  every 10 s while migrations run (they may be long)
    READY=1 + STATUS=...                     writer connected, status server listening
    WATCHDOG=1                               every WATCHDOG_USEC / 2, while we make progress
    STATUS=cycle 3 (schedule): ...           whenever the one-line summary changes (<= 1/s)
    RELOADING=1 + MONOTONIC_USEC=... + STATUS=reloading ...   on SIGHUP
    READY=1 + STATUS=...                     the reload applied, or refused (old config kept)
    STOPPING=1 + STATUS=stopping ...         on SIGTERM / SIGINT, and when `run` returns

`Notifier` is a plain AF_UNIX datagram socket aimed at `$NOTIFY_SOCKET` (a path, or `@name` in
the abstract namespace); without `$NOTIFY_SOCKET` every call is a no-op, so the daemon runs the
same under a terminal, in tests and under systemd. The variables are removed from the
environment when read, so the embedded PostgreSQL (itself sd_notify-aware) never talks to our
service manager.

The watchdog ping is a promise that the daemon works, not only that it is alive. It comes from
a trio task, so a blocked event loop sends none; and it is withheld while the writer has been
inside one database call for longer than `stall_seconds` (a wedged writer: a lock that never
comes, a connection that hangs), so systemd's WatchdogSec fires and restarts us.

Error handling: sending never raises. A manager that went away, a full socket buffer (the send
waits at most SEND_TIMEOUT_SECONDS) or a bad address is logged once as a warning and the
message dropped: a notification must never take the daemon down.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, MutableMapping

import trio
from loguru import logger

from .cycles import SchedulerState, SymbolState
from .snapshot import Snapshot
from .writer import WriterStatistics

__all__ = [
    "EXTEND_EVERY_SECONDS",
    "Notifier",
    "STATUS_EVERY_SECONDS",
    "monotonic_usec",
    "run_start_timeout_extender",
    "run_status_updates",
    "run_watchdog",
    "status_text",
    "writer_stall",
]

# A blocking send to the manager's socket waits at most this long (only when its buffer is
# full, i.e. the manager is not reading): bounded so the event loop can never hang on it.
SEND_TIMEOUT_SECONDS = 0.5
# STATUS= is recomputed this often and sent only when it changed (systemctl status shows it).
STATUS_EVERY_SECONDS = 1.0
# During migrations, ask for this much more start time, this often (TimeoutStartSec is 120 s in
# the shipped unit; a migration rewriting a big table can take longer, and that is not a hang).
EXTEND_EVERY_SECONDS = 10.0
EXTEND_BY_SECONDS = 30.0
_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as `RELOADING=1` wants it in `MONOTONIC_USEC=`."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends sd_notify messages to one address; a no-op when the address is None.

    Args:
        address: `$NOTIFY_SOCKET`: a filesystem path, or `@name` for the abstract namespace.
        watchdog_usec: `$WATCHDOG_USEC` when the watchdog is meant for this process, else None.

    Use `Notifier.from_environment()` in the daemon; tests build one with their own address.
    """

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._target: str | None = None
        self._warned = False
        self.sent: int = 0
        if address:
            if address.startswith("@"):
                self._target = "\0" + address[1:]
            elif address.startswith("/"):
                self._target = address
            else:  # vsock:CID:PORT (systemd >= 253, for VMs) and the like: not for a daemon
                logger.warning("NOTIFY_SOCKET={!r} is not a Unix socket address: not notifying",
                               address)

    @classmethod
    def from_environment(
        cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = True
    ) -> Notifier:
        """Read `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID` (and remove them).

        The watchdog is ours only when WATCHDOG_PID is unset or our pid, as in
        sd_watchdog_enabled(3).
        """
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        usec: int | None = None
        try:
            usec = int(env.get("WATCHDOG_USEC", "")) or None
            pid = env.get("WATCHDOG_PID")
            if pid and int(pid) != os.getpid():
                usec = None
        except ValueError:
            usec = None
        if unset:
            for name in _ENV:
                env.pop(name, None)
        return cls(address, watchdog_usec=usec)

    @property
    def enabled(self) -> bool:
        return self._target is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises)."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def notify(self, **fields: object) -> bool:
        """Send one datagram `KEY=VALUE\\n...` in the order given; True when it was sent.

        Values are sent as str; newlines in a value (an error message in STATUS=) become
        spaces, since each line of the datagram is one assignment.
        """
        if self._target is None:
            return False
        data = "\n".join(
            f"{key}={str(value).replace(chr(10), ' ')}" for key, value in fields.items()
        ).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.settimeout(SEND_TIMEOUT_SECONDS)
            self._sock.sendto(data, self._target)
        except OSError as exc:  # includes a full buffer (TimeoutError) and a vanished manager
            if not self._warned:
                self._warned = True
                logger.warning("cannot notify the service manager at {}: {}", self.address, exc)
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        """Close the socket (the process is done notifying). Idempotent."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def status_text(snap: Snapshot) -> str:
    """The one line `systemctl status` shows: what the daemon is doing right now.

    e.g. `cycle 3 (schedule): 4/10 symbols done, 3 running, 12 jobs done, 0 failed; 1234567
    bars written` or `idle: cycle 3 took 41 s, 50 jobs, 0 failed; next in 59 min; ...`.
    """
    sched = snap.scheduler
    cycle, last_cycle = sched.cycle, sched.last_cycle
    if cycle is not None:
        states = list(cycle.symbols.values())
        done = sum(s in (SymbolState.DONE, SymbolState.FAILED) for s in states)
        running = states.count(SymbolState.RUNNING)
        text = (f"cycle {cycle.number} ({cycle.trigger}): {done}/{len(states)} symbols done, "
                f"{running} running, {cycle.jobs_done} jobs done, {len(cycle.failed)} failed")
    elif last_cycle is not None and last_cycle.finished is not None:
        took = last_cycle.finished - last_cycle.started
        text = (f"idle: cycle {last_cycle.number} took {took:.0f} s, {len(last_cycle.jobs)} "
                f"jobs, {len(last_cycle.failed)} failed")
        if sched.next_cycle_at is not None:
            text += f"; next in {max(0.0, sched.next_cycle_at - snap.now) / 60:.0f} min"
    else:
        text = "starting"
    text += f"; {snap.writer.bars_written} bars written"
    breaker = snap.breaker
    if breaker.open_since is not None:
        text += (f"; API UNAVAILABLE: circuit {breaker.state.value} for "
                 f"{snap.now - breaker.open_since:.0f} s, {breaker.probes} probe(s)")
    if sched.state is SchedulerState.STOPPING:
        text = "stopping: finishing in-flight pages; " + text
    if snap.reload.last_error is not None:
        text += f"; LAST RELOAD FAILED (old config kept): {snap.reload.last_error}"
    return text


# --- tasks --------------------------------------------------------------------------------


def writer_stall(stats: WriterStatistics, now: float) -> float:
    """How long the writer has been inside its current database call (0 when it is not)."""
    return 0.0 if stats.busy_since is None else max(0.0, now - stats.busy_since)


async def run_watchdog(
    notifier: Notifier,
    writer_statistics: Callable[[], WriterStatistics],
    *,
    interval: float | None = None,
    stall_seconds: float | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Send `WATCHDOG=1` every `interval` seconds, first at once, while work makes progress.

    A tick at which the writer has been busy for more than `stall_seconds` sends nothing (and
    logs why, once per stall), so systemd's watchdog fires; pings resume on the first tick after
    the writer moves again. Ticks keep to a fixed grid (`start + k * interval`), so a slow send
    never drifts the schedule. By default both come from the notifier: pings every
    WATCHDOG_USEC / 2, and a writer inside one call for a whole WATCHDOG_USEC is wedged.
    """
    if interval is None:
        interval = notifier.watchdog_interval
        if interval is None:
            raise ValueError("run_watchdog needs an interval: systemd asked for no watchdog")
    if stall_seconds is None:
        stall_seconds = 2 * interval
    task_status.started()
    next_tick = trio.current_time()
    withheld = False
    while True:
        stall = writer_stall(writer_statistics(), trio.current_time())
        if stall > stall_seconds:
            if not withheld:
                logger.error(
                    "the writer has been inside one database call for {:.0f} s: withholding "
                    "the watchdog ping so systemd restarts the service", stall)
            withheld = True
        else:
            if withheld:
                logger.warning("the writer moved again after {:.0f} s: watchdog pings resume",
                               stall)
            withheld = False
            notifier.notify(WATCHDOG=1)
        next_tick += interval
        await trio.sleep_until(next_tick)


async def run_status_updates(
    notifier: Notifier,
    describe: Callable[[], str],
    *,
    every: float = STATUS_EVERY_SECONDS,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Send `STATUS=describe()` whenever it changes, looking every `every` seconds."""
    task_status.started()
    last = None
    while True:
        text = describe()
        if text != last:
            notifier.notify(STATUS=text)
            last = text
        await trio.sleep(every)


async def run_start_timeout_extender(notifier: Notifier) -> None:
    """Ask for EXTEND_BY_SECONDS more start time every EXTEND_EVERY_SECONDS, until cancelled."""
    while True:
        notifier.notify(EXTEND_TIMEOUT_USEC=int(EXTEND_BY_SECONDS * 1e6))
        await trio.sleep(EXTEND_EVERY_SECONDS)
