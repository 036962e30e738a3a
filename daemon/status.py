"""The status endpoint: JSON (and Prometheus text) about the running daemon, on trio + h11.

    GET /healthz                                   200 while the event loop answers
    GET /readyz                                    200 database reachable and migrated, else 503
    GET /status                                    config, uptime, cycle progress, API, writer
    GET /metrics                                   Prometheus text exposition
    GET /api/v1/admin/scheduler-health             healthy / degraded / unhealthy + reasons
    GET /api/v1/admin/features/staleness           every configured series: last bar, age, class
    GET /api/v1/admin/scheduler/execution-history  ?limit=N recent executions, failed jobs

Served by daemon.httpserver (per-connection idle and read timeouts; malformed HTTP gets 400 and a
close, an oversized head 431); an unknown path gets a JSON 404, another method than GET/HEAD a
405. Everything but the database-backed answers is read from memory, so /status stays fast
during a backfill.

Database work never touches the writer: each readiness check or query runs in a worker thread
(under this module's own CapacityLimiter) on a short-lived connection with a connect and a
statement timeout, and each answer is cached for `CACHE_SECONDS` with one fetch in flight at a
time, so a load test or a dashboard polling hard costs PostgreSQL at most one query per second
per endpoint. An answer a little past its time is served at once while one request's worth of
refresh runs in the background (stale-while-revalidate), so no request waits on the database
unless the answer is older than `STALE_SECONDS`.

Error handling: the database down or slow turns its endpoints into 503 with the reason, within
`DB_TIMEOUT_SECONDS`; a bad client costs its own connection only (daemon.httpserver). If the
listen address cannot be bound, the error is logged and the daemon runs on without the endpoint
(`daemon.status_port` stays None): backfilling matters more than reporting on it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import attrs
import trio
from loguru import logger

from . import __version__, monitoring
from .db import load_migrations
from .errors import DatabaseError
from .httpserver import Request, Response, serve_http
from .metrics import CONTENT_TYPE, Metrics
from .staleness import CLASSES, series_age

if TYPE_CHECKING:
    from .app import Daemon
    from .config import Config
    from .scheduler import CycleProgress

__all__ = ["StatusApp", "serve_status"]

# Per-connection limits (hypercorn-style): a started request must arrive within READ_TIMEOUT;
# a kept-alive connection may idle IDLE_TIMEOUT. Module-level so tests can shorten them.
READ_TIMEOUT = 5.0
IDLE_TIMEOUT = 30.0
# Database-backed answers are reused this long (and fetched by one request at a time)...
CACHE_SECONDS = 1.0
# ...and, up to this many multiples of it, served while a background fetch refreshes them.
STALE_FACTOR = 10
# A readiness check or query that takes longer is abandoned: 503 "did not answer".
DB_TIMEOUT_SECONDS = 3.0
# Worker threads for status queries, apart from the writer's.
DB_THREADS = 2
HISTORY_DEFAULT_LIMIT = 20
HISTORY_MAX_LIMIT = 500
# Scheduler health: a cycle this late (beyond its due time) degrades, twice the interval late is
# unhealthy; a failed-job share at or above FAILURE_UNHEALTHY is unhealthy, any failure degrades.
LATE_GRACE_SECONDS = 60.0
FAILURE_UNHEALTHY = 0.5
# A single write running this long means the database is stuck (pages take < 1 s).
WRITE_STUCK_SECONDS = 60.0

T = TypeVar("T")


@attrs.frozen
class _Outcome(Generic[T]):
    """What a database-backed fetch produced: a value, or the reason there is none."""

    value: T | None
    error: str | None


class _Cached(Generic[T]):
    """The last outcome of `fetch`: fresh for `ttl` seconds, then served while a background
    refresh runs (up to `ttl * STALE_FACTOR`), then fetched while the caller waits. One fetch
    in flight at a time."""

    def __init__(self, ttl: float, fetch: Callable[[], Awaitable[_Outcome[T]]],
                 nursery: trio.Nursery | None) -> None:
        self._ttl = ttl
        self._fetch = fetch
        self._nursery = nursery
        self._lock = trio.Lock()
        self._outcome: _Outcome[T] | None = None
        self._at = -float("inf")
        self._refreshing = False

    async def get(self) -> _Outcome[T]:
        age = trio.current_time() - self._at
        if self._outcome is not None and age < self._ttl:
            return self._outcome
        if (self._outcome is not None and self._nursery is not None
                and age < self._ttl * STALE_FACTOR):
            if not self._refreshing:
                self._refreshing = True
                self._nursery.start_soon(self._refresh)
            return self._outcome
        async with self._lock:
            if self._outcome is None or trio.current_time() - self._at >= self._ttl:
                return await self._update()
            return self._outcome

    async def _refresh(self) -> None:
        try:
            async with self._lock:
                await self._update()
        except Exception:  # a bug here must not take the status server (or daemon) down
            logger.exception("refreshing a cached status answer failed")
        finally:
            self._refreshing = False

    async def _update(self) -> _Outcome[T]:
        self._outcome = outcome = await self._fetch()
        self._at = trio.current_time()
        return outcome


def _iso(unix_seconds: float | None) -> str | None:
    if unix_seconds is None:
        return None
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(unix_seconds))
    return f"{text}.{int(unix_seconds * 1000) % 1000:03d}Z"


def _iso_ms(ms: int | None) -> str | None:
    return None if ms is None else _iso(ms / 1000)


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def human_age(seconds: float | None) -> str:
    """`42s`, `5m`, `3h 12m`, `2d 4h`; `-` for None."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86_400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86_400}d {s % 86_400 // 3600}h"


