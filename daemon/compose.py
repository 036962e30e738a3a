"""The composition root: the one place that builds every part and knows how they connect.

`build(config, db_url, ...)` makes the parts (rate limiter, API client, writer and its channel,
scheduler, reloader, controls) and returns them as `Parts`; `daemon.app.serve(parts)` only
wires them into the task tree. Reporters (status, metrics, systemd's STATUS=, the demo's
progress line) get `parts.snapshot`, a `Callable[[], Snapshot]`, never the parts. A reload is
applied here (`_apply`), because only here is it known which part a key belongs to.

Adding a part: construct it in `build`, add it to `Parts`, start it in `serve`, and add its
`statistics()` to the Snapshot (docs/architecture.md).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import trio
from loguru import logger

from . import __version__, db, systemd
from .breaker import CircuitBreaker
from .budget import SharedBudget
from .config import Config
from .features import FeaturesTask
from .leases import Coordinator, Identity
from .log import setup_logging
from .looplag import LoopLag
from .polygon import PolygonClient
from .ratelimit import FLOOR, RECOVERY, SLOWDOWN, RateLimiter
from .reload import Reloader
from .retrying import when_available
from .scheduler import Scheduler
from .snapshot import Snapshot, SnapshotSource
from .splits import read_checked_through
from .status import StatusOptions
from .systemd import Notifier
from .timefmt import wall_clock
from .writer import Writer, open_writer_channel

__all__ = ["Controls", "Parts", "build"]


class Controls:
    """What signals (and tests) may do to a running daemon: reload, stop, stop now.

    `serve` watches `wait_stop()` to turn a stop into shutdown deadlines on its scopes.
    """

    def __init__(self, *, reloader: Reloader, notifier: Notifier, limiter: RateLimiter,
                 breaker: CircuitBreaker, scheduler: Scheduler,
                 snapshot: SnapshotSource) -> None:
        self._reloader = reloader
        self._notifier = notifier
        self._limiter = limiter
        self._breaker = breaker
        self._scheduler = scheduler
        self._snapshot = snapshot
        self._stop = trio.Event()
        self._force = trio.Event()
        self._stopping_notified = False
        self.forced = False

    @property
    def stopping(self) -> bool:
        return self._scheduler.stopping

    def reload(self) -> bool:
        """Re-read the config file (SIGHUP). systemd hears RELOADING=1 (with MONOTONIC_USEC)
        before and READY=1 after, whatever the outcome: a refused reload leaves the service
        running, on its old config."""
        if self.stopping:
            logger.warning("reload requested while stopping: ignored")
            return False
        self._notifier.notify(RELOADING=1, MONOTONIC_USEC=systemd.monotonic_usec(),
                              STATUS=f"reloading {self._reloader.path}")
        try:
            return self._reloader.reload()
        finally:
            self._notifier.notify(READY=1, STATUS=systemd.status_text(self._snapshot()))

    def stop(self) -> None:
        """Graceful stop: no new requests, in-flight pages land, the writer drains."""
        if self.stopping:
            return
        self._halt()

    def force_stop(self) -> None:
        """Stop at once; the transaction in progress still commits or rolls back whole."""
        self.forced = True
        self._halt()
        self._force.set()

    def _halt(self) -> None:
        self.notify_stopping()
        self._limiter.close()  # the single "no new requests" gate
        self._breaker.close()  # and whoever waits for the API to come back
        self._scheduler.request_stop()
        self._stop.set()

    async def wait_stop(self) -> None:
        await self._stop.wait()

    async def wait_forced(self) -> None:
        await self._force.wait()

    def notify_stopping(self) -> None:
        if not self._stopping_notified:
            self._stopping_notified = True
            self._notifier.notify(STOPPING=1, STATUS="stopping")


@attrs.frozen
class Parts:
    """Everything `daemon.app.serve` wires into the task tree."""

    config: Config  # as loaded at start (restart-only keys: [database], [status] listen)
    db_url: str
    notifier: Notifier
    reloader: Reloader
    limiter: RateLimiter
    budget: SharedBudget
    breaker: CircuitBreaker
    client: PolygonClient
    writer: Writer
    features: FeaturesTask
    coordinator: Coordinator
    scheduler: Scheduler
    loop_lag: LoopLag
    controls: Controls
    snapshot: SnapshotSource
    status_options: StatusOptions


def build(
    config: Config,
    db_url: str,
    *,
    config_path: Path | None = None,
    notifier: Notifier | None = None,
    status_options: StatusOptions | None = None,
    today: Callable[[], dt.date] | None = None,
    max_wait: float | None = None,
) -> Parts:
    """Construct every part for `config` on the database at `db_url` (nothing starts yet).

    `max_wait` (`run --once --max-wait`): give up on an API outage that lasts longer.
    """
    notifier = notifier or Notifier(None)
    started_at = time.time()
    identity = Identity.new(config.instance)
    coordinator = Coordinator(db_url, identity, lease_seconds=config.lease_seconds)
    shared = SharedBudget(db_url, config.polygon.api_key, slowdown=SLOWDOWN, floor=FLOOR,
                          recovery=RECOVERY)
    limiter = RateLimiter(config.polygon.requests_per_minute,
                          max_in_flight=config.polygon.max_in_flight, shared=shared)
    retry = config.retry
    breaker = CircuitBreaker(threshold=retry.breaker_failures,
                             first_probe_seconds=retry.breaker_probe_seconds,
                             max_probe_seconds=retry.breaker_max_probe_seconds,
                             give_up_after=max_wait)
    client = PolygonClient(config.polygon, config.retry, limiter=limiter, breaker=breaker)
    send, receive = open_writer_channel(config.database.queue_pages)
    features_task = FeaturesTask(db_url, connections=config.database.features_connections)
    writer = Writer(db_url, receive, on_commit=features_task.notify, instance_id=identity.id,
                    on_release=coordinator.released,
                    idle_transaction_seconds=coordinator.lease_seconds)

    async def read_series_state(symbol: str) -> dict[tuple[str, str], db.SeriesState]:
        return await when_available(db.read_series_state, db_url, symbol)

    async def read_splits_checked() -> dt.date | None:
        return await when_available(read_checked_through, db_url)

    scheduler = Scheduler(config, client, send, series_state=read_series_state, today=today,
                          splits_checked=read_splits_checked, coordinator=coordinator,
                          defer_features=lambda series, deferred: features_task.defer(
                              (series.symbol, series.timeframe), deferred))

    def apply(old: Config, new: Config) -> None:
        del old
        limiter.set_rate(new.polygon.requests_per_minute)
        limiter.set_max_in_flight(new.polygon.max_in_flight)
        client.update(new.polygon, new.retry)
        breaker.configure(threshold=new.retry.breaker_failures,
                          first_probe_seconds=new.retry.breaker_probe_seconds,
                          max_probe_seconds=new.retry.breaker_max_probe_seconds)
        scheduler.update_config(new)
        setup_logging(new.logging.level, new.logging.format)

    reloader = Reloader(config, config_path, apply)
    loop_lag = LoopLag()

    def snapshot() -> Snapshot:
        return Snapshot(
            version=__version__,
            started_at=started_at,
            wall=wall_clock(),
            now=trio.current_time(),
            reload=reloader.statistics(),
            api=client.statistics(),
            limiter=limiter.statistics(),
            breaker=breaker.statistics(),
            writer=writer.statistics(),
            features=features_task.statistics(),
            instances=coordinator.statistics(),
            scheduler=scheduler.statistics(),
            loop=loop_lag.statistics(),
        )

    controls = Controls(reloader=reloader, notifier=notifier, limiter=limiter,
                        breaker=breaker, scheduler=scheduler, snapshot=snapshot)
    return Parts(config=config, db_url=db_url, notifier=notifier, reloader=reloader,
                 limiter=limiter, budget=shared, breaker=breaker, client=client,
                 writer=writer,
                 features=features_task, coordinator=coordinator, scheduler=scheduler,
                 loop_lag=loop_lag,
                 controls=controls,
                 snapshot=snapshot,
                 status_options=(status_options or StatusOptions()).with_access(config.status))
