"""The status endpoint: JSON (and Prometheus text) about the running daemon, on trio + h11.

One module per concern: `app` (routing, database access), `views` (the /status JSON from a
snapshot), `health` (the scheduler-health policy, pure), `reports` (staleness, from the
database), `metrics` (Prometheus rendering), `cache` (stale-while-revalidate answers),
`server` (bind and serve). Everything reads the daemon through a `Snapshot`
(daemon.snapshot), never its parts. The HTTP itself is daemon.httpserver.
"""

from __future__ import annotations

from .app import StatusApp, StatusOptions
from .server import serve_status

__all__ = ["StatusApp", "StatusOptions", "serve_status"]