def _json(obj: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response.json(obj, status, {"cache-control": "no-store", **(headers or {})})


class StatusApp:
    """The request handler; holds the caches and the metrics registry for one Daemon."""

    def __init__(self, daemon: Daemon, nursery: trio.Nursery | None = None) -> None:
        """`nursery` runs background refreshes of cached answers (None: callers wait)."""
        self.daemon = daemon
        self.metrics = Metrics(daemon)
        self._nursery = nursery
        self._migrations = load_migrations()
        self._db_limiter = trio.CapacityLimiter(DB_THREADS)
        self._ready: _Cached[bool] = _Cached(CACHE_SECONDS, self._check_ready, nursery)
        self._staleness: _Cached[dict[str, Any]] = _Cached(CACHE_SECONDS, self._read_staleness,
                                                           nursery)
        self._history: dict[int, _Cached[list[dict[str, Any]]]] = {}
        self._routes: dict[str, Callable[[Request], Awaitable[Response]]] = {
            "/healthz": self.healthz,
            "/readyz": self.readyz,
            "/status": self.status,
            "/metrics": self.prometheus,
            "/api/v1/admin/scheduler-health": self.scheduler_health,
            "/api/v1/admin/features/staleness": self.staleness,
            "/api/v1/admin/scheduler/execution-history": self.execution_history,
        }

    async def handle(self, request: Request) -> Response:
        path = request.path.rstrip("/") or "/"
        route = self._routes.get(path)
        if route is None:
            return _json({"error": "not found", "path": request.path,
                          "endpoints": sorted(self._routes)}, 404)
        if request.method not in ("GET", "HEAD"):
            return _json({"error": f"method {request.method} not allowed", "allow": "GET, HEAD"},
                         405, {"allow": "GET, HEAD"})
        return await route(request)

    # --- database access (worker threads, own limiter, bounded time) -------------------------

    async def _in_thread(self, fn: Callable[..., T], *args: object) -> _Outcome[T]:
        with trio.move_on_after(DB_TIMEOUT_SECONDS):
            try:
                value = await trio.to_thread.run_sync(
                    fn, *args, limiter=self._db_limiter, abandon_on_cancel=True)
            except DatabaseError as exc:
                return _Outcome(None, str(exc))
            return _Outcome(value, None)
        return _Outcome(None, f"database did not answer within {DB_TIMEOUT_SECONDS:g} s")

    async def _check_ready(self) -> _Outcome[bool]:
        outcome = await self._in_thread(monitoring.check_database, self.daemon.db_url,
                                        self._migrations)
        if outcome.error is not None:
            return _Outcome(None, outcome.error)
        if outcome.value is not None:  # check_database returned a reason
            return _Outcome(None, str(outcome.value))
        return _Outcome(True, None)

    async def _read_staleness(self) -> _Outcome[dict[str, Any]]:
        config = self.daemon.config
        return await self._in_thread(_staleness_report, self.daemon.db_url, config,
                                     int(time.time() * 1000))

    # --- endpoints -----------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return _json({"status": "ok", "uptime_seconds": _round(time.time() -
                                                               self.daemon.started_at)})

    async def readyz(self, request: Request) -> Response:
        outcome = await self._ready.get()
        self.metrics.database_ready = outcome.error is None
        if outcome.error is not None:
            return _json({"status": "not ready", "reason": outcome.error}, 503)
        return _json({"status": "ready", "migrations": len(self._migrations)})

    async def status(self, request: Request) -> Response:
        return _json(self.status_report())

    async def prometheus(self, request: Request) -> Response:
        ready = await self._ready.get()
        self.metrics.database_ready = ready.error is None
        staleness = await self._staleness.get()
        self.metrics.series = None if staleness.value is None else _series_metrics(
            staleness.value)
        return Response(200, {"content-type": CONTENT_TYPE}, self.metrics.render())

    async def scheduler_health(self, request: Request) -> Response:
        ready = await self._ready.get()
        report = scheduler_health(self.daemon, ready.error)
        return _json(report, 503 if report["status"] == "unhealthy" else 200)

    async def staleness(self, request: Request) -> Response:
        outcome = await self._staleness.get()
        if outcome.value is None:
            return _json({"error": "staleness unavailable", "reason": outcome.error}, 503)
        wanted = request.query.get("class")
        if wanted is None:
            return _json(outcome.value)
        if wanted not in CLASSES:
            return _json({"error": f"class must be one of {', '.join(CLASSES)}"}, 400)
        report = dict(outcome.value)
        report["series"] = [s for s in report["series"] if s["class"] == wanted]
        return _json(report)

    async def execution_history(self, request: Request) -> Response:
        raw = request.query.get("limit", str(HISTORY_DEFAULT_LIMIT))
        try:
            limit = int(raw)
        except ValueError:
            limit = 0
        if not 1 <= limit <= HISTORY_MAX_LIMIT:
            return _json({"error": f"limit must be a whole number from 1 to "
                                   f"{HISTORY_MAX_LIMIT}, not {raw!r}"}, 400)
        cached = self._history.get(limit)
        if cached is None:
            cached = self._history[limit] = _Cached(
                CACHE_SECONDS, partial(self._in_thread, monitoring.read_history,
                                       self.daemon.db_url, limit), self._nursery)
        outcome = await cached.get()
        if outcome.value is None:
            return _json({"error": "history unavailable", "reason": outcome.error}, 503)
        return _json({"limit": limit, "executions": outcome.value})

    # --- /status ---------------------------------------------------------------------------

    def status_report(self) -> dict[str, Any]:
        d = self.daemon
        now = time.time()
        config = d.config
        scheduler = d.scheduler
        api = d.client.statistics()
        writer = d.writer.statistics()
        cycle = scheduler.cycle
        last = scheduler.last_cycle
        if scheduler.stopping:
            state = "stopping"
        else:
            state = "backfilling" if cycle is not None else "waiting"
        next_at = None
        if cycle is None and last is not None and not scheduler.stopping:
            next_at = _wall(last.started + config.backfill.refresh_minutes * 60)
        return {
            "service": "backfilld",
            "version": __version__,
            "instance": config.instance,
            "state": state,
            "started_at": _iso(d.started_at),
            "uptime_seconds": _round(now - d.started_at),
            "config": {
                "generation": d.reload.generation,
                "loaded_at": _iso(d.reload.loaded_at),
                "source": config.source,
                "symbols": len(config.backfill.symbols),
                "timeframes": [tf.label for tf in config.backfill.timeframes],
                "refresh_minutes": config.backfill.refresh_minutes,
                "last_reload_error": d.reload.last_error,
                "last_reload_error_at": _iso(d.reload.last_error_at),
            },
            "cycle": None if cycle is None else self._cycle_report(cycle, running=True),
            "last_cycle": None if last is None else self._cycle_report(last, running=False),
            "next_cycle_at": _iso(next_at),
            "rate_limiter": _limiter_report(d),
            "total_requests": api.total_requests,
            "rate_limited_count": api.rate_limited_count,
            "retries": api.retries,
            "api": {
                "failures": api.failures,
                "pages": api.pages,
                "bars": api.bars,
                "bytes_received": api.bytes_received,
            },
            "writer": {
                "connected": writer.connected,
                "queue_depth": writer.queue_depth,
                "queue_capacity": writer.queue_capacity,
                "pages_written": writer.pages_written,
                "bars_written": writer.bars_written,
                "transactions": writer.transactions,
                "write_errors": writer.write_errors,
                "reconnects": writer.reconnects,
                "last_write_seconds": _round(writer.last_write_seconds, 4),
                "busy_seconds": None if writer.busy_since is None else _round(
                    trio.current_time() - writer.busy_since),
            },
            "last_error": _last_error(d),
        }

    def _cycle_report(self, cycle: CycleProgress, *, running: bool) -> dict[str, Any]:
        per_symbol: dict[str, list[int]] = {}  # symbol -> [done, jobs, failed, bars]
        failed_jobs = []
        for job in cycle.jobs:
            counts = per_symbol.setdefault(job.symbol, [0, 0, 0, 0])
            counts[1] += 1
            counts[3] += job.bars_written
            if job.done.is_set():
                counts[0] += 1
                if not job.ok and not job.cancelled:
                    counts[2] += 1
                    failed_jobs.append({"symbol": job.symbol, "timeframe": job.timeframe,
                                        "error": job.error})
        queued = sum(1 for s in cycle.symbols.values() if s == "queued")
        timeframes = len(self.daemon.config.backfill.timeframes)
        symbols = {}
        for symbol, state in cycle.symbols.items():
            done, jobs, failed, bars = per_symbol.get(symbol, [0, 0, 0, 0])
            symbols[symbol] = {"state": state, "jobs_done": done, "jobs": jobs,
                               "jobs_failed": failed, "bars": bars}
        states: dict[str, int] = {}
        for state in cycle.symbols.values():
            states[state] = states.get(state, 0) + 1
        if running:
            requests, limited, retries = (
                now - start for now, start in zip(self.daemon.scheduler.client_counters(),
                                                  cycle.counters_at_start, strict=True))
            elapsed = trio.current_time() - cycle.started
        else:
            requests, limited, retries = cycle.requests, cycle.rate_limited, cycle.retries
            elapsed = (cycle.finished or cycle.started) - cycle.started
        report: dict[str, Any] = {
            "number": cycle.number,
            "execution_id": str(cycle.execution_id),
            "trigger": cycle.trigger,
            "started_at": _iso(cycle.started_wall),
            "finished_at": None if running else _iso(cycle.started_wall + elapsed),
            "duration_seconds": _round(elapsed),
            "jobs_done": cycle.jobs_done,
            # planned so far, plus one per timeframe for each symbol still to plan
            "jobs_total": len(cycle.jobs) + queued * timeframes,
            "jobs_failed": len(failed_jobs),
            "bars_written": sum(job.bars_written for job in cycle.jobs),
            "requests": requests,
            "rate_limited": limited,
            "retries": retries,
            "ok": None if running else cycle.ok,
            "symbol_states": states,
            "symbols": symbols,
            "failed_jobs": failed_jobs[-50:],
        }
        if cycle.auth_error:
            report["auth_error"] = cycle.auth_error
        return report


