"""The status server's lifecycle: bind, report the port, serve until cancelled.

Error handling: if the listen address cannot be bound, the error is logged and the daemon runs
on without the endpoint (the task reports None): backfilling matters more than reporting on it.
The same holds for an address other hosts can reach with no token set and no
`allow_unauthenticated` (daemon.config.status_exposure_problem): `backfilld run` refuses that
before anything starts; this check catches any other caller of `serve_status`.
"""

from __future__ import annotations

from functools import partial

import trio
from loguru import logger

from ..config import StatusConfig, is_loopback, status_exposure_problem
from ..httpserver import serve_http
from ..snapshot import SnapshotSource
from .app import StatusApp, StatusOptions

__all__ = ["serve_status"]


async def serve_status(
    snapshot: SnapshotSource,
    db_url: str,
    host: str,
    port: int,
    options: StatusOptions | None = None,
    *,
    task_status: trio.TaskStatus[int | None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the status endpoint on `host:port` (port 0 picks a free one) until cancelled;
    log the bound port and report it through `task_status` (None when it could not bind, or
    must not: see the module docstring)."""
    options = options or StatusOptions()
    problem = status_exposure_problem(StatusConfig(
        host=host, port=port, token=options.token,
        allow_unauthenticated=options.allow_unauthenticated))
    if problem is not None:
        logger.error("status endpoint not started: {}", problem)
        task_status.started(None)
        return
    async with trio.open_nursery() as nursery:
        app = StatusApp(snapshot, db_url, options, nursery)
        bind_error: OSError | None = None
        try:
            bound = await nursery.start(partial(
                serve_http, app.handle, host, port, idle_timeout=options.idle_timeout,
                read_timeout=options.read_timeout, max_connections=options.max_connections))
        except* OSError as group:
            bind_error = group.exceptions[0]  # type: ignore[assignment]
        if bind_error is not None:
            logger.error("status endpoint not started: cannot listen on {}:{}: {}", host, port,
                         bind_error.strerror or bind_error)
            task_status.started(None)
            return
        shown = f"[{host}]" if ":" in host else host
        access = "no token" if options.token is None else "bearer token required"
        logger.info("status endpoint on http://{}:{}/status ({})", shown, bound, access)
        if options.token is None and not is_loopback(host):
            logger.warning("status endpoint on {} has no token (allow_unauthenticated = true): "
                           "anyone who can connect can read /status and /metrics", shown)
        task_status.started(bound)
