"""`backfilld verify`: ask the API again for what the database says it holds, and compare.

What is checked: the *covered* spans of each configured series (the coverage multirange: the
instants whose bars the daemon committed as complete), from `--since` on. Everywhere there,
`bars` must hold exactly the API's bars. The API is asked through the same rate limiter,
circuit breaker and client the daemon builds from the config, so verify spends the same budget
by the same rules (run it beside the daemon and they share nothing but the key: mind the
rate). With `--sample P` a random share `P` of the covered spans' page-sized sub-ranges is
asked for (each cut at `[polygon] page_limit` units at the upper bound, so each costs one
request); the draw is seeded with `--seed`, by default today's date (YYYYMMDD: the same draw all
day, a different one tomorrow), and the seed is printed so a draw can be repeated.

How a bar is judged, per instant `t` inside a checked span:

    missing      the API has a valid bar at t, `bars` has none
    extra        `bars` has a row at t, the API has no bar there
    differs      both have one, and a value differs (o h l c v vw n, compared exactly)
    quarantined  the API's bar at t (or, when its place is unknown, somewhere in that page) is
                 invalid (daemon.bars): the stored row, or its absence, cannot be judged.
                 Reported, never a failure, never repaired.

**Revisions.** The vendor revises recent bars for late trades, so a bar of the session still
going on (or just ended) when the daemon last fetched the series may legitimately change after
that fetch. The rule: a missing, extra or differing bar counts as a *revision*, not as
corruption, when it belongs to the series' *revision session*: the latest trading session that
had begun (04:00 ET; a crypto pair's ET day at midnight) at the series' last successful fetch
(`series_freshness.last_success_at`, else its last written page, `last_attempt_at`). A bar
belongs to a session when its bucket holds that session's day (intraday bars: their ET date;
day, week and month bars: the bucket containing the day). Revisions are reported apart and do
not fail verify; everything older was final when it was fetched and must match exactly.

**Repair** (`--repair`) puts the API's version in place, revisions included:
- pages with missing or differing bars go through the normal write path: a real
  `daemon.writer.Writer` on a channel of its own, one transaction per page (upsert of the
  page's bars, only changed rows rewritten; the page's span joins coverage, which already held
  it; the freshness row; the features dirty marker from the first changed bar);
- extra rows are deleted per series in one transaction of this module that locks the series'
  coverage row (FOR UPDATE: the writer's coverage update waits for it) and deletes only the
  rows still inside the coverage, with their features rows (which would be left orphaned), and
  marks the series' features dirty from the first deleted bar, as the writer does;
- then the features of the dirty series are recomputed here (`features.process_dirty`), so
  they are right when verify exits whether or not a daemon runs;
- finally every repaired page is compared again with the API's answer already in hand (no new
  request): exit 0 only when nothing is left.

Exit codes: 0 everything matches (or was put right); 1 a difference (revisions and quarantined
bars aside), or a span that could not be checked (the API failed or refused); ConfigError (2)
and DatabaseError (3) are mapped by daemon.__main__.main.
"""

from __future__ import annotations

import argparse
import datetime as dt
import enum
import json
import os
import random
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from contextlib import aclosing
from typing import TextIO, TypeVar

import attrs
import psycopg
import trio
from loguru import logger
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from . import db, features
from .bars import Bar, Quarantined, encode_copy_rows
from .breaker import CircuitBreaker
from .config import Config, load_config
from .errors import (
    ApiError,
    ApiKeyRefused,
    BackfilldError,
    DatabaseError,
    DatabaseUnavailable,
    redact,
)
from .forecast import page_ranges
from .jobs import Receipt, SeriesKey
from .log import setup_logging
from .market_calendar import (
    SESSION_OPEN_MINUTE,
    bucket_start_day,
    et_date,
    et_midnight_ms,
    is_crypto,
    is_trading_day,
    previous_trading_day,
)
from .polygon import PolygonClient
from .progress import should_draw
from .ratelimit import RateLimiter
from .spans import Spans
from .timefmt import iso_ms
from .timeframes import Timeframe, parse_timeframe
from .writer import Message, PageWrite, Writer, open_writer_channel

__all__ = [
    "Change",
    "Finding",
    "Row",
    "add_verify_arguments",
    "classify",
    "revision_window",
    "run_verify",
    "sample_units",
]

