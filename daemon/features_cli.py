"""`backfilld features rebuild`: recompute derived features from scratch, series by series.

The running daemon keeps features fresh by itself (daemon.features.FeaturesTask); a rebuild is
for after a change of definitions, a restore of `bars` from elsewhere, or to be sure. It is
safe while the daemon runs: a series being computed by the daemon is waited for, and the
daemon's markers are served by the rebuild like by the daemon.

The database is the config's, like `backfilld migrate`: [database] url (or
$BACKFILLD_DATABASE_URL), else the embedded server under [daemon] state_dir. Migrations are
applied first, so a rebuild works on a database the daemon has not started on yet.

Exit codes: 0 done; ConfigError (2) and DatabaseError (3) are mapped by daemon.__main__.main.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TextIO

from .config import load_config

__all__ = ["add_features_arguments", "run_features"]

# As in daemon.__main__ (imported lazily from there, so it cannot be imported from it here).
_DEFAULT_CONFIG = "config.toml"
_CONFIG_ENV = "BACKFILLD_CONFIG"


def add_features_arguments(parser: argparse.ArgumentParser) -> None:
    """The `features` command's sub-commands (one for now: rebuild)."""
    sub = parser.add_subparsers(dest="features_command", required=True)
    rebuild = sub.add_parser("rebuild", help="recompute features from scratch")
    rebuild.add_argument("--config", default=None,
                         help=f"config file (default: ${_CONFIG_ENV} or ./{_DEFAULT_CONFIG})")
    rebuild.add_argument("--symbol", help="only this symbol (exact, case-sensitive)")
    rebuild.add_argument("--timeframe", help="only this timeframe label, e.g. 5m or 1d")
    rebuild.add_argument("--jobs", type=int, default=None, metavar="N",
                         help="series computed at once, each on its own connection and server "
                              "core (default: [database] features_connections)")


def run_features(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Run `features rebuild`: progress on stderr when it is a terminal, then one summary line
    on `out`."""
    from . import db
    from .embedded import database_url
    from .features import rebuild
    from .log import setup_logging

    config = load_config(args.config or os.environ.get(_CONFIG_ENV, _DEFAULT_CONFIG))
    setup_logging(config.logging.level, config.logging.format)
    url = config.database.url.reveal() if config.database.url else None
    progress = _Progress(sys.stderr if sys.stderr.isatty() else None)
    started = time.perf_counter()
    with database_url(url, config.state_dir) as db_url:
        db.apply_migrations(db_url)
        rows = rebuild(db_url, symbol=args.symbol, timeframe=args.timeframe,
                       progress=progress.update,
                       jobs=max(1, args.jobs or config.database.features_connections))
    seconds = time.perf_counter() - started
    progress.finish()
    print(f"features rebuilt: {progress.total:,} series, {rows:,} rows in {seconds:.1f} s"
          f" ({rows / seconds if seconds > 0 else 0:,.0f} rows/s)", file=out)
    return 0


class _Progress:
    """Counts series; on a terminal, one line rewritten in place (`features rebuild: 3/12
    series`)."""

    def __init__(self, terminal: TextIO | None) -> None:
        self._terminal = terminal
        self.total = 0

    def update(self, done: int, total: int) -> None:
        self.total = total
        if self._terminal is not None:
            self._terminal.write(f"\rfeatures rebuild: {done}/{total} series")
            self._terminal.flush()

    def finish(self) -> None:
        if self._terminal is not None:
            self._terminal.write("\n")
            self._terminal.flush()
