"""Stock splits: what `/v3/reference/splits` says, and what a split does to adjusted bars.

With `[polygon] adjusted = true` the API serves every bar adjusted for the splits known *when
it is asked*. A series fetched before a split and topped up after it would jump by the split's
ratio at its execution date. So each cycle asks for the splits executed since the last check
(one market-wide request, not one per symbol), and for every configured symbol with a new one
the writer, in one transaction, rescales the stored bars before the execution date (prices x
`split_from / split_to`, volumes by the inverse) so readers never see a jump, and drops those
bars' span from the series' coverage, so the scheduler fetches that history again and the
table ends exactly as the API serves it now (the rescale is right up to the API's rounding;
the re-fetch makes it exact, page by page). Symbols without a split are not fetched again;
`adjusted = false` series need nothing.

Why not store unadjusted bars and adjust on read: `bars` must hold what `[polygon] adjusted`
asks for, exactly as the API serves it, for every reader of the table.
"""

from __future__ import annotations

import datetime as dt

import attrs
import msgspec
import psycopg

from . import db, features
from .errors import BadResponse, DatabaseError, DatabaseUnavailable
from .jobs import Receipt
from .market_calendar import et_midnight_ms

__all__ = ["Applied", "Split", "SplitsFound", "SplitsPage", "apply_splits", "decode_splits",
           "read_checked_through"]


@attrs.frozen(order=True)
class Split:
    """One split as the API lists it: before `execution_date`, prices scale by
    `split_from / split_to` (a 10-for-1 is from 1 to 10) and volumes by the inverse."""

    execution_date: dt.date
    ticker: str
    split_from: float
    split_to: float
    id: str

    @property
    def price_factor(self) -> float:
        return self.split_from / self.split_to

    def __str__(self) -> str:
        kind = "reverse split" if self.split_from > self.split_to else "split"
        return (f"{self.ticker} {kind} {self.split_to:g}-for-{self.split_from:g} on "
                f"{self.execution_date.isoformat()}")


class _Result(msgspec.Struct):
    execution_date: str
    ticker: str
    split_from: float
    split_to: float
    id: str | None = None


class _Body(msgspec.Struct):
    status: str
    results: list[_Result] | None | msgspec.UnsetType = msgspec.UNSET
    next_url: str | None = None
    message: str | None = None
    error: str | None = None


_DECODER = msgspec.json.Decoder(_Body)


@attrs.frozen
class SplitsPage:
    """One page of `/v3/reference/splits` (the same envelope as an aggregates page)."""

    status: str
    next_url: str | None
    splits: tuple[Split, ...]
    message: str | None
    results_null: bool = False


def decode_splits(body: bytes) -> SplitsPage:
    """Decode a splits page. Error handling: BadResponse for anything not its shape."""
    try:
        decoded = _DECODER.decode(body)
    except msgspec.DecodeError as exc:
        raise BadResponse(f"not a splits body: {exc}") from None
    results = decoded.results if isinstance(decoded.results, list) else []
    splits = []
    for r in results:
        try:
            day = dt.date.fromisoformat(r.execution_date)
        except ValueError:
            raise BadResponse(f"a split with a bad execution_date: {r.execution_date!r}") from None
        if not (r.split_from > 0 and r.split_to > 0):
            raise BadResponse(f"a split with a ratio that is not positive: {r!r}")
        splits.append(Split(day, r.ticker, r.split_from, r.split_to,
                            r.id or f"{r.ticker}:{day.isoformat()}"))
    return SplitsPage(decoded.status, decoded.next_url, tuple(splits),
                      decoded.message or decoded.error, decoded.results is None)


# --- applying them (in the writer's transaction) ---------------------------------------------


@attrs.frozen
class SplitsFound:
    """A writer message: the splits one check found, applied in one transaction.

    Attributes:
        splits: Every split listed (known ones are skipped by id).
        through: The check covered execution dates up to this day.
        baseline: The first check ever: record, apply nothing (the data was fetched with these
            splits already known to the API).
        tickers: The configured, adjusted tickers: only their splits rescale anything.
        receipt: Finished once committed (the scheduler waits for it before planning).
    """

    splits: tuple[Split, ...]
    through: dt.date
    baseline: bool
    tickers: frozenset[str]
    receipt: Receipt


@attrs.frozen
class Applied:
    """A split applied: how many bars it rescaled, per timeframe."""

    split: Split
    bars: dict[str, int]


_INSERT = """
INSERT INTO splits (id, ticker, execution_date, split_from, split_to)
VALUES (%(id)s, %(ticker)s, %(day)s, %(from)s, %(to)s)
ON CONFLICT (id) DO NOTHING
RETURNING id
"""
# Prices scale by the factor, volumes by its inverse; the trade count is what it was.
_RESCALE = """
WITH scaled AS (
    UPDATE bars SET open = open * %(f)s, high = high * %(f)s, low = low * %(f)s,
                    close = close * %(f)s, vwap = vwap * %(f)s, volume = volume / %(f)s
    WHERE symbol = %(ticker)s AND ts < %(before)s
    RETURNING timeframe, ts)
SELECT timeframe, min(ts), count(*) FROM scaled GROUP BY timeframe
"""
_UNCOVER = """
UPDATE coverage SET covered = covered - int8multirange(int8range(NULL, %(before_ms)s)),
                    updated_at = now()
WHERE symbol = %(ticker)s
"""
_MARK_APPLIED = "UPDATE splits SET applied_at = now(), bars_rescaled = %(n)s WHERE id = %(id)s"
_CHECKED = """
INSERT INTO splits_checked (singleton, checked_at, through) VALUES (true, now(), %(through)s)
ON CONFLICT (singleton) DO UPDATE SET checked_at = now(),
    through = GREATEST(splits_checked.through, EXCLUDED.through)
"""


def apply_splits(cur: psycopg.Cursor, message: SplitsFound) -> list[Applied]:
    """Record the splits; apply the new ones of configured tickers (see the module docstring).
    Returns what was applied."""
    applied: list[Applied] = []
    for split in sorted(message.splits):
        new = cur.execute(_INSERT, {"id": split.id, "ticker": split.ticker,
                                    "day": split.execution_date, "from": split.split_from,
                                    "to": split.split_to}).fetchone()
        if new is None or message.baseline or split.ticker not in message.tickers:
            continue
        before_ms = et_midnight_ms(split.execution_date)
        rows = cur.execute(_RESCALE, {"f": split.price_factor, "ticker": split.ticker,
                                      "before": db.from_ms(before_ms)}).fetchall()
        for timeframe, first, _ in rows:
            features.mark_dirty(cur, [(split.ticker, timeframe, db.to_ms(first))])
        cur.execute(_UNCOVER, {"ticker": split.ticker, "before_ms": before_ms})
        counts = {timeframe: int(n) for timeframe, _, n in rows}
        cur.execute(_MARK_APPLIED, {"n": sum(counts.values()), "id": split.id})
        applied.append(Applied(split, counts))
    cur.execute(_CHECKED, {"through": message.through})
    return applied


def read_checked_through(url: str) -> dt.date | None:
    """Up to which execution date splits were last checked; None before the first check."""
    with db.connection(url, autocommit=True) as conn:
        try:
            row = conn.execute("SELECT through FROM splits_checked").fetchone()
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"cannot read splits_checked: {exc}") from None
        except psycopg.Error as exc:
            raise DatabaseError(f"cannot read splits_checked: {exc}") from None
    return None if row is None else row[0]
