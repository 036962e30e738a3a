"""The daemon: one trio process, one root nursery, tasks started in dependency order.

    root nursery
     ├─ signals     SIGHUP → reload · SIGTERM/SIGINT → graceful stop · 2nd SIGINT → stop now
     ├─ status      the HTTP status server (started after the writer)
     ├─ watchdog    WATCHDOG=1 while the writer makes progress; STATUS= updates (after READY)
     └─ work nursery
         ├─ writer     started first (connected, stage ready)
         └─ scheduler  cycles of jobs → pages → the writer's channel

systemd hears READY=1 once migrations are applied, the writer is connected and the status
server listens; RELOADING=1 / READY=1 around each SIGHUP (valid or not); STOPPING=1 on a stop
(daemon.systemd has the whole sequence).

Reload (SIGHUP): the file is read and validated again; a valid config is applied live (rate,
in-flight cap, symbols, timeframes, concurrency, retry, logging; `[database]`, `[status]` and
`state_dir` need a restart and say so), an invalid one is logged in one line (file:line: key)
and kept on `self.reload.last_error` for /status while the old config keeps running.

Shutdown follows hypercorn: on SIGTERM the rate limiter closes (no request starts any more,
retries included), in-flight pages get `GRACE_SECONDS` to arrive, then the scheduler's scope is
cancelled; the writer drains what is queued (each page a whole transaction) and the process
exits 0. Data and checkpoints are consistent at every instant anyway (one transaction per page),
so even the forced path and SIGKILL lose only work that was never committed and is fetched
again on restart.
"""

from __future__ import annotations

import functools
import signal
import time
from pathlib import Path

import attrs
import outcome
import trio
from loguru import logger

from . import db, monitoring, systemd
from .config import Config, load_config
from .errors import ConfigError
from .log import setup_logging
from .polygon import PolygonClient
from .ratelimit import RateLimiter
from .scheduler import CycleProgress, Scheduler
from .status import serve_status
from .systemd import Notifier
from .writer import Writer, open_writer_channel

__all__ = ["Daemon", "EXIT_FORCED", "GRACE_SECONDS"]

# In-flight requests get this long to land after SIGTERM. GRACE + WRITER_DRAIN + stopping the
# embedded PostgreSQL must stay below TimeoutStopSec (45 s in systemd/backfilld.service; a test
# checks it), or systemd SIGKILLs a stop that was going fine.
GRACE_SECONDS = 15.0
# The writer's extra time after the grace to commit what is queued (pages are ~50-100 ms each).
WRITER_DRAIN_SECONDS = 10.0
EXIT_FORCED = 130
# At start, how long to wait for an unreachable database before exiting 3 (a server still
# booting is waited for; a wrong URL is reported). Once running, the wait has no end.
STARTUP_DATABASE_WAIT_SECONDS = 60.0


@attrs.define
class ReloadState:
    generation: int = 1
    loaded_at: float = attrs.field(factory=time.time)
    last_error: str | None = None
    last_error_at: float | None = None


