"""The `backfilld` command: run, demo, migrate, check-config, simulate, status.

Exit codes: 0 success; 1 `run --once` finished with failed jobs, or `status` found the daemon
unhealthy; 2 bad config or usage; 3 database unreachable or migration failed; 4 `status` could
not reach the daemon; 130 stopped by a second interrupt.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import trio
from loguru import logger

from .config import Config, load_config
from .errors import BackfilldError, ConfigError, DatabaseError, EmbeddedPostgresError

EXIT_OK, EXIT_JOBS_FAILED, EXIT_CONFIG, EXIT_DATABASE = 0, 1, 2, 3
DEFAULT_CONFIG = os.environ.get("BACKFILLD_CONFIG", "config.toml")
NO_KEY_HINT = ("set POLYGON_API_KEY (or MASSIVE_API_KEY), [polygon] api_key or api_key_file, "
               "or the systemd credential polygon-api-key")


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"backfilld: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def cmd_run(args: argparse.Namespace) -> int:
    import faulthandler

    from .app import EXIT_FORCED, Daemon
    from .embedded import database_url
    from .log import setup_logging
    from .report import print_failures
    from .systemd import Notifier

    # Read (and remove) NOTIFY_SOCKET & co. before any child process (the embedded PostgreSQL)
    # could inherit them. A watchdog abort (SIGABRT) prints every thread's stack to the journal.
    notifier = Notifier.from_environment()
    faulthandler.enable(file=sys.__stderr__ or sys.stderr, all_threads=True)
    config = _load(args.config)
    if not config.polygon.api_key:
        # Every request would be refused: say so now, not as a cycle of 401s.
        print(f"backfilld: {args.config}: no API key: {NO_KEY_HINT}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(config.logging.level, config.logging.format)
    url = config.database.url.reveal() if config.database.url else None
    notifier.notify(STATUS="starting embedded PostgreSQL" if url is None else "starting")
    with database_url(url, config.state_dir) as db_url:
        daemon = Daemon(config, db_url, config_path=Path(args.config), notifier=notifier)
        cycle = trio.run(lambda: daemon.run(once=args.once))
    if daemon.forced:
        return EXIT_FORCED
    if args.once:
        if cycle is None or not cycle.ok:
            print_failures(cycle)
            return EXIT_JOBS_FAILED
        logger.info("all {} jobs succeeded", len(cycle.jobs))
    return EXIT_OK


def cmd_migrate(args: argparse.Namespace) -> int:
    from . import db
    from .embedded import database_url
    from .log import setup_logging

    config = _load(args.config)
    setup_logging(config.logging.level, config.logging.format)
    url = config.database.url.reveal() if config.database.url else None
    with database_url(url, config.state_dir) as db_url:
        applied = db.apply_migrations(db_url)
    print("applied: " + ", ".join(applied) if applied else "schema is up to date")
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    bf = config.backfill
    print(f"{args.config}: OK")
    rpm = config.polygon.requests_per_minute
    print(f"  api: {config.polygon.base_url}, key {'set' if config.polygon.api_key else 'NOT SET'}"
          f", {f'{rpm:g}' if rpm else 'unlimited'} req/min")
    print(f"  database: {'configured URL' if config.database.url else 'embedded in '}"
          f"{'' if config.database.url else config.state_dir}")
    print(f"  {len(bf.symbols)} symbols x {', '.join(t.label for t in bf.timeframes)}")
    if not config.polygon.api_key:
        print(f"  warning: no API key: {NO_KEY_HINT}", file=sys.stderr)
    return EXIT_OK


def cmd_simulate(args: argparse.Namespace) -> int:
    from .log import setup_logging
    from .simulator.server import options_from_args, run_simulator

    setup_logging("INFO")
    run_simulator(options_from_args(args))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from .status_cli import run_status

    return run_status(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    from .demo import add_demo_arguments
    from .simulator.server import add_simulate_arguments
    from .status_cli import add_status_arguments

    parser = argparse.ArgumentParser(
        prog="backfilld",
        description="Keep PostgreSQL filled with Polygon/Massive OHLCV bars.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", default=DEFAULT_CONFIG,
                       help="config file (default: $BACKFILLD_CONFIG or ./config.toml)")
        return p

    run = with_config(sub.add_parser("run", help="run the daemon"))
    run.add_argument("--once", action="store_true",
                     help="one full cycle, then exit 0 if every job succeeded, else 1")
    run.set_defaults(func=cmd_run)
    with_config(sub.add_parser("migrate", help="apply database migrations")).set_defaults(
        func=cmd_migrate)
    with_config(sub.add_parser("check-config", help="validate the config file")).set_defaults(
        func=cmd_check_config)
    simulate = sub.add_parser("simulate", help="serve a Polygon-compatible API on loopback")
    add_simulate_arguments(simulate)
    simulate.set_defaults(func=cmd_simulate)
    status = sub.add_parser("status", help="what a running daemon is doing, as tables")
    add_status_arguments(status, DEFAULT_CONFIG)
    status.set_defaults(func=cmd_status)
    demo = sub.add_parser("demo", help="a complete backfill against the simulator, in a minute")
    add_demo_arguments(demo)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"backfilld: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (DatabaseError, EmbeddedPostgresError) as exc:
        print(f"backfilld: {exc}", file=sys.stderr)
        return EXIT_DATABASE
    except BackfilldError as exc:
        print(f"backfilld: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