def _wall(trio_time: float) -> float:
    """Unix seconds of a trio time (the scheduler keeps trio times)."""
    return time.time() - (trio.current_time() - trio_time)


def _limiter_report(daemon: Daemon) -> dict[str, Any]:
    stats = daemon.limiter.statistics()
    paused = None if stats.paused_until is None else stats.paused_until - trio.current_time()
    return {
        "configured_per_minute": stats.configured_per_minute,
        "effective_per_minute": _round(stats.effective_per_minute, 2),
        "in_flight": stats.in_flight,
        "waiting": stats.waiting,
        "paused_for_seconds": _round(paused),
        "total_granted": stats.total_granted,
        "max_in_flight": daemon.config.polygon.max_in_flight,
    }


def _last_error(daemon: Daemon) -> dict[str, Any] | None:
    candidates = []
    writer = daemon.writer.statistics()
    if writer.last_error is not None and writer.last_error_at is not None:
        candidates.append((writer.last_error_at, writer.last_error))
    if daemon.reload.last_error is not None and daemon.reload.last_error_at is not None:
        candidates.append((daemon.reload.last_error_at,
                           f"config reload: {daemon.reload.last_error}"))
    if not candidates:
        return None
    at, message = max(candidates)
    return {"at": _iso(at), "message": message}


