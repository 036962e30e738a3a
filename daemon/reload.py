"""Config reload (SIGHUP): read and validate the file again; apply it live, or keep the old one.

The Reloader knows the config file and which generation is in force; what a new config means
for the running parts is the composition root's business (daemon.compose passes `apply`), so
this module knows no part.

Error handling: an invalid file is refused with one log line naming file, line and key, kept
as `last_error` (shown on /status and the STATUS= line) until a good reload; the daemon runs on
with the old config.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import attrs
from loguru import logger

from .config import Config, load_config
from .errors import ConfigError
from .snapshot import ReloadStatistics
from .timefmt import wall_clock

__all__ = ["Reloader", "describe_changes", "restart_only_changes"]


class Reloader:
    """Holds the config in force. `reload()` re-reads `path`; `apply(old, new)` makes a valid
    new config take effect (it must not raise)."""

    def __init__(self, config: Config, path: Path | None,
                 apply: Callable[[Config, Config], None]) -> None:
        self._config = config
        self._path = path
        self._apply = apply
        self._generation = 1
        self._loaded_at = wall_clock()
        self._last_error: str | None = None
        self._last_error_at: float | None = None

    @property
    def config(self) -> Config:
        return self._config

    @property
    def path(self) -> Path | None:
        return self._path

    def statistics(self) -> ReloadStatistics:
        return ReloadStatistics(self._config, self._generation, self._loaded_at,
                                self._last_error, self._last_error_at)

    def reload(self) -> bool:
        """Re-read the config file; True when the new config was applied."""
        if self._path is None:
            logger.warning("reload requested but the daemon has no config file")
            return False
        started = time.perf_counter()
        try:
            new = load_config(self._path)
        except ConfigError as exc:
            self._last_error = str(exc)
            self._last_error_at = wall_clock()
            logger.error("reload failed, keeping the running config: {}", exc)
            return False
        old = self._config
        for what in restart_only_changes(old, new):
            logger.warning("reload: {} changed; that takes effect only after a restart", what)
        self._apply(old, new)
        self._config = new
        self._generation += 1
        self._loaded_at = wall_clock()
        self._last_error = None
        self._last_error_at = None
        logger.info("reload: {}", ", ".join(describe_changes(old, new)) or "no change")
        logger.info("reloaded {} in {:.1f} ms (generation {})", self._path,
                    (time.perf_counter() - started) * 1000, self._generation)
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
        ("[status] (listen, token, connection cap)", old.status, new.status),
        ("[daemon] state_dir", old.state_dir, new.state_dir),
    ) if a != b]
