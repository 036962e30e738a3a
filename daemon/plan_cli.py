"""`backfilld plan`: what the next cycle will ask the API for, and how long that takes.

From the config and the database's coverage only (no API call): per configured series, the
ranges the scheduler will fetch (`planning.plan_series`: requested - covered, the open tail's
overlap), the requests they should take (daemon.forecast: calibrated for minutes without
trades, counted the way the scheduler splits deep ranges), the total, and the time at
`[polygon] requests_per_minute` or, on an unlimited plan, through `max_in_flight` at an
assumed latency (`--latency`, default 1 s: what the scheduler assumes before it has measured).

The database is the config's, like `backfilld migrate`; nothing is written to it, and a
database the daemon never ran on (no schema yet) plans a full backfill.

Exit codes: 0; ConfigError (2) and DatabaseError (3) are mapped by daemon.__main__.main.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from typing import TextIO

import psycopg

from . import db
from .config import Config, load_config
from .errors import DatabaseError
from .forecast import ASSUMED_LATENCY_SECONDS, Estimate, estimate
from .planning import FetchRange, plan_series
from .report import format_table
from .timefmt import human_age, iso_ms, wall_clock
from .timeframes import Timeframe

__all__ = ["REFUSAL_RETRY_SECONDS", "add_plan_arguments", "plan_cycle", "read_state",
           "run_plan"]

# As in daemon.__main__ (imported lazily from there, so it cannot be imported from it here).
_DEFAULT_CONFIG = "config.toml"
_CONFIG_ENV = "BACKFILLD_CONFIG"
# As daemon.scheduler.REFUSAL_RETRY_SECONDS (not imported: the plan must not load trio): a
# series refused less than this long ago gets a job but no request.
REFUSAL_RETRY_SECONDS = 86_400.0


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help=f"config file (default: ${_CONFIG_ENV} or ./{_DEFAULT_CONFIG})")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (requests, seconds, series, assumptions)")
    parser.add_argument("--latency", type=float, default=ASSUMED_LATENCY_SECONDS,
                        metavar="SECONDS",
                        help="seconds per request assumed (default "
                             f"{ASSUMED_LATENCY_SECONDS:g}: the scheduler's own assumption)")


def read_state(url: str) -> dict[tuple[str, str], db.SeriesState]:
    """Coverage and refusals of every series; empty when the schema is not there yet.

    Error handling: DatabaseError / DatabaseUnavailable as daemon.db raises them.
    """
    with db.connection(url, autocommit=True) as conn:
        try:
            row = conn.execute("SELECT to_regclass('coverage') IS NOT NULL"
                               " AND to_regclass('series_freshness') IS NOT NULL").fetchone()
        except psycopg.Error as exc:
            raise DatabaseError(f"cannot read the schema: {exc}") from None
    if not row or not row[0]:
        return {}
    return db.read_series_state(url)


def plan_cycle(config: Config, state: dict[tuple[str, str], db.SeriesState], *,
               today: dt.date | None = None, now: float | None = None,
               latency: float = ASSUMED_LATENCY_SECONDS) -> Estimate:
    """The estimate of the cycle the scheduler would run now, series by series as it plans."""
    today = today or dt.datetime.now(dt.UTC).date()
    now = wall_clock() if now is None else now
    plans: list[tuple[str, Timeframe, list[FetchRange], str | None]] = []
    for symbol in config.backfill.symbols:
        for tf in config.backfill.timeframes:
            series = state.get((symbol, tf.label)) or db.SeriesState()
            if (series.refused_at is not None
                    and now - series.refused_at < REFUSAL_RETRY_SECONDS):
                plans.append((symbol, tf, [], series.refused_reason or "not entitled"))
                continue
            plans.append((symbol, tf, plan_series(config, symbol, tf, series.covered, today),
                          None))
    return estimate(config, plans, latency=latency)


def run_plan(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from .embedded import database_url

    path = args.config or os.environ.get(_CONFIG_ENV, _DEFAULT_CONFIG)
    config = load_config(path)
    url = config.database.url.reveal() if config.database.url else None
    with database_url(url, config.state_dir) as db_url:
        state = read_state(db_url)
    plan = plan_cycle(config, state, latency=max(0.001, args.latency))
    if args.json:
        print(json.dumps(as_json(plan), indent=2), file=out)
    else:
        print(as_text(plan, path), file=out)
    return 0


def as_json(plan: Estimate) -> dict[str, object]:
    return {
        "requests": plan.requests,
        "seconds": round(plan.seconds, 1),
        "upper_requests": plan.upper_requests,
        "bars": round(plan.bars),
        "jobs": plan.jobs,
        "assumptions": _assumptions(plan),
        "series": [{
            "symbol": s.symbol, "timeframe": s.timeframe, "requests": s.requests,
            "upper_requests": s.upper_requests, "bars": round(s.bars), "refused": s.refused,
            "ranges": [{"from": iso_ms(r.from_ms), "to": iso_ms(r.to_ms), "closed": r.closed}
                       for r in s.ranges],
        } for s in plan.series],
    }


def _assumptions(plan: Estimate) -> dict[str, object]:
    return {
        "requests_per_minute": plan.requests_per_minute or None,
        "max_in_flight": plan.max_in_flight,
        "latency_seconds": plan.latency,
        "ranges_split_into": plan.parts,
    }


def as_text(plan: Estimate, source: str) -> str:
    rows = []
    for s in plan.series:
        if not s.job:
            continue
        what = f"refused: {s.refused}"[:60] if s.refused else f"{len(s.ranges)}"
        rows.append((s.symbol, s.timeframe, what, round(s.bars), s.requests, s.upper_requests))
    lines = [f"plan for {source}: {plan.jobs} jobs of {len(plan.series)} series"]
    if rows:
        lines.append(format_table(["symbol", "timeframe", "ranges", "bars", "requests",
                                   "at most"], rows))
    else:
        lines.append("everything is covered: the next cycle has nothing to fetch")
    rate = (f"{plan.requests_per_minute:g} req/min" if plan.requests_per_minute > 0
            else f"unlimited, {plan.max_in_flight} in flight")
    lines.append(f"total: {plan.requests:,} requests (at most {plan.upper_requests:,} if every "
                 f"session minute traded), about {round(plan.bars):,} bars")
    lines.append(f"time: about {human_age(plan.seconds)} at {rate} (assuming "
                 f"{plan.latency:g} s per request; deep ranges split in {plan.parts})")
    return "\n".join(lines)