EXIT_OK, EXIT_DIFFERS = 0, 1
# As in daemon.__main__ (imported lazily from there, so it cannot be imported from it here).
_DEFAULT_CONFIG = "config.toml"
_CONFIG_ENV = "BACKFILLD_CONFIG"
# Examples printed per series and kind of difference.
EXAMPLES = 5
_MINUTE_MS = 60_000

# A stored bar as read from `bars`: (t, open, high, low, close, volume, vwap, trades).
Row = tuple[int, float, float, float, float, float, float | None, int | None]
_FIELDS = ("open", "high", "low", "close", "volume", "vwap", "trades")
T = TypeVar("T")


class Change(enum.StrEnum):
    MISSING = "missing"
    EXTRA = "extra"
    DIFFERS = "differs"
    QUARANTINED = "quarantined"


@attrs.frozen
class Finding:
    """One instant where `bars` and the API disagree (or cannot be compared)."""

    change: Change
    t: int
    stored: Row | None
    api: Row | None
    revision: bool = False  # in the series' revision session: the vendor's, not corruption
    reason: str | None = None  # why the API's bar was quarantined

    def describe(self) -> str:
        when = iso_ms(self.t)
        if self.change is Change.QUARANTINED:
            return f"{when}  the API's bar is invalid: {self.reason}"
        if self.change is Change.DIFFERS:
            assert self.stored is not None and self.api is not None
            diffs = [f"{name} {s!r} -> {a!r}" for name, s, a
                     in zip(_FIELDS, self.stored[1:], self.api[1:], strict=True) if s != a]
            return f"{when}  stored -> api: {', '.join(diffs)}"
        row = self.api if self.change is Change.MISSING else self.stored
        assert row is not None
        values = " ".join(f"{n[0] if n != 'vwap' else 'vw'}={v!r}"
                          for n, v in zip(_FIELDS, row[1:], strict=True))
        return f"{when}  {'api' if self.change is Change.MISSING else 'stored'}: {values}"

    def as_json(self) -> dict[str, object]:
        return {"change": self.change.value, "t": self.t, "time": iso_ms(self.t),
                "revision": self.revision, "reason": self.reason,
                "stored": _row_json(self.stored), "api": _row_json(self.api)}


def _row_json(row: Row | None) -> dict[str, object] | None:
    return None if row is None else dict(zip(_FIELDS, row[1:], strict=True))


def _row(bar: Bar) -> Row:
    return (bar.t, bar.o, bar.h, bar.l, bar.c, bar.v, bar.vw, bar.n)


# --- the pure part: classification, the revision session, the sample ----------------------


def classify(api: Sequence[Bar], stored: Sequence[Row], quarantined: Sequence[Quarantined],
             *, revision: tuple[int, int] | None = None) -> list[Finding]:
    """Every instant of one page's span where the API's valid bars `api` and the stored rows
    `stored` disagree, in `t` order (see the module docstring for the kinds).

    `quarantined`: the page's invalid bars; one whose place is unknown (`t` None) makes every
    extra row of the page unjudgeable. `revision`: `[lo, hi)` of the bar starts that belong to
    the series' revision session, or None.
    """
    by_api = {b.t: _row(b) for b in api}
    by_db = {r[0]: r for r in stored}
    bad = {q.t: q.reason for q in quarantined if q.t is not None}
    unplaced = next((q.reason for q in quarantined if q.t is None), None)
    out = []
    for t in sorted(by_api.keys() | by_db.keys() | bad.keys()):
        a, s = by_api.get(t), by_db.get(t)
        if a is None and t in bad:
            out.append(Finding(Change.QUARANTINED, t, s, None, reason=bad[t]))
            continue
        if a is None and unplaced is not None:
            out.append(Finding(Change.QUARANTINED, t, s, None, reason=unplaced))
            continue
        if s is None:
            change = Change.MISSING
        elif a is None:
            change = Change.EXTRA
        elif a[1:] != s[1:]:
            change = Change.DIFFERS
        else:
            continue
        late = revision is not None and revision[0] <= t < revision[1]
        out.append(Finding(change, t, s, a, revision=late))
    return out


def revision_session(symbol: str, fetched_at_ms: int) -> dt.date:
    """The latest trading session that had begun at `fetched_at_ms` (see the docstring)."""
    day = et_date(fetched_at_ms)
    if is_crypto(symbol):
        return day
    opened = et_midnight_ms(day) + SESSION_OPEN_MINUTE * _MINUTE_MS
    if is_trading_day(day) and fetched_at_ms >= opened:
        return day
    return previous_trading_day(day - dt.timedelta(days=1))