# --- scheduler health ------------------------------------------------------------------------


def _circuit(daemon: Daemon) -> dict[str, Any]:
    """The API gate as a circuit: open while a Retry-After holds every request, throttled while
    the rate is cut after 429s, closed otherwise."""
    stats = daemon.limiter.statistics()
    if stats.paused_until is not None:
        state = "open"
    elif stats.effective_per_minute < stats.configured_per_minute:
        state = "throttled"
    else:
        state = "closed"
    return {"state": state, **_limiter_report(daemon)}


def scheduler_health(daemon: Daemon, database_error: str | None) -> dict[str, Any]:
    """healthy / degraded / unhealthy, with every reason that is not 'healthy'."""
    scheduler = daemon.scheduler
    interval = daemon.config.backfill.refresh_minutes * 60
    now = trio.current_time()
    unhealthy: list[str] = []
    degraded: list[str] = []
    if database_error is not None:
        unhealthy.append(f"database: {database_error}")
    writer = daemon.writer.statistics()
    if not writer.connected:
        unhealthy.append("the writer is not connected to the database")
    elif writer.busy_since is not None and now - writer.busy_since > WRITE_STUCK_SECONDS:
        degraded.append(f"one write has been running for {now - writer.busy_since:.0f} s")
    if scheduler.stopping:
        degraded.append("stopping")

    cycle, last = scheduler.cycle, scheduler.last_cycle
    last_execution: dict[str, Any] | None = None
    if cycle is not None:
        last_execution = {"number": cycle.number, "state": "running",
                          "started_at": _iso(cycle.started_wall),
                          "age_seconds": _round(now - cycle.started)}
    elif last is not None and last.finished is not None:
        due = last.started + interval
        late = now - due
        last_execution = {"number": last.number, "state": "ok" if last.ok else "failed",
                          "started_at": _iso(last.started_wall),
                          "finished_at": _iso(_wall(last.finished)),
                          "age_seconds": _round(now - last.finished),
                          "next_due_at": _iso(_wall(due))}
        if not scheduler.stopping and late > interval:
            unhealthy.append(f"no execution for {human_age(now - last.started)}; the schedule "
                             f"is every {human_age(interval)}")
        elif not scheduler.stopping and late > LATE_GRACE_SECONDS:
            degraded.append(f"the next execution is {human_age(late)} late")
    else:
        degraded.append("no execution has started yet")

    # Failure rate: the running cycle's finished jobs, else the last cycle's.
    judged = cycle if cycle is not None and cycle.jobs_done else last
    failure_rate = None
    if judged is not None:
        done = [j for j in judged.jobs if j.done.is_set() and not j.cancelled]
        failed = len(judged.failed)
        failure_rate = failed / len(done) if done else 0.0
        label = f"execution {judged.number}"
        if judged.auth_error:
            unhealthy.append(f"the API refused the key in {label}: {judged.auth_error}")
        elif failed and failure_rate >= FAILURE_UNHEALTHY:
            unhealthy.append(f"{failed} of {len(done)} jobs failed in {label}")
        elif failed:
            degraded.append(f"{failed} of {len(done)} jobs failed in {label}")

    circuit = _circuit(daemon)
    if circuit["state"] == "open":
        degraded.append(f"the API asked us to wait (Retry-After): no requests for "
                        f"{circuit['paused_for_seconds']:.1f} s")
    elif circuit["state"] == "throttled":
        degraded.append(f"request rate cut to {circuit['effective_per_minute']:g}/min of "
                        f"{circuit['configured_per_minute']:g} after 429s")

    status = "unhealthy" if unhealthy else "degraded" if degraded else "healthy"
    return {
        "status": status,
        "reasons": unhealthy + degraded,
        "checked_at": _iso(time.time()),
        "schedule_seconds": interval,
        "last_execution": last_execution,
        "failure_rate": _round(failure_rate),
        "circuit": circuit,
    }


