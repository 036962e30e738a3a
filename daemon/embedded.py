"""Embedded PostgreSQL: a real server under the state directory when no database URL is given.

Why: the first run, the demo and the test suite need a real PostgreSQL without asking the user
to install one. `pgserver` ships the Postgres binaries in its wheel, starts a server on a Unix
socket in about half a second, and (as root) runs it as its own system user.

A server left running by a process that was SIGKILLed is found through `postmaster.pid` and
reused on the next start, so a crash never needs manual cleanup.

Error handling: any failure to start raises EmbeddedPostgresError with the tail of the server's
log, which is where Postgres says why.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loguru import logger

from .errors import EmbeddedPostgresError

__all__ = ["database_url", "embedded_postgres", "psql_path", "stop_embedded_postgres"]

# pgserver reads XDG_RUNTIME_DIR when imported (for its lock file); unset, it warns and falls back
# to /tmp. We point it at the state directory, which is ours and writable under systemd.
_RUNTIME_ENV = "XDG_RUNTIME_DIR"
_LOG_TAIL_CHARS = 2_000
# pgserver's list of processes holding the server (it stops the server when the last one exits).
_HANDLES_FILE = ".handle_pids.json"


@contextmanager
def embedded_postgres(
    state_dir: Path, *, delete_on_exit: bool = False, keep_running: bool = False
) -> Iterator[str]:
    """Start (or reuse) the embedded server in `state_dir/pgdata`; yield its connection URL.

    The server is stopped when the block exits (and deleted with `delete_on_exit`, for tests),
    unless `keep_running` (the demo leaves it up so its data can be looked at).
    """
    state_dir = Path(state_dir).expanduser()
    state_dir.mkdir(parents=True, exist_ok=True)
    if not os.environ.get(_RUNTIME_ENV):
        runtime = state_dir / "run"
        runtime.mkdir(mode=0o700, exist_ok=True)
        os.environ[_RUNTIME_ENV] = str(runtime)
    try:
        import pgserver  # noqa: PLC0415 - import after XDG_RUNTIME_DIR is set, see above
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise EmbeddedPostgresError(f"the pgserver package is not installed: {exc}") from None

    pgdata = state_dir / "pgdata"
    logger.info("starting embedded PostgreSQL in {}", pgdata)
    _forget_dead_handles(pgdata)
    try:
        mode = None if keep_running else "delete" if delete_on_exit else "stop"
        server = pgserver.postgres_server.get_server(pgdata, cleanup_mode=mode)
    except Exception as exc:
        raise EmbeddedPostgresError(
            f"could not start embedded PostgreSQL in {pgdata}: {exc}\n{_log_tail(pgdata)}"
        ) from None
    try:
        yield server.get_uri()
    finally:
        if not keep_running:
            logger.info("stopping embedded PostgreSQL")
        try:
            server.cleanup()
        except Exception as exc:  # a failed stop must not hide the real exit reason
            logger.warning("embedded PostgreSQL did not stop cleanly: {}", exc)


def stop_embedded_postgres(state_dir: Path) -> bool:
    """Stop a server left running in `state_dir` (by the demo); False when none was running."""
    pgdata = Path(state_dir).expanduser() / "pgdata"
    if not (pgdata / "postmaster.pid").exists():
        return False
    with embedded_postgres(state_dir):
        pass  # the last handle closing stops the server
    return True


def psql_path() -> Path:
    """The psql that ships inside pgserver, for users with no PostgreSQL client installed."""
    from pgserver._commands import POSTGRES_BIN_PATH  # noqa: PLC0415

    return Path(POSTGRES_BIN_PATH) / "psql"


def _forget_dead_handles(pgdata: Path) -> None:
    """Drop pids of dead processes from pgserver's handle list.

    pgserver stops the server when the last process holding it exits; a SIGKILLed daemon never
    removes its pid, so without this the server would never be stopped again.
    """
    handles = pgdata / _HANDLES_FILE
    try:
        pids = json.loads(handles.read_text())
    except (OSError, ValueError):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and _pid_alive(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _log_tail(pgdata: Path) -> str:
    try:
        return (pgdata / "log").read_text(errors="replace")[-_LOG_TAIL_CHARS:]
    except OSError:
        return "(no server log)"


@contextmanager
def database_url(url: str | None, state_dir: Path) -> Iterator[str]:
    """Yield `url` when one is configured, else the URL of the embedded server in `state_dir`."""
    if url:
        yield url
        return
    with embedded_postgres(state_dir) as embedded_url:
        yield embedded_url
