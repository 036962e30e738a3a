"""The daemon: one trio process, one root nursery, tasks started in dependency order.

    root nursery
     ├─ signals     SIGHUP → reload · SIGTERM/SIGINT → graceful stop · 2nd SIGINT → stop now
     └─ work nursery
         ├─ writer     started first (connected, stage ready)
         └─ scheduler  cycles of jobs → pages → the writer's channel

Shutdown follows hypercorn: on SIGTERM the scheduler starts no new request, in-flight pages get
`GRACE_SECONDS` to arrive, then the scheduler's scope is cancelled; the writer drains what is
queued (each page a whole transaction) and the process exits 0. Data and checkpoints are
consistent at every instant anyway (one transaction per page), so even the forced path and
SIGKILL lose only work that was never committed and is fetched again on restart.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import attrs
import trio
from loguru import logger

from . import db
from .config import Config, load_config
from .errors import ConfigError
from .log import setup_logging
from .polygon import PolygonClient
from .ratelimit import RateLimiter
from .scheduler import CycleProgress, Scheduler
from .writer import Writer, open_writer_channel

__all__ = ["Daemon", "EXIT_FORCED", "GRACE_SECONDS"]

# In-flight requests get this long to land after SIGTERM; below systemd's TimeoutStopSec (30 s).
GRACE_SECONDS = 15.0
# The writer's extra time after the grace to commit what is queued (pages are ~50-100 ms each).
WRITER_DRAIN_SECONDS = 10.0
EXIT_FORCED = 130


@attrs.define
class ReloadState:
    generation: int = 1
    loaded_at: float = attrs.field(factory=time.time)
    last_error: str | None = None
    last_error_at: float | None = None


class Daemon:
    """Holds the running parts so signals, status and tests can reach them."""

    def __init__(self, config: Config, db_url: str, *, config_path: Path | None = None) -> None:
        self.config = config
        self.db_url = db_url
        self.config_path = config_path
        self.reload = ReloadState()
        self.started_at = time.time()
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
        applied = await trio.to_thread.run_sync(db.apply_migrations, self.db_url)
        if applied:
            logger.info("applied migrations: {}", ", ".join(applied))
        result: CycleProgress | None = None
        async with self.client, trio.open_nursery() as root:
            self._root = root
            root.start_soon(self._handle_signals)
            async with trio.open_nursery() as work:
                await work.start(self._run_writer)
                task_status.started(self)
                logger.info("backfilld running: {} symbols x {} timeframes, {} req/min",
                            len(self.config.backfill.symbols),
                            len(self.config.backfill.timeframes),
                            self.config.polygon.requests_per_minute or "unlimited")
                with self._work_scope:
                    result = await self.scheduler.run(once=once)
            root.cancel_scope.cancel()
        return result

    async def _read_checkpoints(self, symbol: str) -> dict[tuple[str, str], db.Checkpoint]:
        return await trio.to_thread.run_sync(db.read_checkpoints, self.db_url, symbol)

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
        self.scheduler.request_stop()
        now = trio.current_time()
        self._work_scope.deadline = now + GRACE_SECONDS
        self._writer_scope.deadline = now + GRACE_SECONDS + WRITER_DRAIN_SECONDS

    def force_stop(self) -> None:
        """Stop at once; the transaction in progress still commits or rolls back whole."""
        self.forced = True
        self.scheduler.request_stop()
        self._work_scope.cancel()
        self._writer_scope.cancel()

    def reload_config(self) -> bool:
        """Re-read the config file; apply it live if valid, else keep the old one."""
        if self.config_path is None:
            logger.warning("reload requested but the daemon has no config file")
            return False
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            self.reload.last_error = str(exc)
            self.reload.last_error_at = time.time()
            logger.error("reload failed, keeping the running config: {}", exc)
            return False
        if new.database.url != self.config.database.url:
            logger.warning("reload: [database] changes take effect only after a restart")
        self.config = new
        self.limiter.set_rate(new.polygon.requests_per_minute)
        self.limiter.set_max_in_flight(new.polygon.max_in_flight)
        self.client.update(new.polygon, new.retry)
        self.scheduler.update_config(new)
        setup_logging(new.logging.level, new.logging.format)
        self.reload.generation += 1
        self.reload.loaded_at = time.time()
        self.reload.last_error = None
        logger.info("reloaded {} (generation {})", self.config_path, self.reload.generation)
        return True
