"""`serve(parts)`: the daemon's task tree, and nothing else (the parts come from daemon.compose).

    root nursery
     ├─ signals     SIGHUP → reload · SIGTERM/SIGINT → graceful stop · 2nd SIGINT → stop now
     ├─ status      the HTTP status server (started after the writer)
     ├─ watchdog    WATCHDOG=1 while the writer makes progress; STATUS= updates (after READY)
     ├─ shutdown    turns a stop into deadlines on the work and writer scopes
     ├─ features    recomputes the features of series the writer marked dirty (own connection)
     ├─ coordinator registers this instance, heartbeats, renews its series leases
     └─ work nursery
         ├─ writer     started first (connected, stage ready)
         └─ scheduler  cycles of jobs → pages → the writer's channel

systemd hears READY=1 once migrations are applied, the writer is connected and the status
server listens; RELOADING=1 / READY=1 around each SIGHUP (valid or not); STOPPING=1 on a stop
(daemon.systemd has the whole sequence).

Shutdown follows hypercorn: on SIGTERM the rate limiter closes (no request starts any more,
retries included), in-flight pages get `GRACE_SECONDS` to arrive, then the scheduler's scope is
cancelled; the writer drains what is queued (each page a whole transaction) and the process
exits 0. Data and checkpoints are consistent at every instant anyway (one transaction per page),
so even the forced path and SIGKILL lose only work that was never committed and is fetched
again on restart.
"""

from __future__ import annotations

import datetime as dt
import signal

import trio
from loguru import logger

from . import db, monitoring, systemd
from .compose import Controls, Parts
from .config import Config
from .cycles import CycleSnapshot
from .db import apply_migrations
from .leases import reap_local
from .retrying import when_available
from .status import serve_status
from .writer import Writer

__all__ = ["EXIT_FORCED", "GRACE_SECONDS", "STARTUP_DATABASE_WAIT_SECONDS", "serve"]

# In-flight requests get this long to land after SIGTERM. GRACE + WRITER_DRAIN + stopping the
# embedded PostgreSQL must stay below TimeoutStopSec (45 s in systemd/backfilld.service; a test
# checks it), or systemd SIGKILLs a stop that was going fine.
GRACE_SECONDS = 15.0
# The writer's extra time after the grace to commit what is queued (pages are ~50-100 ms each).
WRITER_DRAIN_SECONDS = 10.0
EXIT_FORCED = 130
# `run --once` waits at most this long after its cycle for the last features to be computed.
FEATURES_DRAIN_SECONDS = 120.0
# At start, how long to wait for an unreachable database before exiting 3 (a server still
# booting is waited for; a wrong URL is reported). Once running, the wait has no end.
STARTUP_DATABASE_WAIT_SECONDS = 60.0


async def serve(
    parts: Parts,
    *,
    once: bool = False,
    task_status: trio.TaskStatus[int | None] = trio.TASK_STATUS_IGNORED,
) -> CycleSnapshot | None:
    """Migrate, start the writer and the status server, then run the scheduler until stopped
    (or for one cycle with `once`). Reports the status port (None if it could not bind) once
    ready; returns the last finished cycle.

    Error handling: a database unreachable for STARTUP_DATABASE_WAIT_SECONDS at start raises
    DatabaseUnavailable; a migration that fails raises DatabaseError (both exit 3 in the CLI).
    """
    controls = parts.controls
    try:
        await _migrate(parts)
        await when_available(db.ensure_history_partitions, parts.db_url,
                             *_history_years(parts.reloader.config))
        reaped = await when_available(reap_local, parts.db_url, parts.coordinator.identity.host)
        if reaped:
            logger.info("{} instance(s) of this host had died: their leases are free", reaped)
        abandoned = await when_available(monitoring.close_abandoned_executions, parts.db_url,
                                         parts.config.instance,
                                         2 * parts.coordinator.lease_seconds)
        if abandoned:
            logger.info("marked {} unfinished execution(s) of a previous run as interrupted",
                        abandoned)
        result: CycleSnapshot | None = None
        work_scope, writer_scope = trio.CancelScope(), trio.CancelScope()
        async with parts.client, trio.open_nursery() as root:
            root.start_soon(_handle_signals, controls)
            async with trio.open_nursery() as work:
                await work.start(_run_writer, parts.writer, writer_scope)
                await root.start(parts.features.run)
                # registered and heartbeating before the first claim; leases released on exit
                await root.start(parts.coordinator.run)
                await root.start(parts.loop_lag.run)
                port = await root.start(
                    serve_status, parts.snapshot, parts.db_url, parts.config.status.host,
                    parts.config.status.port, parts.status_options)
                _ready(root, parts)  # after the writer and the status server, before any work
                root.start_soon(_shutdown_deadlines, controls, work_scope, writer_scope)
                task_status.started(port)
                config = parts.reloader.config
                logger.info("backfilld running: {} symbols x {} timeframes, {} req/min",
                            len(config.backfill.symbols), len(config.backfill.timeframes),
                            config.polygon.requests_per_minute or "unlimited")
                with work_scope:
                    result = await parts.scheduler.run(once=once)
            if once and not controls.stopping:
                # the last pages' features, before `run --once` reports done
                with trio.move_on_after(FEATURES_DRAIN_SECONDS):
                    await parts.features.wait_caught_up()
            root.cancel_scope.cancel()
        return result
    finally:
        controls.notify_stopping()
        parts.budget.close()