# --- staleness -------------------------------------------------------------------------------


def _staleness_report(url: str, config: Config, now_ms: int) -> dict[str, Any]:
    """Read freshness rows and classify every configured series (runs in a worker thread)."""
    rows = monitoring.read_freshness(url)
    thresholds = config.staleness
    series = []
    counts = dict.fromkeys(CLASSES, 0)
    for symbol in config.backfill.symbols:
        for tf in config.backfill.timeframes:
            row = rows.get((symbol, tf.label))
            age = series_age(
                symbol, tf, row.last_bar_ms if row else None, now_ms, thresholds,
                checked_through_ms=row.checked_through_ms if row else None,
            )
            counts[age.cls] += 1
            series.append({
                "symbol": symbol,
                "timeframe": tf.label,
                "class": age.cls,
                "age_seconds": _round(age.age_seconds, 1),
                "age": human_age(age.age_seconds),
                "last_bar": _iso_ms(row.last_bar_ms if row else None),
                "expected_bar": _iso_ms(age.expected_bar_ms),
                "overdue_since": _iso_ms(age.overdue_since_ms),
                "last_success": _iso_ms(row.last_success_ms if row else None),
                "last_attempt": _iso_ms(row.last_attempt_ms if row else None),
                "last_error": row.last_error if row else None,
                "last_error_at": _iso_ms(row.last_error_ms if row else None),
            })
    return {
        "now": _iso_ms(now_ms),
        "thresholds_hours": {"fresh": thresholds.fresh_hours, "aging": thresholds.aging_hours,
                             "stale": thresholds.stale_hours},
        "counts": counts,
        "series": series,
    }