class Daemon:
    """Holds the running parts so signals, status and tests can reach them."""

    def __init__(
        self,
        config: Config,
        db_url: str,
        *,
        config_path: Path | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.notifier = notifier or Notifier(None)
        self._stopping_notified = False
        self.db_url = db_url
        self.config_path = config_path
        self.reload = ReloadState()
        self.started_at = time.time()
        self.status_port: int | None = None  # bound by daemon.status.serve_status
        self.limiter = RateLimiter(
            config.polygon.requests_per_minute, max_in_flight=config.polygon.max_in_flight
        )
        self.client = PolygonClient(config.polygon, config.retry, limiter=self.limiter)
        send, receive = open_writer_channel(config.database.queue_pages)
        self.writer = Writer(db_url, receive)
        self.scheduler = Scheduler(config, self.client, send, checkpoints=self._read_checkpoints)
        self.forced = False
        self._root: trio.Nursery | None = None
        self._work_scope = trio.CancelScope()
        self._writer_scope = trio.CancelScope()

    async def run(
        self,
        *,
        once: bool = False,
        task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
    ) -> CycleProgress | None:
        """Migrate, start the writer, then run the scheduler until stopped (or one cycle)."""
        try:
            return await self._run(once=once, task_status=task_status)
        finally:
            self._notify_stopping()

    async def _run(self, *, once: bool, task_status: trio.TaskStatus[Daemon]
                   ) -> CycleProgress | None:
        applied = await self._migrate()
        if applied:
            logger.info("applied migrations: {}", ", ".join(applied))
        abandoned = await trio.to_thread.run_sync(
            monitoring.close_abandoned_executions, self.db_url, self.config.instance)
        if abandoned:
            logger.info("marked {} unfinished execution(s) of a previous run as interrupted",
                        abandoned)
        result: CycleProgress | None = None
        async with self.client, trio.open_nursery() as root:
            self._root = root
            root.start_soon(self._handle_signals)
            async with trio.open_nursery() as work:
                await work.start(self._run_writer)
                self.status_port = await root.start(serve_status, self)
                self._ready(root)  # after the writer and the status server, before any work
                task_status.started(self)
                logger.info("backfilld running: {} symbols x {} timeframes, {} req/min",
                            len(self.config.backfill.symbols),
                            len(self.config.backfill.timeframes),
                            self.config.polygon.requests_per_minute or "unlimited")
                with self._work_scope:
                    result = await self.scheduler.run(once=once)
            root.cancel_scope.cancel()
        return result

    async def _migrate(self) -> list[str]:
        """Apply migrations in a thread; meanwhile ask systemd for more start time."""
        self.notifier.notify(STATUS="applying database migrations")
        async with trio.open_nursery() as nursery:
            if self.notifier.enabled:
                nursery.start_soon(systemd.run_start_timeout_extender, self.notifier)
            # Captured, not raised here: a DatabaseError must leave as itself, not in a group.
            result = await outcome.acapture(
                db.run_when_available, db.apply_migrations, self.db_url,
                give_up_after=STARTUP_DATABASE_WAIT_SECONDS)
            nursery.cancel_scope.cancel()
        applied: list[str] = result.unwrap()
        return applied

    def _ready(self, root: trio.Nursery) -> None:
        """READY=1, then the watchdog (when systemd asked for one) and the STATUS= updates."""
        bf = self.config.backfill
        self.notifier.notify(
            READY=1,
            STATUS=f"ready: {len(bf.symbols)} symbols x {len(bf.timeframes)} timeframes",
        )
        interval = self.notifier.watchdog_interval
        if interval is not None:
            # A writer inside one call for a whole WatchdogSec is wedged: stop vouching for it.
            root.start_soon(functools.partial(
                systemd.run_watchdog, self.notifier, self.writer.statistics,
                interval=interval, stall_seconds=2 * interval,
            ))
        if self.notifier.enabled:
            root.start_soon(systemd.run_status_updates, self.notifier, self.status_text)

    def status_text(self) -> str:
        """The one-line STATUS= for `systemctl status`."""
        next_at = self.scheduler.next_cycle_at
        return systemd.status_text(
            cycle=self.scheduler.cycle,
            last_cycle=self.scheduler.last_cycle,
            next_cycle_in=None if next_at is None else next_at - trio.current_time(),
            bars_written=self.writer.statistics().bars_written,
            stopping=self.scheduler.stopping,
            reload_error=self.reload.last_error,
        )

    def _notify_stopping(self) -> None:
        if not self._stopping_notified:
            self._stopping_notified = True
            self.notifier.notify(STOPPING=1, STATUS="stopping")

    async def _read_checkpoints(self, symbol: str) -> dict[tuple[str, str], db.Checkpoint]:
        return await db.run_when_available(db.read_checkpoints, self.db_url, symbol)

    async def _run_writer(self, *, task_status: trio.TaskStatus[None]) -> None:
        with self._writer_scope:
            await self.writer.run(task_status=task_status)

    # --- signals --------------------------------------------------------------------------

    async def _handle_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self.reload_config()
                elif signum == signal.SIGINT and self.scheduler.stopping:
                    logger.warning("second interrupt: stopping now")
                    self.force_stop()
                else:
                    self.stop()

    def stop(self) -> None:
        """Graceful stop: no new requests, in-flight pages land, the writer drains."""
        if self.scheduler.stopping:
            return
        logger.info("stopping: finishing in-flight pages (at most {:.0f} s)", GRACE_SECONDS)
        self._notify_stopping()
        self.limiter.close()
        self.scheduler.request_stop()
        now = trio.current_time()
        self._work_scope.deadline = now + GRACE_SECONDS
        self._writer_scope.deadline = now + GRACE_SECONDS + WRITER_DRAIN_SECONDS

    def force_stop(self) -> None:
        """Stop at once; the transaction in progress still commits or rolls back whole."""
        self.forced = True
        self._notify_stopping()
        self.limiter.close()
        self.scheduler.request_stop()
        self._work_scope.cancel()
        self._writer_scope.cancel()

    def reload_config(self) -> bool:
        """Re-read the config file; apply it live if valid, else keep the old one.

        systemd hears RELOADING=1 (with MONOTONIC_USEC) before and READY=1 after, whatever
        the outcome: a refused reload leaves the service running, on its old config.
        """
        if self.config_path is None:
            logger.warning("reload requested but the daemon has no config file")
            return False
        if self.scheduler.stopping:
            logger.warning("reload requested while stopping: ignored")
            return False
        self.notifier.notify(RELOADING=1, MONOTONIC_USEC=systemd.monotonic_usec(),
                             STATUS=f"reloading {self.config_path}")
        started = time.perf_counter()
        try:
            ok = self._reload()
        finally:
            self.notifier.notify(READY=1, STATUS=self.status_text())
        if ok:
            logger.info("reloaded {} in {:.1f} ms (generation {})", self.config_path,
                        (time.perf_counter() - started) * 1000, self.reload.generation)
        return ok

    def _reload(self) -> bool:
        assert self.config_path is not None
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            self.reload.last_error = str(exc)
            self.reload.last_error_at = time.time()
            logger.error("reload failed, keeping the running config: {}", exc)
            return False
        changes = describe_changes(self.config, new)
        for what in restart_only_changes(self.config, new):
            logger.warning("reload: {} changed; that takes effect only after a restart", what)
        self.config = new
        self.limiter.set_rate(new.polygon.requests_per_minute)
        self.limiter.set_max_in_flight(new.polygon.max_in_flight)
        self.client.update(new.polygon, new.retry)
        self.scheduler.update_config(new)
        setup_logging(new.logging.level, new.logging.format)
        self.reload.generation += 1
        self.reload.loaded_at = time.time()
        self.reload.last_error = None
        self.reload.last_error_at = None
        logger.info("reload: {}", ", ".join(changes) or "no change")
        return True


def describe_changes(old: Config, new: Config) -> list[str]:
    """What a reload changes that is applied live, for one log line."""
    changes = []
    ob, nb = old.backfill, new.backfill
    for what, before, after in (("symbols", ob.symbols, nb.symbols),
                                ("timeframes", [t.label for t in ob.timeframes],
                                 [t.label for t in nb.timeframes])):
        added = [x for x in after if x not in before]
        removed = [x for x in before if x not in after]
        if added:
            changes.append(f"{what} + {' '.join(added)}")
        if removed:
            changes.append(f"{what} - {' '.join(removed)} (stop after their current page)")
    for section, a, b in (("polygon", old.polygon, new.polygon),
                          ("backfill", ob, nb), ("retry", old.retry, new.retry),
                          ("logging", old.logging, new.logging),
                          ("staleness", old.staleness, new.staleness)):
        for field in attrs.fields(type(a)):
            if field.name in ("symbols", "timeframes"):
                continue
            before, after = getattr(a, field.name), getattr(b, field.name)
            if before != after:
                shown = "***" if field.name == "api_key" else f"{before!s} -> {after!s}"
                changes.append(f"{section}.{field.name} {shown}")
    return changes


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """The keys a reload cannot apply to a running daemon."""
    return [what for what, a, b in (
        ("[database]", old.database, new.database),
        ("[status] listen", old.status, new.status),
        ("[daemon] state_dir", old.state_dir, new.state_dir),
    ) if a != b]