def revision_window(symbol: str, timeframe: Timeframe, fetched_at_ms: int | None
                    ) -> tuple[int, int] | None:
    """`[lo, hi)` of the bar starts of the series' revision session (None: never fetched)."""
    if fetched_at_ms is None:
        return None
    session = revision_session(symbol, fetched_at_ms)
    if timeframe.intraday:
        return et_midnight_ms(session), et_midnight_ms(session + dt.timedelta(days=1))
    start = et_midnight_ms(bucket_start_day(timeframe, session))
    return start, start + 1


@attrs.frozen
class Unit:
    """One range to ask the API for: `[lo, hi)` of one series, inside its coverage."""

    series: SeriesKey
    lo: int
    hi: int


def sample_units(units: Sequence[Unit], share: float, seed: int) -> list[Unit]:
    """A random `share` of `units` (at least one when there are any), drawn with `seed`, in
    their original order."""
    if share >= 1 or not units:
        return list(units)
    k = max(1, round(share * len(units)))
    chosen = sorted(random.Random(seed).sample(range(len(units)), k))
    return [units[i] for i in chosen]


def default_seed(today: dt.date) -> int:
    return today.year * 10_000 + today.month * 100 + today.day


# --- arguments -------------------------------------------------------------------------------


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError("expected a share in (0, 1], e.g. 0.05 for 5%")
    return value


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD: {text!r}") from None


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help=f"config file (default: ${_CONFIG_ENV} or ./{_DEFAULT_CONFIG})")
    parser.add_argument("--symbol", help="only this symbol (exact, case-sensitive)")
    parser.add_argument("--timeframe", help="only this timeframe label, e.g. 5m or 1d")
    parser.add_argument("--since", type=_date, metavar="DATE",
                        help="only covered spans from this ET day on (YYYY-MM-DD)")
    parser.add_argument("--sample", type=_share, default=1.0, metavar="P",
                        help="check a random share P of the page-sized sub-ranges "
                             "(e.g. 0.05); default: everything")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the --sample draw (default: today's date, YYYYMMDD)")
    parser.add_argument("--repair", action="store_true",
                        help="write the API's version of what differs, delete extra rows")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


# --- the report --------------------------------------------------------------------------------


@attrs.define
class SeriesReport:
    """What verify found for one series (its counts, the first examples, its errors)."""

    series: SeriesKey
    revision: tuple[int, int] | None = None
    covered: bool = False  # has covered spans to check (from --since on)
    ranges: int = 0
    pages: int = 0
    bars: int = 0  # API bars compared
    counts: Counter[tuple[Change, bool]] = attrs.field(factory=Counter)
    examples: list[Finding] = attrs.field(factory=list)
    errors: list[str] = attrs.field(factory=list)
    extras: list[int] = attrs.field(factory=list)  # stored rows the API does not have
    held_out: int = 0  # quarantined spots kept out of coverage (the daemon asks again)
    repaired_pages: int = 0
    deleted: int = 0
    left: int = 0  # differences still there after the repair

    def count(self, change: Change, *, revision: bool = False) -> int:
        return self.counts[(change, revision)]

    @property
    def corrupt(self) -> int:
        return sum(n for (change, late), n in self.counts.items()
                   if not late and change is not Change.QUARANTINED)

    @property
    def revisions(self) -> int:
        return sum(n for (_, late), n in self.counts.items() if late)

    def note(self, findings: Iterable[Finding]) -> None:
        for f in findings:
            key = (f.change, f.revision)
            self.counts[key] += 1
            if self.counts[key] <= EXAMPLES:
                self.examples.append(f)
            if f.change is Change.EXTRA:
                self.extras.append(f.t)


@attrs.frozen
class _Checked:
    """A page with something to repair, and the API's answer for it (kept for the re-check)."""

    series: SeriesKey
    lo: int
    hi: int
    bars: tuple[Bar, ...]


# --- running it ------------------------------------------------------------------------------


def run_verify(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from .embedded import database_url

    config = load_config(args.config or os.environ.get(_CONFIG_ENV, _DEFAULT_CONFIG))
    setup_logging(config.logging.level, config.logging.format)
    timeframe = parse_timeframe(args.timeframe) if args.timeframe else None
    series = [SeriesKey(s, tf.label) for s in config.backfill.symbols
              for tf in config.backfill.timeframes
              if (args.symbol is None or s == args.symbol)
              and (timeframe is None or tf == timeframe)]
    seed = args.seed if args.seed is not None else default_seed(dt.datetime.now(dt.UTC).date())
    url = config.database.url.reveal() if config.database.url else None
    with database_url(url, config.state_dir) as db_url:
        db.apply_migrations(db_url)
        verifier = _Verifier(config, db_url, series, since=args.since, share=args.sample,
                             seed=seed, repair=args.repair)
        try:
            trio.run(verifier.run)
        except BaseExceptionGroup as group:
            # a database failure in one unit's task: leave as itself (exit 3), not in a group
            error = _first_error(group)
            if error is None:
                raise
            raise error from None
    if args.json:
        print(json.dumps(verifier.as_json(), indent=2), file=out)
    else:
        print(verifier.as_text(), file=out)
    return EXIT_OK if verifier.ok else EXIT_DIFFERS


def _first_error(group: BaseExceptionGroup[BaseException]) -> BackfilldError | None:
    for exc in group.exceptions:
        if isinstance(exc, BackfilldError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first_error(exc)
            if found is not None:
                return found
    return None


class _Verifier:
    """One verify run: plan the units, fetch and compare them, repair, report."""

    def __init__(self, config: Config, db_url: str, series: list[SeriesKey], *,
                 since: dt.date | None, share: float, seed: int, repair: bool) -> None:
        self.config = config
        self.db_url = db_url
        self.since = since
        self.share = share
        self.seed = seed
        self.repair = repair
        self.reports = {key: SeriesReport(key) for key in series}
        self.units: list[Unit] = []
        self.total_units = 0
        self.requests = 0
        self.features_recomputed: int | None = None
        self.fatal: str | None = None
        self._timeframes = {tf.label: tf for tf in config.backfill.timeframes}
        self._checked: list[_Checked] = []
        self._db_limiter = trio.CapacityLimiter(1)
        self._conn: psycopg.Connection | None = None

    @property
    def ok(self) -> bool:
        if self.fatal is not None:
            return False
        for r in self.reports.values():
            if r.errors:
                return False
            if (r.left if self.repair else r.corrupt):
                return False
        return True

    # --- the units ---

    def _plan(self, coverage: dict[tuple[str, str], Spans],
              fetched: dict[tuple[str, str], int | None]) -> None:
        lo = et_midnight_ms(self.since) if self.since else -(1 << 62)
        limit = self.config.polygon.page_limit
        units = []
        for key, report in self.reports.items():
            tf = self._timeframes[key.timeframe]
            report.revision = revision_window(key.symbol, tf,
                                              fetched.get((key.symbol, key.timeframe)))
            spans = coverage.get((key.symbol, key.timeframe), Spans()).clip(lo, 1 << 62)
            report.covered = bool(spans)
            for a, b in spans:
                if self.share >= 1:
                    units.append(Unit(key, a, b))
                else:
                    units += [Unit(key, x, y) for x, y in page_ranges(key.symbol, tf, a, b,
                                                                      limit)]
        self.total_units = len(units)
        self.units = sample_units(units, self.share, self.seed)
        for unit in self.units:
            self.reports[unit.series].ranges += 1

    # --- the database (one connection, in a worker thread) ---

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = db.connect(self.db_url, autocommit=True)
        return self._conn

    async def _db(self, fn: Callable[..., T], *args: object) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._db_limiter)

    def _read_state(self) -> tuple[dict[tuple[str, str], Spans], dict[tuple[str, str],
                                                                     int | None]]:
        coverage = db.read_coverage(self.db_url)
        conn = self._connection()
        try:
            rows = conn.execute(
                "SELECT symbol, timeframe, coalesce(last_success_at, last_attempt_at)"
                " FROM series_freshness").fetchall()
            held = conn.execute("SELECT symbol, timeframe, count(*) FROM quarantined_bars"
                                " GROUP BY symbol, timeframe").fetchall()
        except psycopg.Error as exc:
            raise _database_error("cannot read series_freshness", exc) from None
        for symbol, timeframe, n in held:
            report = self.reports.get(SeriesKey(symbol, timeframe))
            if report is not None:
                report.held_out = int(n)
        return coverage, {(s, tf): None if at is None else db.to_ms(at) for s, tf, at in rows}

    def _rows(self, key: SeriesKey, lo: int, hi: int) -> list[Row]:
        try:
            rows = self._connection().execute(
                "SELECT ts, open, high, low, close, volume, vwap, trades FROM bars"
                " WHERE symbol = %s AND timeframe = %s AND ts >= %s AND ts < %s ORDER BY ts",
                (key.symbol, key.timeframe, db.from_ms(lo), db.from_ms(hi))).fetchall()
        except psycopg.Error as exc:
            raise _database_error("cannot read bars", exc) from None
        return [(db.to_ms(ts), *values) for ts, *values in rows]

    # --- fetch and compare ---

    async def run(self) -> None:
        coverage, fetched = await self._db(self._read_state)
        self._plan(coverage, fetched)
        config = self.config
        limiter = RateLimiter(config.polygon.requests_per_minute,
                              max_in_flight=config.polygon.max_in_flight)
        retry = config.retry
        breaker = CircuitBreaker(threshold=retry.breaker_failures,
                                 first_probe_seconds=retry.breaker_probe_seconds,
                                 max_probe_seconds=retry.breaker_max_probe_seconds)
        send, receive = open_writer_channel(config.database.queue_pages)
        writer = Writer(self.db_url, receive)
        receipts = {key: Receipt() for key in self.reports}
        with _Display(len(self.units), config) as display:
            async with PolygonClient(config.polygon, retry, limiter=limiter,
                                     breaker=breaker) as client:
                async with trio.open_nursery() as nursery:
                    if self.repair:
                        await nursery.start(writer.run)
                    async with send:
                        slots = trio.CapacityLimiter(config.polygon.max_in_flight)
                        async with trio.open_nursery() as units:
                            for unit in self.units:
                                units.start_soon(self._unit, client, slots, unit, send,
                                                 receipts[unit.series], display, units)
                    if not self.repair:
                        await receive.aclose()
            self.requests = client.statistics().total_requests
            display.done()
        if self.repair and self.fatal is None:
            for key, receipt in receipts.items():
                if receipt.write_error:
                    self.reports[key].errors.append(receipt.write_error)
            await self._db(self._delete_extras)
            await self._db(self._recompute_features)
            await self._db(self._recheck)
        if self._conn is not None:
            self._conn.close()

    async def _unit(self, client: PolygonClient, slots: trio.CapacityLimiter, unit: Unit,
                    send: trio.MemorySendChannel[Message], receipt: Receipt,
                    display: _Display, nursery: trio.Nursery) -> None:
        """Fetch one unit page by page; compare (and repair) each page's span."""
        tf = self._timeframes[unit.series.timeframe]
        page_from = unit.lo
        async with slots:
            try:
                pages = client.pages(unit.series.symbol, tf, unit.lo, unit.hi - 1)
                async with aclosing(pages):
                    async for page in pages:
                        seen = [b.t for b in page.bars[-1:]] + [
                            q.t for q in page.quarantined if q.t is not None]
                        # a page proves its span up to its last bar; the last page, the rest
                        hi = unit.hi if page.last else max([page_from, *seen]) + 1
                        await self._page(unit.series, page_from, hi, page.bars,
                                         page.quarantined, send, receipt, display)
                        page_from = max(page_from, hi)
                        if page.last:
                            break
            except ApiKeyRefused as exc:
                self.fatal = f"the API refused the key: {exc}"
                nursery.cancel_scope.cancel()
            except ApiError as exc:
                self.reports[unit.series].errors.append(
                    f"could not check {iso_ms(page_from)} .. {iso_ms(unit.hi - 1)}: "
                    f"{type(exc).__name__}: {exc}")
            finally:
                display.unit()

    async def _page(self, key: SeriesKey, lo: int, hi: int, bars: list[Bar],
                    quarantined: tuple[Quarantined, ...],
                    send: trio.MemorySendChannel[Message], receipt: Receipt,
                    display: _Display) -> None:
        report = self.reports[key]
        stored = await self._db(self._rows, key, lo, hi)
        findings = classify(bars, stored, quarantined, revision=report.revision)
        report.pages += 1
        report.bars += len(bars)
        report.note(findings)
        display.page(sum(1 for f in findings if f.change is not Change.QUARANTINED))
        if not self.repair:
            return
        writes = any(f.change in (Change.MISSING, Change.DIFFERS) for f in findings)
        if writes or any(f.change is Change.EXTRA for f in findings):
            self._checked.append(_Checked(key, lo, hi, tuple(bars)))
        if writes:
            # the normal write path: the page's bars (only changed rows are rewritten), its
            # span (covered already), its freshness row, the features dirty marker
            report.repaired_pages += 1
            await send.send(PageWrite(key, encode_copy_rows(bars, key.symbol, key.timeframe)[0],
                                     (lo, hi), receipt))

    # --- repair (worker thread) ---

    def _delete_extras(self) -> None:
        conn = self._connection()
        for key, report in self.reports.items():
            if not report.extras:
                continue
            try:
                with conn.transaction(), conn.cursor() as cur:
                    report.deleted = _delete(cur, key, sorted(set(report.extras)))
            except psycopg.Error as exc:
                report.errors.append(f"deleting extra rows: {redact(str(exc)).strip()}")

    def _recompute_features(self) -> None:
        try:
            run = features.process_dirty(self._connection())
        except DatabaseError as exc:
            logger.warning("features not recomputed (the daemon will): {}", exc)
            return
        self.features_recomputed = run.series

    def _recheck(self) -> None:
        extras = {key: set(r.extras) for key, r in self.reports.items()}
        for page in self._checked:
            report = self.reports[page.series]
            stored = self._rows(page.series, page.lo, page.hi)
            left = [f for f in classify(page.bars, stored, ())
                    if f.change is not Change.QUARANTINED]
            # an extra row a quarantined bar hid is not ours to delete
            left = [f for f in left
                    if f.change is not Change.EXTRA or f.t in extras[page.series]]
            report.left += len(left)

    # --- output ---

    def as_json(self) -> dict[str, object]:
        totals: Counter[str] = Counter()
        for r in self.reports.values():
            for (change, late), n in r.counts.items():
                totals["revisions" if late else change.value] += n
        return {
            "ok": self.ok,
            "requests": self.requests,
            "sample": self.share,
            "seed": self.seed if self.share < 1 else None,
            "units": len(self.units),
            "units_total": self.total_units,
            "since": self.since.isoformat() if self.since else None,
            "repair": self.repair,
            "features_recomputed": self.features_recomputed,
            "error": self.fatal,
            "totals": {k: totals.get(k, 0) for k in ("missing", "extra", "differs",
                                                     "revisions", "quarantined")},
            "series": [self._series_json(r) for r in self.reports.values()],
        }

    @staticmethod
    def _series_json(r: SeriesReport) -> dict[str, object]:
        out: dict[str, object] = {
            "symbol": r.series.symbol, "timeframe": r.series.timeframe,
            "ranges": r.ranges, "pages": r.pages, "bars": r.bars,
            "missing": r.count(Change.MISSING), "extra": r.count(Change.EXTRA),
            "differs": r.count(Change.DIFFERS), "revisions": r.revisions,
            "quarantined": r.count(Change.QUARANTINED), "held_out": r.held_out,
            "revision_session": None if r.revision is None else iso_ms(r.revision[0]),
            "examples": [f.as_json() for f in r.examples],
            "errors": r.errors,
        }
        out["repaired"] = {"pages_written": r.repaired_pages, "rows_deleted": r.deleted,
                           "left": r.left}
        return out

    def as_text(self) -> str:
        if self.share < 1:
            what = (f"{len(self.units):,} of {self.total_units:,} page-sized ranges "
                    f"({self.share:g} sample, seed {self.seed})")
        else:
            what = f"{len(self.units):,} covered spans"
        lines = [f"verify: {len(self.reports)} series, {what}, {self.requests:,} requests"
                 + (f", from {self.since}" if self.since else "")]
        if self.fatal:
            lines.append(f"  {self.fatal}")
        for r in self.reports.values():
            counts = [f"{r.count(c)} {label}" for c, label in (
                (Change.MISSING, "missing"), (Change.EXTRA, "extra"),
                (Change.DIFFERS, "differing")) if r.count(c)]
            if r.revisions:
                counts.append(f"{r.revisions} revision{'s' if r.revisions != 1 else ''}")
            if r.count(Change.QUARANTINED):
                counts.append(f"{r.count(Change.QUARANTINED)} quarantined")
            state = ", ".join(counts) if counts else (
                "ok" if r.ranges else "not in the sample" if r.covered else "nothing covered")
            lines.append(f"{r.series}: {state} ({r.pages:,} pages, {r.bars:,} bars)")
            for f in r.examples:
                label = "revision " + f.change.value if f.revision else f.change.value
                lines.append(f"  {label:<20} {f.describe()}")
            if r.held_out:
                lines.append(f"  {r.held_out} quarantined spot(s) held out of coverage: not "
                             "checked (the daemon asks the API for them every top-up)")
            for error in r.errors:
                lines.append(f"  error: {error}")
            if self.repair and (r.repaired_pages or r.deleted or r.left):
                lines.append(f"  repaired: {r.repaired_pages} pages written, {r.deleted} rows "
                             f"deleted" + (f", {r.left} still differ" if r.left else ""))
        corrupt = sum(r.corrupt for r in self.reports.values())
        revisions = sum(r.revisions for r in self.reports.values())
        if self.repair:
            verdict = "all put right" if self.ok else "NOT everything was put right"
            if self.features_recomputed is not None:
                verdict += f"; features recomputed for {self.features_recomputed} series"
        elif self.ok:
            verdict = "everything matches"
        else:
            verdict = f"{corrupt:,} stored bar(s) do not match the API's"
        if revisions:
            verdict += f" ({revisions:,} late revisions by the vendor, not counted)"
        lines.append(f"result: {verdict}")
        return "\n".join(lines)


# Delete stored rows the API does not have, only where the coverage (locked: the writer's
# update of it waits) still says the series is complete, with their derived features rows.
_LOCK_COVERAGE = """
SELECT covered FROM coverage WHERE symbol = %(symbol)s AND timeframe = %(timeframe)s FOR UPDATE
"""
_DELETE_EXTRAS = """
WITH gone AS (
    DELETE FROM bars AS b
    USING coverage AS c
    WHERE b.symbol = %(symbol)s AND b.timeframe = %(timeframe)s
      AND c.symbol = b.symbol AND c.timeframe = b.timeframe
      AND b.ts = ANY(%(ts)s)
      AND c.covered @> ((extract(epoch FROM b.ts) * 1000)::int8)
    RETURNING b.ts
), features_gone AS (
    DELETE FROM features AS f USING gone
    WHERE f.symbol = %(symbol)s AND f.timeframe = %(timeframe)s AND f.ts = gone.ts
)
SELECT count(*), min(ts) FROM gone
"""


def _delete(cur: psycopg.Cursor, key: SeriesKey, ts_ms: list[int]) -> int:
    """Delete the rows of `key` at `ts_ms` that lie inside its coverage, in the caller's
    transaction; mark the series' features dirty from the first one. Returns rows deleted."""
    params = {"symbol": key.symbol, "timeframe": key.timeframe,
              "ts": [db.from_ms(t) for t in ts_ms]}
    cur.execute(_LOCK_COVERAGE, params)
    cur.execute(_DELETE_EXTRAS, params)
    row = cur.fetchone()
    count, first = (int(row[0]), row[1]) if row else (0, None)
    if first is not None:
        features.mark_dirty(cur, [(key.symbol, key.timeframe, db.to_ms(first))])
    return count


def _database_error(doing: str, exc: psycopg.Error) -> DatabaseError:
    text = redact(str(exc)).strip()
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return DatabaseUnavailable(f"{doing}: {text}")
    return DatabaseError(f"{doing}: {text}")


class _Display:
    """Progress on stderr while a person watches (daemon.progress.should_draw), else nothing."""

    def __init__(self, units: int, config: Config) -> None:
        self._logging = config.logging
        self._progress: Progress | None = None
        self._differences = 0
        self._pages = 0
        if should_draw(sys.stderr) and units:
            self._progress = Progress(TextColumn("verify"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[info]}"), transient=True,
                                      redirect_stderr=True)
            self._task = self._progress.add_task("verify", total=units, info="")

    def __enter__(self) -> _Display:
        if self._progress is not None:
            self._progress.start()
            # sys.stderr is rich's proxy now: log lines print above the bar
            setup_logging(self._logging.level, self._logging.format, stream=sys.stderr)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.done()

    def page(self, differences: int) -> None:
        self._pages += 1
        self._differences += differences
        if self._progress is not None:
            self._progress.update(self._task, info=f"{self._pages:,} pages, "
                                                   f"{self._differences:,} differences")

    def unit(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._task)

    def done(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            setup_logging(self._logging.level, self._logging.format)