def _series_metrics(report: dict[str, Any]) -> tuple[dict[tuple[str, str], int],
                                                     dict[str, float]]:
    counts: dict[tuple[str, str], int] = {}
    ages: dict[str, float] = {}
    for s in report["series"]:
        key = (s["timeframe"], s["class"])
        counts[key] = counts.get(key, 0) + 1
        if s["age_seconds"] is not None:
            ages[s["timeframe"]] = max(ages.get(s["timeframe"], 0.0), s["age_seconds"])
    return counts, ages


# --- the server ------------------------------------------------------------------------------


async def serve_status(
    daemon: Daemon, *, task_status: trio.TaskStatus[int | None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve the status endpoint on `[status] listen` until cancelled.

    Binds `daemon.config.status.host/port` (port 0 picks a free one), logs the bound port, stores
    it as `daemon.status_port` and reports it through `task_status`.

    Error handling: an address that cannot be bound is logged as an error and reported as None
    (the daemon goes on backfilling); after that only cancellation ends it.
    """
    host, port = daemon.config.status.host, daemon.config.status.port
    async with trio.open_nursery() as nursery:
        app = StatusApp(daemon, nursery)
        bind_error: OSError | None = None
        try:
            bound = await nursery.start(partial(
                serve_http, app.handle, host, port, idle_timeout=IDLE_TIMEOUT,
                read_timeout=READ_TIMEOUT))
        except* OSError as group:
            bind_error = group.exceptions[0]  # type: ignore[assignment]
        if bind_error is not None:
            logger.error("status endpoint not started: cannot listen on {}:{}: {}", host, port,
                         bind_error.strerror or bind_error)
            daemon.status_port = None
            task_status.started(None)
            return
        daemon.status_port = bound
        shown = f"[{host}]" if ":" in host else host
        logger.info("status endpoint on http://{}:{}/status", shown, bound)
        task_status.started(bound)