async def _migrate(parts: Parts) -> None:
    """Apply migrations in a thread; meanwhile ask systemd for more start time."""
    notifier = parts.notifier
    notifier.notify(STATUS="applying database migrations")
    async with trio.open_nursery() as nursery:
        if notifier.enabled:
            nursery.start_soon(systemd.run_start_timeout_extender, notifier)
        # Not raised inside the nursery: a DatabaseError must leave as itself, not in a group.
        try:
            applied = await when_available(apply_migrations, parts.db_url,
                                           give_up_after=STARTUP_DATABASE_WAIT_SECONDS)
            error: BaseException | None = None
        except Exception as exc:
            applied, error = [], exc
        nursery.cancel_scope.cancel()
    if error is not None:
        raise error
    if applied:
        logger.info("applied migrations: {}", ", ".join(applied))


def _history_years(config: Config) -> tuple[int, int]:
    """The UTC years the configured history spans, through this one."""
    today = dt.datetime.now(dt.UTC).date()
    bf = config.backfill
    return bf.first_day(today).year, max(bf.last_day(today).year, today.year)


def _ready(root: trio.Nursery, parts: Parts) -> None:
    """READY=1, then the watchdog (when systemd asked for one) and the STATUS= updates."""
    notifier, bf = parts.notifier, parts.reloader.config.backfill
    notifier.notify(
        READY=1,
        STATUS=f"ready: {len(bf.symbols)} symbols x {len(bf.timeframes)} timeframes",
    )
    if notifier.watchdog_interval is not None:
        root.start_soon(systemd.run_watchdog, notifier, lambda: parts.snapshot().writer)
    if notifier.enabled:
        root.start_soon(systemd.run_status_updates, notifier,
                        lambda: systemd.status_text(parts.snapshot()))


async def _run_writer(writer: Writer, scope: trio.CancelScope, *,
                      task_status: trio.TaskStatus[None]) -> None:
    with scope:
        await writer.run(task_status=task_status)


async def _shutdown_deadlines(controls: Controls, work: trio.CancelScope,
                              writer: trio.CancelScope) -> None:
    """On a stop: in-flight pages get GRACE_SECONDS, the writer WRITER_DRAIN_SECONDS more; a
    forced stop cancels both at once."""
    await controls.wait_stop()
    if controls.forced:
        work.cancel()
        writer.cancel()
        return
    logger.info("stopping: finishing in-flight pages (at most {:.0f} s)", GRACE_SECONDS)
    now = trio.current_time()
    work.deadline = min(work.deadline, now + GRACE_SECONDS)
    writer.deadline = min(writer.deadline, now + GRACE_SECONDS + WRITER_DRAIN_SECONDS)
    await controls.wait_forced()
    work.cancel()
    writer.cancel()


async def _handle_signals(controls: Controls) -> None:
    with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                controls.reload()
            elif signum == signal.SIGINT and controls.stopping:
                logger.warning("second interrupt: stopping now")
                controls.force_stop()
            else:
                controls.stop()
