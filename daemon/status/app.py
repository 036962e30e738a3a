"""Routing for the status endpoint: which path answers what, from a snapshot or the database.

    GET /  (or /dashboard)                         the dashboard: one self-contained HTML page
    GET /healthz                                   200 while the event loop answers
    GET /readyz                                    200 database reachable and migrated, else 503
    GET /status                                    config, uptime, cycle progress, API, writer
    GET /metrics                                   Prometheus text exposition
    GET /api/v1/admin/scheduler-health             healthy / degraded / unhealthy + reasons
    GET /api/v1/admin/features/staleness           every configured series: last bar, age, class
    GET /api/v1/admin/scheduler/execution-history  ?limit=N recent executions, failed jobs

An unknown path gets a JSON 404, another method than GET/HEAD a 405. With a token set
(`StatusOptions.token`), every path but /, /dashboard, /healthz and /readyz first needs
`Authorization: Bearer <token>`, else 401 (daemon.status.auth), unknown paths included. The app
sees the daemon only through `snapshot()` (daemon.snapshot) and the database URL.

Database work never touches the writer: each readiness check or query runs in a worker thread
(under this app's own CapacityLimiter) on a short-lived connection with a connect and a
statement timeout, and each answer is cached (daemon.status.cache) for `cache_seconds`.

Error handling: the database down or slow turns its endpoints into 503 with the reason, within
`db_timeout_seconds`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import attrs
import trio

from .. import monitoring
from ..config import Secret, StatusConfig
from ..db import load_migrations
from ..errors import DatabaseError
from ..httpserver import Request, Response
from ..snapshot import SnapshotSource
from ..staleness import CLASSES
from .auth import OPEN_PATHS, BearerAuth, unauthorized
from .cache import Cached, Outcome
from .dashboard import dashboard_response
from .health import scheduler_health
from .metrics import CONTENT_TYPE, render
from .reports import series_metrics, staleness_report
from .views import rounded, status_report

__all__ = ["StatusApp", "StatusOptions"]

T = TypeVar("T")

# Worker threads for status queries, apart from the writer's.
DB_THREADS = 2
HISTORY_DEFAULT_LIMIT = 20
HISTORY_MAX_LIMIT = 500


@attrs.frozen
class StatusOptions:
    """Limits and access of the status endpoint (hypercorn-style per-connection timeouts,
    answer caching, the bearer token).

    Attributes:
        read_timeout: A started request must arrive in full within this many seconds.
        idle_timeout: A kept-alive connection may idle this long.
        cache_seconds: Database-backed answers are reused this long.
        render_seconds: A /metrics exposition is reused this long, and requests arriving
            while one is rendered share it: rendering took ~4 ms of the event loop per
            request, and a scrape does not mind a quarter second of age. /status and the
            health report are built afresh for every request (a reload shows at once).
        db_timeout_seconds: A readiness check or query that takes longer is a 503.
        token: When set, every path but the page, /healthz and /readyz requires it as a
            bearer token.
        allow_unauthenticated: Serve a non-loopback address without a token anyway.
        max_connections: Connections served at once; one more is answered 503 (None: no cap).
    """

    read_timeout: float = 5.0
    idle_timeout: float = 30.0
    cache_seconds: float = 1.0
    render_seconds: float = 0.25
    db_timeout_seconds: float = 3.0
    token: Secret | None = None
    allow_unauthenticated: bool = False
    max_connections: int | None = 64

    def with_access(self, status: StatusConfig) -> StatusOptions:
        """These limits with the access settings of a `[status]` config section (its token,
        allow_unauthenticated, max_connections): the config decides who may read."""
        return attrs.evolve(self, token=status.token,
                            allow_unauthenticated=status.allow_unauthenticated,
                            max_connections=status.max_connections)


def _json(obj: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response.json(obj, status, {"cache-control": "no-store", **(headers or {})})


class StatusApp:
    """The request handler: routes, the database-backed caches, and nothing of the daemon but
    its snapshots."""

    def __init__(self, snapshot: SnapshotSource, db_url: str, options: StatusOptions,
                 nursery: trio.Nursery | None = None) -> None:
        """`nursery` runs background refreshes of cached answers (None: callers wait)."""
        self._snapshot = snapshot
        self._db_url = db_url
        self._options = options
        self._nursery = nursery
        self._auth = None if options.token is None else BearerAuth(options.token)
        self._migrations = load_migrations()
        self._db_limiter = trio.CapacityLimiter(DB_THREADS)
        ttl = options.cache_seconds
        self._ready: Cached[bool] = Cached(ttl, self._check_ready, nursery)
        self._staleness: Cached[dict[str, Any]] = Cached(ttl, self._read_staleness, nursery)
        self._history: dict[int, Cached[list[dict[str, Any]]]] = {}
        self._started_at: float | None = None
        # No nursery: an exposition is never served older than render_seconds, and the
        # requests that find it too old share the one rendering in progress.
        self._metrics: Cached[Response] = Cached(options.render_seconds, self._render_metrics,
                                                 None)
        self._routes: dict[str, Callable[[Request], Awaitable[Response]]] = {
            "/": self.dashboard,
            "/dashboard": self.dashboard,
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
        # Access before routing: a client without the token learns nothing of what exists.
        if (self._auth is not None and path not in OPEN_PATHS
                and not self._auth.allows(request.headers)):
            return unauthorized()
        route = self._routes.get(path)
        if route is None:
            return _json({"error": "not found", "path": request.path,
                          "endpoints": sorted(self._routes)}, 404)
        if request.method not in ("GET", "HEAD"):
            return _json({"error": f"method {request.method} not allowed", "allow": "GET, HEAD"},
                         405, {"allow": "GET, HEAD"})
        return await route(request)

    # --- database access (worker threads, own limiter, bounded time) -------------------------

    async def _in_thread(self, fn: Callable[..., T], *args: object) -> Outcome[T]:
        limit = self._options.db_timeout_seconds
        with trio.move_on_after(limit):
            try:
                value = await trio.to_thread.run_sync(
                    fn, *args, limiter=self._db_limiter, abandon_on_cancel=True)
            except DatabaseError as exc:
                return Outcome(None, str(exc))
            return Outcome(value, None)
        return Outcome(None, f"database did not answer within {limit:g} s")

    async def _check_ready(self) -> Outcome[bool]:
        outcome = await self._in_thread(monitoring.check_database, self._db_url,
                                        self._migrations)
        if outcome.error is not None:
            return Outcome(None, outcome.error)
        if outcome.value is not None:  # check_database returned a reason
            return Outcome(None, str(outcome.value))
        return Outcome(True, None)

    async def _read_staleness(self) -> Outcome[dict[str, Any]]:
        snap = self._snapshot()
        return await self._in_thread(staleness_report, self._db_url, snap.config,
                                     int(snap.wall * 1000))

    # --- endpoints -----------------------------------------------------------------------

    async def dashboard(self, request: Request) -> Response:
        """The page (daemon.status.dashboard): it holds no data, so it needs no token; its
        script sends the token with every request it makes."""
        return dashboard_response()

    async def healthz(self, request: Request) -> Response:
        # Only the process start is needed, and it does not change: no snapshot per probe.
        if self._started_at is None:
            self._started_at = self._snapshot().started_at
        return _json({"status": "ok", "uptime_seconds": rounded(time.time() - self._started_at)})

    async def readyz(self, request: Request) -> Response:
        outcome = await self._ready.get()
        if outcome.error is not None:
            return _json({"status": "not ready", "reason": outcome.error}, 503)
        return _json({"status": "ready", "migrations": len(self._migrations)})

    async def status(self, request: Request) -> Response:
        return _json(status_report(self._snapshot()))

    async def prometheus(self, request: Request) -> Response:
        exposition = (await self._metrics.get()).value
        assert exposition is not None  # _render_metrics always has one
        return exposition

    async def _render_metrics(self) -> Outcome[Response]:
        ready = await self._ready.get()
        staleness = await self._staleness.get()
        series = None if staleness.value is None else series_metrics(staleness.value)
        snap = self._snapshot()
        health = scheduler_health(snap, ready.error)["status"]
        body = render(snap, database_ready=ready.error is None, series=series, health=health)
        return Outcome(Response(200, {"content-type": CONTENT_TYPE}, body), None)

    async def scheduler_health(self, request: Request) -> Response:
        ready = await self._ready.get()
        report = scheduler_health(self._snapshot(), ready.error)
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
            cached = self._history[limit] = Cached(
                self._options.cache_seconds,
                partial(self._in_thread, monitoring.read_history, self._db_url, limit),
                self._nursery)
        outcome = await cached.get()
        if outcome.value is None:
            return _json({"error": "history unavailable", "reason": outcome.error}, 503)
        return _json({"limit": limit, "executions": outcome.value})
